// The server-wide count of transmission threads and the rule that bounds
// them (limits.max_io_threads), shared by all connections.
//
// Every connection in transmission has a first thread, always granted: it
// reads the connection's requests, so a connection always makes progress
// however busy the others are (limits.max_connections bounds these). The
// threads a connection starts beyond its first ("extra" threads) are taken
// from one pool of limits.max_io_threads, and a connection takes at most its
// fair share of the pool: max(1, cap / connections in transmission) extra
// threads. So one client's deep queue cannot take every thread while others
// wait for one, and a lone client may still use the whole pool (up to
// limits.workers per connection, which the connection checks).
//
// Invariants: extra() <= cap() at all times; threads() is connections() +
// extra(). A connection gives a thread back only once it has joined it, so
// threads() is never below the transmission threads the kernel runs. Any
// thread may call; each count is one atomic, and a check may see a
// connection count a moment old, which only moves a fair share by one.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace strata {

class IoThreads {
 public:
  explicit IoThreads(uint32_t cap) : cap_(cap) {}
  IoThreads(const IoThreads&) = delete;
  IoThreads& operator=(const IoThreads&) = delete;

  // A connection's first thread starts / its last thread ends.
  void connection_started() { connections_.fetch_add(1, std::memory_order_relaxed); }
  void connection_ended() { connections_.fetch_sub(1, std::memory_order_relaxed); }

  // The extra threads a connection may hold now.
  uint32_t fair_share() const {
    const uint32_t n = std::max<uint32_t>(1, connections_.load(std::memory_order_relaxed));
    return std::max<uint32_t>(1, cap_ / n);
  }

  // One more extra thread for a connection that holds `held` of them: false
  // when that would pass its fair share or the pool is empty.
  bool try_take_extra(uint32_t held) {
    if (held >= fair_share()) return false;
    uint32_t n = extra_.load(std::memory_order_relaxed);
    do {
      if (n >= cap_) return false;
    } while (!extra_.compare_exchange_weak(n, n + 1, std::memory_order_relaxed));
    return true;
  }
  void give_back_extra(uint32_t n = 1) { extra_.fetch_sub(n, std::memory_order_relaxed); }

  uint32_t cap() const { return cap_; }
  uint32_t connections() const { return connections_.load(std::memory_order_relaxed); }
  uint32_t extra() const { return extra_.load(std::memory_order_relaxed); }
  // Transmission threads running now (the strata_io_threads gauge).
  uint64_t threads() const { return uint64_t{connections()} + extra(); }

 private:
  const uint32_t cap_;
  std::atomic<uint32_t> connections_{0};
  std::atomic<uint32_t> extra_{0};
};

}  // namespace strata
