#include "server/connection.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <asio/experimental/as_tuple.hpp>
#include <cerrno>
#include <cstring>

#include "server/server.h"

namespace strata {

namespace {

// A client that does not read its replies for this long is dropped.
constexpr int kSendTimeoutMs = 120 * 1000;
// Requests one thread takes from the read buffer at a time, and the payload
// bytes after which it takes no more: their replies go out in one write.
constexpr size_t kBatch = 16;
constexpr uint64_t kBatchBytes = uint64_t{256} * 1024;

// A thread that waited this long for the read side while another thread
// held it (reading, or waiting for the client) is not needed: it leaves.
constexpr auto kIdleThreadExit = std::chrono::milliseconds(2000);

constexpr auto use_nothrow = asio::experimental::as_tuple(asio::use_awaitable);

// Voluntary context switches of the calling thread so far: a thread that
// slept in the kernel (waiting for the disk, a lock) made one.
uint64_t voluntary_switches() {
  rusage ru{};
  ::getrusage(RUSAGE_THREAD, &ru);
  return static_cast<uint64_t>(ru.ru_nvcsw);
}

}  // namespace

struct Connection::Request {
  nbd::Request hdr;
  IoBuffer payload;                               // WRITE data
  uint64_t accounted = 0;                         // bytes taken from the budgets
  std::chrono::steady_clock::time_point read_at;  // for its latency
};

Connection::Connection(Server& server, Socket socket, uint64_t id, std::string peer,
                       nbd::TlsPolicy policy, std::shared_ptr<const TlsCredentials> tls)
    : server_(server),
      socket_(std::move(socket)),
      fd_(socket_.native_handle()),
      id_(id),
      peer_(std::move(peer)),
      limits_(server.config().limits),
      handshake_(server.exports(), policy),
      tls_credentials_(std::move(tls)),
      budget_(limits_.max_inflight_bytes),
      done_(socket_.get_executor(), asio::steady_timer::time_point::max()),
      started_(std::chrono::steady_clock::now()) {}

// serve() joined every thread before the connection can go; what is left
// here is a coroutine destroyed before it finished (the io_context went),
// whose threads have all returned (each held the connection) but perhaps the
// calling one.
Connection::~Connection() {
  std::list<Thread> left;
  {
    MutexLock lock(threads_mu_);
    left.swap(threads_);
  }
  for (auto& t : left) {
    if (!t.thread.joinable()) continue;
    if (t.thread.get_id() == std::this_thread::get_id()) {
      t.thread.detach();
    } else {
      t.thread.join();
    }
  }
}

void Connection::shutdown() { stop(SHUT_RD); }

void Connection::abort() { stop(SHUT_RDWR); }

void Connection::stop(int how) {
  stopping_ = true;
  if (!in_transmission_) {
    std::error_code ec;
    socket_.close(ec);
    return;
  }
  // SHUT_RD: readers still get what the client has already sent (and answer
  // it ESHUTDOWN), then EOF. SHUT_RDWR also fails the sends that wait for a
  // client that does not read.
  transport_->shutdown(how);
  // Readers waiting for memory give up and answer ESHUTDOWN.
  budget_.wake_all();
  server_.memory().wake_all();
}

asio::awaitable<void> Connection::run(std::shared_ptr<Connection> self) { co_await self->serve(); }

asio::awaitable<void> Connection::serve() {
  spdlog::debug("conn {}: connected from {}", id_, peer_);
  const bool transmitting = co_await handshake();
  if (!transmitting && failure_ && !stopping_) server_.metrics().count_handshake_failure(*failure_);
  if (transmitting) {
    start_transmission();
    while (running_.load() > 0) co_await done_.async_wait(use_nothrow);
    join_threads();
    if (!export_->caps.read_only && stats_->writes() > 0) export_->device->flush();
  }
  std::error_code ec;
  if (in_transmission_ && !socket_.is_open()) {
    if (tls_) {
      // close_notify, if the socket takes it at once: never wait for a
      // client that does not read.
      ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) | O_NONBLOCK);
      tls_->bye();
    }
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
  } else {
    socket_.shutdown(asio::socket_base::shutdown_both, ec);
    socket_.close(ec);
  }
  log_closed();
  if (stats_) export_->metrics->detach(stats_);
  // The export may be retiring (a reload took it out): the server closes its
  // image once no connection holds it.
  executor_.reset();
  export_.reset();
  server_.connection_closed(id_);
}

