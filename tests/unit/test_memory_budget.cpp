// The in-flight memory bound (server/memory_budget.h): what fits is taken at
// once, a request larger than the budget runs alone, waiters wake on release
// and give up on cancel.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "server/memory_budget.h"

using strata::MemoryBudget;

TEST_CASE("bytes are taken while they fit and given back") {
  MemoryBudget b(100);
  CHECK(b.try_acquire(60));
  CHECK(b.try_acquire(40));
  CHECK(b.used() == 100);
  CHECK_FALSE(b.try_acquire(1));
  CHECK(b.try_acquire(0));  // requests without payload never wait
  b.release(40);
  CHECK(b.try_acquire(30));
  CHECK_FALSE(b.try_acquire(11));
  b.release(60);
  b.release(30);
  CHECK(b.used() == 0);
}

TEST_CASE("a request larger than the budget runs when nothing else is held") {
  MemoryBudget b(100);
  CHECK(b.try_acquire(10));
  CHECK_FALSE(b.try_acquire(150));
  b.release(10);
  CHECK(b.try_acquire(150));
  CHECK_FALSE(b.try_acquire(1));
  b.release(150);
}

TEST_CASE("a waiter gets its bytes when enough are released") {
  MemoryBudget b(100);
  std::atomic<bool> cancel{false};
  REQUIRE(b.try_acquire(80));
  std::atomic<bool> got{false};
  std::thread waiter([&] { got = b.acquire(50, cancel); });
  b.release(20);  // 60 held: 50 more still do not fit
  b.release(60);
  waiter.join();
  CHECK(got);
  CHECK(b.used() == 50);
}

TEST_CASE("a waiter gives up when cancelled") {
  MemoryBudget b(100);
  std::atomic<bool> cancel{false};
  REQUIRE(b.try_acquire(100));
  std::atomic<int> result{-1};
  std::thread waiter([&] { result = b.acquire(1, cancel) ? 1 : 0; });
  cancel = true;
  b.wake_all();
  waiter.join();
  CHECK(result == 0);
  CHECK(b.used() == 100);
}
