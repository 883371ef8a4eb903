// One client connection: the handshake, then the transmission phase.
//
// Threads: the connection's coroutine runs on the network io_context (one
// thread); it reads and validates requests and hands each valid one to the
// block I/O worker pool. A worker executes the request on the export's
// BlockDevice and sends the reply itself, under the connection's write mutex,
// with one gather write (sendmsg) per reply. Replies therefore go out as
// requests complete, out of order, as NBD allows.
//
// Bounds: at most limits.max_inflight_requests requests and
// limits.max_inflight_bytes payload/read bytes in flight per connection; the
// reader stops reading until workers make room.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include <asio.hpp>

#include "config/config.h"
#include "protocol/handshake.h"
#include "server/exports.h"

namespace strata {

class Server;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Socket = asio::generic::stream_protocol::socket;

  Connection(Server& server, Socket socket, uint64_t id, std::string peer);
  ~Connection();

  // Runs the whole connection; completes when it is closed. `self` keeps the
  // connection alive for as long as the coroutine runs.
  static asio::awaitable<void> run(std::shared_ptr<Connection> self);
  // Graceful stop: finish in-flight requests, then close. Call on the io thread.
  void shutdown();
  uint64_t id() const { return id_; }

 private:
  struct Request;

  asio::awaitable<void> serve();
  asio::awaitable<bool> handshake();
  asio::awaitable<void> transmission();
  asio::awaitable<bool> read_exact(void* dst, size_t n);
  asio::awaitable<bool> discard(uint64_t n);
  asio::awaitable<void> wait_until(auto pred);

  uint32_t validate(const nbd::Request& r) const;
  void execute(Request& r);
  void execute_read(Request& r);
  void execute_block_status(Request& r);
  void reply_error(uint64_t cookie, uint32_t error, std::string_view message = {});
  void reply_ok(uint64_t cookie);
  bool send(std::span<iovec> iov);
  void finish(uint64_t bytes);
  void wake_reader();

  Server& server_;
  Socket socket_;
  int fd_;
  const uint64_t id_;
  const std::string peer_;
  const Limits& limits_;
  nbd::Handshake handshake_;
  Export* export_ = nullptr;
  uint16_t tx_flags_ = 0;

  // Buffered reader (network thread only).
  std::unique_ptr<uint8_t[]> rbuf_;
  size_t rpos_ = 0, rend_ = 0;

  // In-flight accounting, shared with workers.
  std::atomic<uint32_t> inflight_{0};
  std::atomic<uint64_t> inflight_bytes_{0};
  std::atomic<bool> reader_waiting_{false};
  asio::steady_timer wake_;
  bool stopping_ = false;
  bool in_transmission_ = false;

  // Replies (workers).
  std::mutex write_mu_;
  bool dead_ = false;  // REQUIRES: write_mu_

  // Totals for the closing log line.
  std::atomic<uint64_t> n_reads_{0}, n_writes_{0}, n_other_{0}, n_errors_{0};
  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0};
  std::chrono::steady_clock::time_point started_;
};

}  // namespace strata
