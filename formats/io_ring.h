// IoRing: runs a batch of preads and pwrites at once through io_uring and
// waits for all of them, so that a thread with many requests for the disk
// sleeps once per batch instead of once per request.
//
// Invariants:
//  - One ring per thread, created on the thread's first batch and freed
//    when the thread exits: no lock is taken on the submission path.
//  - Where io_uring is not available (an old kernel, a seccomp profile that
//    forbids it, as container runtimes often have) run() returns false and
//    the caller does the I/O itself; the first such failure is logged once.
//  - Each op's `result` is the kernel's: bytes transferred or a negative
//    errno value. Short transfers are the caller's to finish.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace strata {

struct RingOp {
  int fd = -1;
  bool write = false;
  uint64_t offset = 0;
  void* data = nullptr;
  uint32_t length = 0;
  int32_t result = 0;  // set by run_on_ring
};

// Submits every op and waits for all of them. False: io_uring is not
// available (the ops did not run).
bool run_on_ring(std::span<RingOp> ops);

// Whether this process can set up an io_uring at all.
bool io_uring_available();

// Ops submitted through rings by this process so far (for metrics).
uint64_t ring_ops_submitted();

// Turns the ring path off (or on again) for the whole process: run_on_ring
// then returns false. For tests of the fallback and for hosts that forbid it.
void allow_io_uring(bool allowed);

}  // namespace strata
