// One client connection: the handshake, then the transmission phase.
//
// Threads: the handshake is a coroutine on the network io_context. Then the
// socket leaves Asio's reactor (so the io thread is not woken by traffic it
// does not serve) and the transmission phase runs on limits.workers threads
// of the connection's own (the model nbdkit uses): a thread takes the read
// mutex, reads a request through a shared 64 KiB buffer (so one recv often
// yields many requests) plus any further requests already complete in that
// buffer, releases the mutex, executes them on the export's BlockDevice and
// sends their replies together under the write mutex with one gather write
// (sendmsg). Replies go out as batches complete, out of order, as NBD
// allows, and no request is handed from thread to thread. While batches run
// without sleeping, the thread keeps the read mutex through execution and
// reads on (see worker_loop).
//
// Bounds: at most limits.workers batches execute at once per connection
// (the rest wait in the socket), and payload and read buffers are held up to
// limits.max_inflight_bytes per connection and limits.max_total_inflight_bytes
// for the server (server/memory_budget.h); a reader waits for room while
// holding the read mutex, which stops reading.
//
// Stopping (SIGTERM): requests being executed finish; every request read
// after that, including those the client sent before the signal that were
// not started yet, is answered ESHUTDOWN; then the connection closes once its
// replies are sent, or when the server's drain timeout calls abort().
#pragma once

#include <sys/uio.h>

#include <asio.hpp>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "protocol/handshake.h"
#include "server/exports.h"
#include "server/memory_budget.h"
#include "server/read_side.h"

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
  // Graceful stop: finish in-flight requests, answer the rest ESHUTDOWN,
  // then close. Call on the io thread.
  void shutdown();
  // Hard stop (the drain timed out): sends to a client that does not read
  // fail at once. Call on the io thread.
  void abort();
  uint64_t id() const { return id_; }

 private:
  struct Request;
  struct Replies;

  asio::awaitable<void> serve();
  asio::awaitable<bool> handshake();
  asio::awaitable<bool> async_read_exact(void* dst, size_t n);
  asio::awaitable<bool> async_discard(uint64_t n);
  void stop(int how);  // how: SHUT_RD or SHUT_RDWR

  // Transmission threads.
  void worker_loop();
  bool next_request(Request& r, Replies& out, bool may_block);  // REQUIRES: read_mu_ held
  bool buffered_request_ready() const;                          // REQUIRES: read_mu_ held
  // The length field of the next buffered request. REQUIRES: read_mu_ held and
  // buffered_request_ready().
  uint32_t buffered_request_length() const;
  bool recv_exact(void* dst, size_t n);  // REQUIRES: read_mu_ held
  bool recv_discard(uint64_t n);         // REQUIRES: read_mu_ held
  bool take_bytes(uint64_t n, bool may_wait);
  void release_bytes(uint64_t n);

  uint32_t validate(const nbd::Request& r) const;
  // Execution queues each reply in `out`; send(out) writes them all at once.
  void execute(Request& r, Replies& out);
  void execute_read(Request& r, Replies& out);
  void execute_block_status(Request& r, Replies& out);
  void reply_error(Replies& out, uint64_t cookie, uint32_t error, std::string_view message = {});
  // A failed read: ERROR_OFFSET naming the first failing byte when structured.
  void read_error(Replies& out, uint64_t cookie, int host_errno, uint64_t offset);
  void reply_ok(Replies& out, uint64_t cookie);
  void send(Replies& out);
  bool send(std::span<iovec> iov);

  Server& server_;
  Socket socket_;
  int fd_;
  const uint64_t id_;
  const std::string peer_;
  const Limits& limits_;
  nbd::Handshake handshake_;
  Export* export_ = nullptr;
  uint16_t tx_flags_ = 0;

  // Buffered reader: the handshake coroutine, then the thread holding read_mu_.
  std::mutex read_mu_;
  std::unique_ptr<uint8_t[]> rbuf_;
  size_t rpos_ = 0, rend_ = 0;
  bool read_closed_ = false;  // REQUIRES: read_mu_; EOF, DISC, error or shutdown

  // Bytes held by this connection's requests in flight (payloads and read
  // buffers); they are also counted in server_.memory().
  MemoryBudget budget_;

  std::vector<std::thread> threads_;
  std::atomic<uint32_t> running_{0};
  asio::steady_timer done_;  // cancelled when the last thread exits
  std::atomic<bool> stopping_{false};
  ReadSidePolicy read_side_;
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
