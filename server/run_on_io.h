// run_on_io: runs a function on the network thread (the one that owns the
// registry and the connection map) from another thread, and waits for its
// result with a bound. The HTTP endpoint's handlers and `strata reload`'s
// trigger use it.
//
// Invariants: never waits past `timeout`; once the network thread's loop
// has stopped (the server is exiting) it gives up within one poll interval,
// since nothing would ever run `f`; an exception from `f` is logged and
// reads as no answer.
#pragma once

// clang-format off
// asio.hpp before spdlog's headers, as in every server file.
#include <asio.hpp>
#include <spdlog/spdlog.h>
// clang-format on

#include <chrono>
#include <exception>
#include <future>
#include <memory>
#include <optional>

namespace strata {

// How often a waiter looks whether the loop has stopped.
inline constexpr std::chrono::milliseconds kRunOnIoPoll{100};

template <class F>
auto run_on_io(asio::io_context& io, F f, std::chrono::milliseconds timeout)
    -> std::optional<decltype(f())> {
  using R = decltype(f());
  if (io.stopped()) return std::nullopt;
  auto done = std::make_shared<std::promise<R>>();
  auto result = done->get_future();
  asio::post(io, [done, f = std::move(f)]() mutable {
    try {
      done->set_value(f());
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  });
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (result.wait_for(kRunOnIoPoll) != std::future_status::ready) {
    if (io.stopped() || std::chrono::steady_clock::now() >= deadline) return std::nullopt;
  }
  try {
    return result.get();
  } catch (const std::exception& e) {
    spdlog::warn("{}", e.what());
    return std::nullopt;
  }
}

}  // namespace strata
