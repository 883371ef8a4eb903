// A bound on the request and reply payload bytes held in memory: WRITE
// payloads read but not yet written, READ buffers not yet sent. Each
// connection has one (limits.max_inflight_bytes) and the server has one for
// all connections together (limits.max_total_inflight_bytes); a request takes
// its bytes from both before it is read further, and gives them back once
// its reply is sent.
//
// Taking bytes is one compare-and-swap while they fit. Only when they do not
// does a reader wait, and only then do releases touch the mutex to wake it.
// Whoever holds bytes never waits for more (the first request of a batch may
// wait, the others only take what is free), so holders always make progress
// and waiting cannot deadlock. A request larger than the whole budget runs
// when nothing else is held.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace strata {

class MemoryBudget {
 public:
  explicit MemoryBudget(uint64_t limit) : limit_(limit) {}
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Takes n bytes if they fit, or if nothing is held at all.
  bool try_acquire(uint64_t n);
  // Waits until try_acquire(n) succeeds; false (nothing taken) once `cancel`
  // is set and wake_all() was called.
  bool acquire(uint64_t n, const std::atomic<bool>& cancel);
  void release(uint64_t n);
  // Makes every waiter look at its cancel flag again.
  void wake_all();

  uint64_t limit() const { return limit_; }
  uint64_t used() const { return used_.load(); }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
  std::atomic<uint32_t> waiters_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace strata
