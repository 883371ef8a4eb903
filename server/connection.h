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

#include <asio.hpp>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "formats/mutex.h"
#include "protocol/handshake.h"
#include "protocol/transmission.h"
#include "server/executor.h"
#include "server/exports.h"
#include "server/memory_budget.h"
#include "server/read_side.h"
#include "server/reply_batch.h"
#include "server/request_reader.h"
#include "server/tls.h"
#include "server/transport.h"

namespace strata {

class Server;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using Socket = asio::generic::stream_protocol::socket;

  // `tls`: the listener's credentials, null when its TLS mode is off.
  Connection(Server& server, Socket socket, uint64_t id, std::string peer, nbd::TlsPolicy policy,
             std::shared_ptr<const TlsCredentials> tls);
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
  // The export the client chose, null before it chose one. Network thread.
  const Export* chosen_export() const { return export_.get(); }

 private:
  struct Request;

  // Handshake phase (server/connection_handshake.cpp): a coroutine on the
  // io thread; true when the client chose an export and the connection
  // moves on to transmission.
  // The reader is the io thread's alone until the transmission threads
  // start, so these use it without read_mu_ (which a coroutine must not hold
  // across a suspension).
  asio::awaitable<bool> handshake();
  asio::awaitable<bool> async_read_exact(void* dst, size_t n) NO_THREAD_SAFETY_ANALYSIS;
  asio::awaitable<bool> async_discard(uint64_t n) NO_THREAD_SAFETY_ANALYSIS;
  // The client's bytes, through TLS once it started: 0 at end of stream, on
  // an error or when the socket was closed (timeout, stop).
  asio::awaitable<size_t> async_receive(std::span<uint8_t> space);
  asio::awaitable<bool> async_send(std::span<const uint8_t> bytes);
  asio::awaitable<bool> async_wait_tls();
  // After STARTTLS was acknowledged: drops what the client sent before, runs
  // the TLS handshake. False: close.
  asio::awaitable<bool> start_tls() NO_THREAD_SAFETY_ANALYSIS;
  // Remembers the refusal a step carries (failure_, for the handshake
  // metrics).
  void note_refusal(const nbd::Handshake::Step& step);
  void log_step(const nbd::Handshake::Step& step) const;
  void tls_failed();

  asio::awaitable<void> serve();
  void start_transmission();
  void stop(int how);  // how: SHUT_RD or SHUT_RDWR
  void log_closed() const;

  // Transmission threads.
  void worker_loop();
  // Reads a batch into `batch`: one request, waiting for it, plus those
  // already whole in the buffer. Clears `keep` when one may block long.
  size_t read_batch(std::span<Request> batch, ReplyBatch& out, bool& keep) REQUIRES(read_mu_);
  // Reads the next request that needs executing; refused ones are answered
  // in `out`. False: stop reading (then read_closed_ is set), or, with
  // may_block false, no further request is complete in the buffer.
  bool next_request(Request& r, ReplyBatch& out, bool may_block) REQUIRES(read_mu_);
  // Answers a refused request and skips its payload; false: stop reading.
  bool refuse(const nbd::Request& h, nbd::Verdict v, ReplyBatch& out) REQUIRES(read_mu_);
  bool take_bytes(uint64_t n, bool may_wait);
  void release_bytes(uint64_t n);
  // Executes batch[i] and the requests after it that can run together
  // with it (RequestExecutor::batchable): how many it executed.
  size_t execute_some(std::span<Request> batch, size_t i, ReplyBatch& out);
  void send(ReplyBatch& out) EXCLUDES(write_mu_);
  // Latency of requests [from, to) of a batch whose replies were just sent.
  void replied(std::span<const Request> batch, size_t from, size_t to);

  Server& server_;
  Socket socket_;
  int fd_;
  const uint64_t id_;
  const std::string peer_;
  const Limits& limits_;
  nbd::Handshake handshake_;
  // Held so that a reload that takes the export out of the registry leaves
  // it (and its image) open until this connection has drained.
  std::shared_ptr<Export> export_;
  nbd::Session session_;  // fixed when the handshake ends

  // The handshake coroutine, then the thread holding read_mu_.
  Mutex read_mu_;
  RequestReader reader_ GUARDED_BY(read_mu_);
  bool read_closed_ GUARDED_BY(read_mu_) = false;  // EOF, DISC, error or shutdown

  const std::shared_ptr<const TlsCredentials> tls_credentials_;
  std::unique_ptr<TlsSession> tls_;       // from STARTTLS; outlives transport_
  std::unique_ptr<Transport> transport_;  // from the start of transmission
  std::unique_ptr<RequestExecutor> executor_;

  // Bytes held by this connection's requests in flight (payloads and read
  // buffers); they are also counted in server_.memory().
  MemoryBudget budget_;

  std::vector<std::thread> threads_;
  std::atomic<uint32_t> running_{0};
  asio::steady_timer done_;  // cancelled when the last thread exits
  std::atomic<bool> stopping_{false};
  ReadSidePolicy read_side_;
  bool in_transmission_ = false;
  // Why the handshake would count as failed if it ended now; none while
  // nothing went wrong (a client that leaves, or aborts, did not fail).
  std::optional<HandshakeFailure> failure_;

  // Replies: one thread sends at a time, whole batches.
  Mutex write_mu_;
  bool dead_ GUARDED_BY(write_mu_) = false;

  // From the moment the client chose an export: this connection's counters,
  // attached to the export's metrics until the connection closes.
  std::shared_ptr<RequestCounters> stats_;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace strata