void Connection::start_transmission() {
  // From here on the socket is used with plain blocking calls by the
  // connection's threads. Asio lets go of it, so that its reactor is not
  // woken for every request that arrives.
  std::error_code rec;
  int fd = socket_.release(rec);
  if (!rec)
    fd_ = fd;
  else
    spdlog::warn("conn {}: cannot take the socket from the reactor: {}", id_, rec.message());
  if (tls_) {
    transport_ = std::make_unique<TlsTransport>(*tls_, fd_, kSendTimeoutMs);
  } else {
    transport_ = std::make_unique<SocketTransport>(fd_, kSendTimeoutMs);
  }
  executor_ = std::make_unique<RequestExecutor>(id_, *export_->device, export_->caps.has_extents,
                                                session_, *stats_, export_->buffer_alignment,
                                                transport_->can_send_files());
  in_transmission_ = true;
  server_.io_threads().connection_started();
  MutexLock lock(threads_mu_);
  if (!start_thread()) stop(SHUT_RDWR);  // serve() finds no thread running and closes
}

bool Connection::start_thread() {
  Thread& t = threads_.emplace_back();
  t.id = next_thread_id_++;
  running_.fetch_add(1);
  try {
    t.thread = std::thread([this, self = shared_from_this(), id = t.id] {
      if (!worker_loop()) {
        // Left as a spare: the network thread joins it.
        asio::post(socket_.get_executor(), [self, id] { self->reap(id); });
        return;
      }
      bool last = false;
      {
        MutexLock lock(threads_mu_);
        last = running_.fetch_sub(1) == 1;
      }
      if (last) asio::post(socket_.get_executor(), [self] { self->done_.cancel(); });
    });
  } catch (const std::system_error& e) {
    spdlog::warn("conn {}: cannot start a thread: {}", id_, e.what());
    running_.fetch_sub(1);
    threads_.pop_back();
    return false;
  }
  return true;
}

void Connection::add_thread_if_allowed() {
  MutexLock lock(threads_mu_);
  const auto held = static_cast<uint32_t>(threads_.size());
  if (held >= limits_.workers || stopping_) return;
  IoThreads& pool = server_.io_threads();
  if (!pool.try_take_extra(held - 1)) return;
  if (!start_thread()) pool.give_back_extra();
}

bool Connection::take_read_side() NO_THREAD_SAFETY_ANALYSIS {
  read_waiters_.fetch_add(1);
  bool taken = false;
  // Over the fair share (more connections came): leave, unless the read side
  // is free and nobody else would read.
  if (running_.load() - 1 > server_.io_threads().fair_share()) {
    taken = read_mu_.try_lock();
    if (!taken && leave_if_spare()) {
      read_waiters_.fetch_sub(1);
      return false;
    }
  }
  while (!taken) {
    taken = read_mu_.try_lock_for(kIdleThreadExit);
    if (!taken && leave_if_spare()) break;
  }
  read_waiters_.fetch_sub(1);
  return taken;
}

bool Connection::leave_if_spare() {
  MutexLock lock(threads_mu_);
  if (running_.load() <= 1) return false;
  running_.fetch_sub(1);
  return true;
}

void Connection::reap(uint64_t id) {
  std::list<Thread> gone;
  {
    MutexLock lock(threads_mu_);
    auto it = std::find_if(threads_.begin(), threads_.end(),
                           [id](const Thread& t) { return t.id == id; });
    if (it == threads_.end()) return;  // serve() joined it already
    gone.splice(gone.end(), threads_, it);
  }
  gone.front().thread.join();
  server_.io_threads().give_back_extra();
}

void Connection::join_threads() {
  std::list<Thread> all;
  {
    MutexLock lock(threads_mu_);
    all.swap(threads_);
  }
  for (auto& t : all) t.thread.join();
  if (!all.empty()) server_.io_threads().give_back_extra(static_cast<uint32_t>(all.size() - 1));
  server_.io_threads().connection_ended();
}

