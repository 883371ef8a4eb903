#include "server/memory_budget.h"

namespace strata {

bool MemoryBudget::try_acquire(uint64_t n) {
  if (n == 0) return true;
  uint64_t cur = used_.load();
  do {
    if (cur != 0 && cur + n > limit_) return false;
  } while (!used_.compare_exchange_weak(cur, cur + n));
  return true;
}

bool MemoryBudget::acquire(uint64_t n, const std::atomic<bool>& cancel) {
  if (try_acquire(n)) return true;
  std::unique_lock lock(mu_);
  // Registered before looking at used_ again: a release that comes after that
  // look sees the waiter and notifies under the mutex, so no wake-up is lost
  // (all of it sequentially consistent).
  waiters_.fetch_add(1);
  bool taken = false;
  cv_.wait(lock, [&] {
    if (cancel.load()) return true;
    taken = try_acquire(n);
    return taken;
  });
  waiters_.fetch_sub(1);
  return taken;
}

void MemoryBudget::release(uint64_t n) {
  if (n == 0) return;
  used_.fetch_sub(n);
  if (waiters_.load() > 0) wake_all();
}

void MemoryBudget::wake_all() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

}  // namespace strata
