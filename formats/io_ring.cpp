#include "formats/io_ring.h"

#include <liburing.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

namespace strata {
namespace {

// Entries of each thread's ring: a batch of requests (16 at most today)
// fits with room, and a longer batch is submitted in slices of this size.
constexpr unsigned kRingEntries = 64;

std::atomic<bool> allowed{true};
std::atomic<bool> unavailable{false};
std::atomic<uint64_t> submitted{0};

class ThreadRing {
 public:
  ThreadRing() {
    if (int e = io_uring_queue_init(kRingEntries, &ring_, 0); e < 0) {
      if (!unavailable.exchange(true)) {
        spdlog::warn("io_uring is not available ({}): direct I/O runs one request at a time",
                     std::strerror(-e));
      }
      return;
    }
    ok_ = true;
  }
  ~ThreadRing() {
    if (ok_) io_uring_queue_exit(&ring_);
  }
  ThreadRing(const ThreadRing&) = delete;
  ThreadRing& operator=(const ThreadRing&) = delete;

  bool ok() const { return ok_; }

  // REQUIRES: ok(), ops.size() <= kRingEntries.
  void run(std::span<RingOp> ops) {
    for (size_t i = 0; i < ops.size(); ++i) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);  // never null: the ring is empty
      RingOp& op = ops[i];
      if (op.write) {
        io_uring_prep_write(sqe, op.fd, op.data, op.length, op.offset);
      } else {
        io_uring_prep_read(sqe, op.fd, op.data, op.length, op.offset);
      }
      io_uring_sqe_set_data64(sqe, i);
      op.result = -EAGAIN;  // until it completes: the caller then runs it itself
    }
    const size_t queued = ops.size();
    // One system call in the usual case: submit all, wait for all. The
    // kernel does not wait when it took fewer than were queued.
    int r = io_uring_submit_and_wait(&ring_, static_cast<unsigned>(queued));
    size_t in_kernel = 0;
    for (;;) {
      if (r > 0) in_kernel += static_cast<size_t>(r);
      if (in_kernel == queued || (r < 0 && r != -EINTR) || r == 0) break;
      r = io_uring_submit(&ring_);
    }
    for (size_t done = 0; done < in_kernel;) {
      io_uring_cqe* cqe = nullptr;
      const int e = io_uring_wait_cqe(&ring_, &cqe);
      if (e == -EINTR) continue;
      if (e < 0) break;  // not with entries in flight; never spin
      ops[io_uring_cqe_get_data64(cqe)].result = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      ++done;
    }
    submitted.fetch_add(in_kernel, std::memory_order_relaxed);
    if (in_kernel < queued) reset();  // drops the entries the kernel did not take
  }

 private:
  void reset() {
    io_uring_queue_exit(&ring_);
    ring_ = {};
    ok_ = io_uring_queue_init(kRingEntries, &ring_, 0) == 0;
  }

  io_uring ring_{};
  bool ok_ = false;
};

}  // namespace

bool run_on_ring(std::span<RingOp> ops) {
  if (!allowed.load(std::memory_order_relaxed) || unavailable.load(std::memory_order_relaxed)) {
    return false;
  }
  thread_local ThreadRing ring;
  if (!ring.ok()) return false;
  while (!ops.empty()) {
    const size_t n = std::min<size_t>(ops.size(), kRingEntries);
    ring.run(ops.first(n));
    ops = ops.subspan(n);
  }
  return true;
}

bool io_uring_available() {
  static const bool available = [] {
    io_uring ring{};
    if (io_uring_queue_init(2, &ring, 0) != 0) return false;
    io_uring_queue_exit(&ring);
    return true;
  }();
  return available;
}

uint64_t ring_ops_submitted() { return submitted.load(std::memory_order_relaxed); }

void allow_io_uring(bool allowed_now) { allowed.store(allowed_now, std::memory_order_relaxed); }

}  // namespace strata