void Connection::log_closed() const {
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  // A connection that never reached an export has no counters: all zero.
  const RequestCounters none;
  const RequestCounters& c = stats_ ? *stats_ : none;
  const uint64_t reads = c.count(Command::read), writes = c.writes();
  spdlog::info(
      "conn {}: closed peer={} export='{}' reads={} writes={} other={} errors={} "
      "bytes_read={} bytes_written={} seconds={:.3f}",
      id_, peer_, export_ ? export_->config.name : "", reads, writes,
      c.total_requests() - reads - writes, c.total_errors(), value(c.bytes_read),
      value(c.bytes_written), secs);
}

// Takes n bytes from this connection's budget and from the server's.
// may_wait: the first request of a batch (its thread holds no bytes) waits
// for room, and false then means the connection is stopping; the others
// only take what is free.
bool Connection::take_bytes(uint64_t n, bool may_wait) {
  MemoryBudget& total = server_.memory();
  if (!(may_wait ? budget_.acquire(n, stopping_) : budget_.try_acquire(n))) return false;
  if (may_wait ? total.acquire(n, stopping_) : total.try_acquire(n)) return true;
  budget_.release(n);
  return false;
}

void Connection::release_bytes(uint64_t n) {
  server_.memory().release(n);
  budget_.release(n);
}

bool Connection::next_request(Request& req, ReplyBatch& out, bool may_block) {
  using namespace nbd;
  for (;;) {
    if (read_closed_) return false;
    uint8_t hdr[kRequestSize];
    if (!reader_.read_exact(*transport_, hdr, sizeof hdr)) {
      read_closed_ = true;
      return false;
    }
    req.hdr = decode_request(std::span<const uint8_t, kRequestSize>(hdr));
    const nbd::Request& h = req.hdr;
    Verdict v = judge_request(h, session_, stopping_);
    if (v.next == Next::kClose || v.next == Next::kDisconnect) {
      if (v.next == Next::kClose)
        spdlog::warn("conn {}: bad request magic {:#x}, closing", id_, h.magic);
      else
        spdlog::debug("conn {}: client disconnect", id_);
      read_closed_ = true;
      return false;
    }
    req.accounted = 0;
    if (v.next == Next::kExecute) {
      const uint64_t n = buffer_length(h);
      if (take_bytes(n, may_block)) {
        req.accounted = n;
      } else if (may_block) {
        v = {Next::kRefuse, kESHUTDOWN};  // only a shutdown ends the wait for memory
      } else {
        // No room: leave the request, whole in the buffer, for the next batch.
        reader_.unread_request_header();
        return false;
      }
    }
    if (v.next != Next::kExecute) {
      if (!refuse(h, v, out)) return false;
      if (!reader_.request_buffered()) {
        if (!may_block) return false;
        send(out);  // before waiting for the next request
      }
      continue;
    }
    if (h.type == kCmdWrite) {
      req.payload = make_io_buffer(h.length, export_->buffer_alignment);
      if (!reader_.read_exact(*transport_, req.payload.get(), h.length)) {
        spdlog::warn("conn {}: disconnected in the middle of a write payload", id_);
        release_bytes(req.accounted);
        read_closed_ = true;
        return false;
      }
    }
    req.read_at = std::chrono::steady_clock::now();
    bump(stats_->in_flight);
    bump(stats_->in_flight_bytes, req.accounted);
    return true;
  }
}

bool Connection::refuse(const nbd::Request& h, nbd::Verdict v, ReplyBatch& out) {
  spdlog::debug("conn {}: request type={} offset={} length={} flags={:#x} refused: error {}", id_,
                h.type, h.offset, h.length, h.flags, v.error);
  if (v.next == nbd::Next::kRefuseLast) {
    executor_->refuse(h, v.error, "write payload too large", out);
    read_closed_ = true;
    return false;
  }
  if (!reader_.discard(*transport_, nbd::payload_length(h))) {
    read_closed_ = true;
    return false;
  }
  executor_->refuse(h, v.error,
                    v.error == nbd::kESHUTDOWN ? "server shutting down" : "request refused", out);
  return true;
}

size_t Connection::read_batch(std::span<Request> batch, ReplyBatch& out, bool& keep) {
  size_t n = 0;
  uint64_t bytes = 0;
  while (n < batch.size() &&
         (n == 0 || (reader_.request_buffered() &&
                     bytes + reader_.buffered_request_length() <= kBatchBytes)) &&
         next_request(batch[n], out, n == 0)) {
    bytes += batch[n].hdr.length;
    if (ReadSidePolicy::may_block_long(batch[n].hdr)) keep = false;
    ++n;
  }
  return n;
}

