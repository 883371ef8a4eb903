// The server-wide bound on transmission threads and its fair share
// (server/io_threads.h).
#include <doctest/doctest.h>

#include "server/io_threads.h"

using strata::IoThreads;

TEST_CASE("a lone connection may take the whole pool, one thread at a time") {
  IoThreads pool(4);
  pool.connection_started();
  CHECK(pool.fair_share() == 4);
  for (uint32_t held = 0; held < 4; ++held) CHECK(pool.try_take_extra(held));
  CHECK_FALSE(pool.try_take_extra(4));
  CHECK(pool.extra() == 4);
  CHECK(pool.threads() == 5);
}

TEST_CASE(
    "each connection takes at most its fair share, and at least one while the pool has room") {
  IoThreads pool(4);
  for (int i = 0; i < 8; ++i) pool.connection_started();
  CHECK(pool.fair_share() == 1);  // 4 / 8 rounds to 0: one each, first come
  CHECK(pool.try_take_extra(0));
  CHECK_FALSE(pool.try_take_extra(1));  // over the share however free the pool is
  for (int i = 0; i < 3; ++i) CHECK(pool.try_take_extra(0));
  CHECK_FALSE(pool.try_take_extra(0));  // the pool is empty
  CHECK(pool.threads() == 12);          // never more than connections + cap
  pool.give_back_extra(2);
  CHECK(pool.try_take_extra(0));
}

TEST_CASE("the share shrinks as connections come and grows as they go") {
  IoThreads pool(256);
  pool.connection_started();
  CHECK(pool.fair_share() == 256);
  for (int i = 0; i < 63; ++i) pool.connection_started();
  CHECK(pool.fair_share() == 4);
  CHECK_FALSE(pool.try_take_extra(4));
  for (int i = 0; i < 48; ++i) pool.connection_ended();
  CHECK(pool.fair_share() == 16);
  CHECK(pool.try_take_extra(4));
}

TEST_CASE("a cap of 0: one thread per connection") {
  IoThreads pool(0);
  pool.connection_started();
  CHECK_FALSE(pool.try_take_extra(0));
  CHECK(pool.threads() == 1);
}