// A thread takes one request, plus further ones already complete in the read
// buffer (up to kBatch requests or kBatchBytes of payload): these cost no
// system call to read, running them here saves waking another thread for
// each, and their replies leave together in one write.
//
// Whether the thread keeps the read side while it executes, and reads on
// after replying, is read_side_'s call (server/read_side.h). That hold spans
// loop iterations, which the thread-safety analysis cannot follow: it checks
// read_batch, which REQUIRES the read side.
//
// A thread that hands the read side over while no other thread waits for it
// starts another (add_thread_if_allowed): requests read meanwhile would
// otherwise wait for this batch.
bool Connection::worker_loop() NO_THREAD_SAFETY_ANALYSIS {
  std::array<Request, kBatch> batch;
  ReplyBatch out;
  out.reserve(kBatch);
  bool holding = false;
  for (;;) {
    if (!holding && !take_read_side()) return false;
    bool keep = read_side_.keep();
    const size_t n = read_batch(batch, out, keep);
    holding = n > 0 && keep;
    if (!holding) {
      const bool nobody_waits = read_waiters_.load() == 0;
      read_mu_.unlock();
      if (n > 0 && nobody_waits) add_thread_if_allowed();
    }
    const uint64_t switches = voluntary_switches();
    size_t unsent = 0;  // batch[unsent..i) have replies waiting in `out`
    for (size_t i = 0; i < n;) {
      // A flush can take long: the replies ready so far do not wait for it.
      if (batch[i].hdr.type == nbd::kCmdFlush) {
        send(out);
        replied(batch, unsent, i);
        unsent = i;
      }
      i += execute_some(std::span(batch).first(n), i, out);
    }
    read_side_.batch_done(voluntary_switches() != switches);
    send(out);
    replied(batch, unsent, n);
    uint64_t held = 0;
    for (size_t i = 0; i < n; ++i) held += batch[i].accounted;
    release_bytes(held);
    stats_->in_flight.fetch_sub(n, std::memory_order_relaxed);
    stats_->in_flight_bytes.fetch_sub(held, std::memory_order_relaxed);
    if (n == 0) return true;
  }
}

size_t Connection::execute_some(std::span<Request> batch, size_t i, ReplyBatch& out) {
  size_t end = i;
  while (end < batch.size() && executor_->batchable(batch[end].hdr)) ++end;
  if (end - i < 2) {
    executor_->execute(batch[i].hdr, batch[i].payload.get(), out);
    end = i + 1;
  } else {
    std::array<RequestExecutor::BatchItem, kBatch> items;
    for (size_t k = i; k < end; ++k) items[k - i] = {&batch[k].hdr, batch[k].payload.get()};
    executor_->execute_batch(std::span(items).first(end - i), out);
  }
  for (size_t k = i; k < end; ++k) batch[k].payload.reset();
  return end - i;
}

void Connection::send(ReplyBatch& out) {
  if (out.empty()) return;
  bool sent = false;
  {
    MutexLock lock(write_mu_);
    if (!dead_) {
      // A batch without file pieces stays one gather write.
      sent = out.files.empty() ? transport_->send_all(out.iov)
                               : transport_->send_with_files(out.iov, out.files);
      if (!sent) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {  // the send timeout expired
          spdlog::warn("conn {}: client stopped reading replies, dropping it", id_);
        } else if (errno != EPIPE && errno != ECONNRESET) {
          spdlog::warn("conn {}: send failed: {}", id_, std::strerror(errno));
        }
        dead_ = true;
        transport_->shutdown(SHUT_RDWR);  // the reader sees EOF and the connection ends
      }
    }
  }
  if (sent) {
    bump(stats_->bytes_read, out.read_bytes);
    bump(stats_->read_copy_free_bytes, out.copy_free_bytes);
  }
  out.clear();
}

void Connection::replied(std::span<const Request> batch, size_t from, size_t to) {
  if (from == to) return;
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = from; i < to; ++i) {
    stats_->record_latency(command_of(batch[i].hdr.type), now - batch[i].read_at);
  }
}

}  // namespace strata
