#include "server/connection.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <asio/experimental/as_tuple.hpp>
#include <cerrno>
#include <cstring>
#include <vector>

#include "formats/endian.h"
#include "server/server.h"

namespace strata {

namespace {

constexpr size_t kReadBufferSize = size_t{64} * 1024;
// Reads at least this long look for holes so sparse regions send no zeros.
constexpr uint32_t kSparseReadThreshold = 64 * 1024;
// A WRITE payload we refuse is read and dropped up to this size, else we close.
constexpr uint64_t kMaxDiscard = 2ull * kMaxRequestBytes;
// A client that does not read its replies for this long is dropped.
constexpr int kSendTimeoutMs = 120 * 1000;
// Requests one thread takes from the read buffer at a time, and the payload
// bytes after which it takes no more: their replies go out in one write.
constexpr size_t kBatch = 16;
constexpr uint64_t kBatchBytes = uint64_t{256} * 1024;

constexpr auto use_nothrow = asio::experimental::as_tuple(asio::use_awaitable);

}  // namespace

struct Connection::Request {
  nbd::Request hdr;
  std::unique_ptr<std::byte[]> payload;  // WRITE data
  uint64_t accounted = 0;                // bytes taken from the budgets
};

// The replies of one batch, sent together with one gather write. The iovecs
// point into `headers` and `data`, whose heap buffers do not move.
struct Connection::Replies {
  std::vector<iovec> iov;
  std::vector<nbd::Bytes> headers;
  std::vector<std::unique_ptr<std::byte[]>> data;
  uint64_t read_bytes = 0;  // payload bytes of successful reads, counted once sent

  void add_header(nbd::Bytes h) {
    headers.push_back(std::move(h));
    iov.push_back({headers.back().data(), headers.back().size()});
  }
  void add_data(std::byte* p, size_t n) { iov.push_back({p, n}); }
  bool empty() const { return iov.empty(); }
  void clear() {
    iov.clear();
    headers.clear();
    data.clear();
    read_bytes = 0;
  }
};

Connection::Connection(Server& server, Socket socket, uint64_t id, std::string peer)
    : server_(server),
      socket_(std::move(socket)),
      fd_(socket_.native_handle()),
      id_(id),
      peer_(std::move(peer)),
      limits_(server.config().limits),
      handshake_(server.exports()),
      rbuf_(new uint8_t[kReadBufferSize]),
      budget_(limits_.max_inflight_bytes),
      done_(socket_.get_executor(), asio::steady_timer::time_point::max()),
      started_(std::chrono::steady_clock::now()) {}

Connection::~Connection() {
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
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
  ::shutdown(fd_, how);
  // Readers waiting for memory give up and answer ESHUTDOWN.
  budget_.wake_all();
  server_.memory().wake_all();
}

asio::awaitable<bool> Connection::async_discard(uint64_t n) {
  uint64_t have = std::min<uint64_t>(n, rend_ - rpos_);
  rpos_ += have;
  n -= have;
  while (n > 0) {
    auto [ec, got] =
        co_await socket_.async_read_some(asio::buffer(rbuf_.get(), kReadBufferSize), use_nothrow);
    if (ec) co_return false;
    size_t used = static_cast<size_t>(std::min<uint64_t>(got, n));
    rpos_ = used;  // bytes past the payload stay buffered for what follows
    rend_ = got;
    n -= used;
  }
  co_return true;
}

asio::awaitable<bool> Connection::async_read_exact(void* dst, size_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  size_t have = std::min(n, rend_ - rpos_);
  if (have) std::memcpy(out, rbuf_.get() + rpos_, have);
  rpos_ += have;
  out += have;
  n -= have;
  if (n == 0) co_return true;
  if (n >= kReadBufferSize / 2) {
    auto [ec, got] = co_await asio::async_read(socket_, asio::buffer(out, n), use_nothrow);
    co_return !ec;
  }
  rpos_ = rend_ = 0;
  while (rend_ < n) {
    auto [ec, got] = co_await socket_.async_read_some(
        asio::buffer(rbuf_.get() + rend_, kReadBufferSize - rend_), use_nothrow);
    if (ec) co_return false;
    rend_ += got;
  }
  std::memcpy(out, rbuf_.get(), n);
  rpos_ = n;
  co_return true;
}

asio::awaitable<void> Connection::run(std::shared_ptr<Connection> self) { co_await self->serve(); }

asio::awaitable<void> Connection::serve() {
  spdlog::debug("conn {}: connected from {}", id_, peer_);
  if (co_await handshake()) {
    in_transmission_ = true;
    // From here on the socket is used with plain blocking calls by the
    // connection's threads; a client that stops reading replies for
    // kSendTimeoutMs is dropped. Asio lets go of it, so that its reactor is
    // not woken for every request that arrives.
    std::error_code rec;
    int fd = socket_.release(rec);
    if (!rec)
      fd_ = fd;
    else
      spdlog::warn("conn {}: cannot take the socket from the reactor: {}", id_, rec.message());
    int fl = ::fcntl(fd_, F_GETFL);
    if (fl >= 0) ::fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK);
    timeval tv{kSendTimeoutMs / 1000, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    uint32_t n = std::max<uint32_t>(1, limits_.workers);
    running_ = n;
    auto self = shared_from_this();
    for (uint32_t i = 0; i < n; ++i) {
      threads_.emplace_back([this, self] {
        worker_loop();
        if (running_.fetch_sub(1) == 1) {
          asio::post(socket_.get_executor(), [self] { self->done_.cancel(); });
        }
      });
    }
    while (running_.load() > 0) co_await done_.async_wait(use_nothrow);
    for (auto& t : threads_) t.join();
    threads_.clear();
    if (!export_->caps.read_only && n_writes_.load() > 0) export_->device->flush();
  }
  std::error_code ec;
  if (in_transmission_ && !socket_.is_open()) {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
  } else {
    socket_.shutdown(asio::socket_base::shutdown_both, ec);
    socket_.close(ec);
  }
  auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  spdlog::info(
      "conn {}: closed peer={} export='{}' reads={} writes={} other={} errors={} "
      "bytes_read={} bytes_written={} seconds={:.3f}",
      id_, peer_, export_ ? export_->config.name : "", n_reads_.load(), n_writes_.load(),
      n_other_.load(), n_errors_.load(), bytes_read_.load(), bytes_written_.load(), secs);
  server_.connection_closed(id_);
}

asio::awaitable<bool> Connection::handshake() {
  auto timer = std::make_shared<asio::steady_timer>(
      socket_.get_executor(), std::chrono::milliseconds(limits_.handshake_timeout_ms));
  timer->async_wait([this, self = shared_from_this()](std::error_code ec) {
    if (!ec && !in_transmission_) {
      spdlog::warn("conn {}: handshake timed out", id_);
      std::error_code ignored;
      socket_.close(ignored);
    }
  });
  struct CancelTimer {
    std::shared_ptr<asio::steady_timer> t;
    // cancel() reports failure by throwing; a destructor must not, and a
    // timer that could not be cancelled only fires into a finished handshake.
    ~CancelTimer() {
      try {
        t->cancel();
      } catch (...) {
      }
    }
  } cancel_timer{timer};

  auto greeting = handshake_.greeting();
  auto [ec, n] = co_await asio::async_write(socket_, asio::buffer(greeting), use_nothrow);
  if (ec) co_return false;
  uint8_t flags_buf[4];
  if (!co_await async_read_exact(flags_buf, 4)) co_return false;
  std::string why;
  if (!handshake_.accept_client_flags(load_be32(flags_buf), &why)) {
    spdlog::warn("conn {}: {}", id_, why);
    co_return false;
  }
  for (;;) {
    uint8_t hdr[nbd::kOptionHeaderSize];
    if (!co_await async_read_exact(hdr, sizeof hdr)) co_return false;
    auto opt = nbd::decode_option_header(std::span<const uint8_t, nbd::kOptionHeaderSize>(hdr));
    if (opt.magic != nbd::kOptMagic) {
      spdlog::warn("conn {}: bad option magic {:#x}", id_, opt.magic);
      co_return false;
    }
    nbd::Handshake::Step step;
    if (opt.length > nbd::Handshake::kMaxOptionLength) {
      step = handshake_.on_oversized_option(opt.option, opt.length);
      if (step.action == nbd::Handshake::Action::kClose) {
        spdlog::warn("conn {}: {}, closing", id_, step.note);
        co_return false;
      }
      if (!co_await async_discard(opt.length)) co_return false;
    } else {
      std::vector<uint8_t> data(opt.length);
      if (!co_await async_read_exact(data.data(), data.size())) co_return false;
      step = handshake_.on_option(opt.option, data);
    }
    if (!step.note.empty()) spdlog::debug("conn {}: {}", id_, step.note);
    if (!step.reply.empty()) {
      auto [wec, wn] = co_await asio::async_write(socket_, asio::buffer(step.reply), use_nothrow);
      if (wec) co_return false;
    }
    if (step.action == nbd::Handshake::Action::kClose) co_return false;
    if (step.action == nbd::Handshake::Action::kTransmit) {
      export_ = server_.exports().by_view(step.export_view);
      tx_flags_ = handshake_.tx_flags(*step.export_view);
      spdlog::info("conn {}: peer={} export='{}' structured={} flags={:#x}", id_, peer_,
                   export_->config.name, handshake_.structured_replies(), tx_flags_);
      co_return !stopping_;
    }
  }
}

uint32_t Connection::validate(const nbd::Request& r) const {
  using namespace nbd;
  const uint16_t known =
      kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
  if (r.flags & ~known) return kEINVAL;
  const bool ro = export_->caps.read_only;
  const uint64_t size = export_->view.size;
  const bool in_range = r.offset <= size && r.length <= size - r.offset;
  switch (r.type) {
    case kCmdRead:
    case kCmdCache:
      if (r.flags & (kCmdFlagNoHole | kCmdFlagReqOne | kCmdFlagFastZero)) return kEINVAL;
      if ((r.flags & kCmdFlagDf) && (r.type != kCmdRead || !handshake_.structured_replies())) {
        return kEINVAL;
      }
      if (r.type == kCmdRead && r.length > kMaxRequestBytes) return kEINVAL;
      return in_range ? 0 : out_of_range_error(r.type);
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes: {
      uint16_t allowed = kCmdFlagFua;
      if (r.type == kCmdWriteZeroes) allowed |= kCmdFlagNoHole | kCmdFlagFastZero;
      if (r.flags & ~allowed) return kEINVAL;
      if (r.type == kCmdWrite && r.length > kMaxRequestBytes) return kEINVAL;
      if (ro) return kEPERM;
      if (r.type == kCmdTrim && !(tx_flags_ & kTxSendTrim)) return kEINVAL;
      if (r.type == kCmdWriteZeroes && !(tx_flags_ & kTxSendWriteZeroes)) return kEINVAL;
      if ((r.flags & kCmdFlagFastZero) && !(tx_flags_ & kTxSendFastZero)) return kEINVAL;
      return in_range ? 0 : out_of_range_error(r.type);
    }
    case kCmdFlush:
      if (r.flags & ~kCmdFlagFua) return kEINVAL;
      return 0;
    case kCmdBlockStatus:
      if (r.flags & ~(kCmdFlagReqOne | kCmdFlagFua)) return kEINVAL;
      if (!handshake_.meta_base_allocation() && !handshake_.meta_allocation_depth()) {
        return kEINVAL;
      }
      if (r.length == 0) return kEINVAL;
      return in_range ? 0 : out_of_range_error(r.type);
    default:
      return kEINVAL;
  }
}

bool Connection::recv_exact(void* dst, size_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  for (;;) {
    size_t have = std::min(n, rend_ - rpos_);
    if (have) std::memcpy(out, rbuf_.get() + rpos_, have);
    rpos_ += have;
    out += have;
    n -= have;
    if (n == 0) return true;
    // Large remainders go straight to their buffer; small ones refill ours.
    bool direct = n >= kReadBufferSize / 2;
    if (!direct) rpos_ = rend_ = 0;
    ssize_t got = direct ? ::recv(fd_, out, n, 0) : ::recv(fd_, rbuf_.get(), kReadBufferSize, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, -1) >= 0 || errno == EINTR) continue;
      }
      return false;
    }
    if (got == 0) return false;
    if (direct) {
      out += got;
      n -= static_cast<size_t>(got);
      if (n == 0) return true;
    } else {
      rend_ = static_cast<size_t>(got);
    }
  }
}

bool Connection::recv_discard(uint64_t n) {
  std::vector<uint8_t> sink(std::min<uint64_t>(n, 1 << 20));
  while (n > 0) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(n, sink.size()));
    if (!recv_exact(sink.data(), k)) return false;
    n -= k;
  }
  return true;
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

// Reads and validates the next request that needs executing; queues the
// replies to refused ones in `out`. False: stop reading (EOF, DISC, protocol
// error: then read_closed_ is set), or, with may_block false, no further
// request is complete in the buffer.
bool Connection::next_request(Request& req, Replies& out, bool may_block) {
  using namespace nbd;
  for (;;) {
    if (read_closed_) return false;
    uint8_t hdr[kRequestSize];
    if (!recv_exact(hdr, sizeof hdr)) {
      read_closed_ = true;
      return false;
    }
    req.hdr = decode_request(std::span<const uint8_t, kRequestSize>(hdr));
    const nbd::Request& h = req.hdr;
    if (h.magic != kRequestMagic) {
      spdlog::warn("conn {}: bad request magic {:#x}, closing", id_, h.magic);
      read_closed_ = true;
      return false;
    }
    if (h.type == kCmdDisc) {
      spdlog::debug("conn {}: client disconnect", id_);
      read_closed_ = true;
      return false;
    }
    // Once stopping, every request still arriving is answered ESHUTDOWN.
    uint32_t err = stopping_ ? kESHUTDOWN : validate(h);
    req.accounted = 0;
    if (!err) {
      const uint64_t n = (h.type == kCmdWrite || h.type == kCmdRead) ? h.length : 0;
      if (take_bytes(n, may_block)) {
        req.accounted = n;
      } else if (may_block) {
        err = kESHUTDOWN;  // only a shutdown ends the wait for memory
      } else {
        // No room: leave the request, whole in the buffer, for the next batch.
        rpos_ -= kRequestSize;
        return false;
      }
    }
    if (err) {
      ++n_errors_;
      spdlog::debug("conn {}: request type={} offset={} length={} flags={:#x} refused: error {}",
                    id_, h.type, h.offset, h.length, h.flags, err);
      if (h.type == kCmdWrite) {
        if (h.length > kMaxDiscard) {
          reply_error(out, h.cookie, err, "write payload too large");
          read_closed_ = true;
          return false;
        }
        if (!recv_discard(h.length)) {
          read_closed_ = true;
          return false;
        }
      }
      reply_error(out, h.cookie, err,
                  err == kESHUTDOWN ? "server shutting down" : "request refused");
      if (!buffered_request_ready()) {
        if (!may_block) return false;
        send(out);  // before waiting for the next request
      }
      continue;
    }
    if (h.type == kCmdWrite) {
      req.payload = std::make_unique_for_overwrite<std::byte[]>(std::max<uint32_t>(h.length, 1));
      if (!recv_exact(req.payload.get(), h.length)) {
        spdlog::warn("conn {}: disconnected in the middle of a write payload", id_);
        release_bytes(req.accounted);
        read_closed_ = true;
        return false;
      }
    }
    return true;
  }
}

uint32_t Connection::buffered_request_length() const { return load_be32(rbuf_.get() + rpos_ + 24); }

bool Connection::buffered_request_ready() const {
  if (rend_ - rpos_ < nbd::kRequestSize) return false;
  const uint8_t* p = rbuf_.get() + rpos_;
  if (load_be16(p + 6) != nbd::kCmdWrite) return true;
  return rend_ - rpos_ >= nbd::kRequestSize + load_be32(p + 24);
}

namespace {

// Voluntary context switches of the calling thread so far: a thread that
// slept in the kernel (waiting for the disk, a lock) made one.
uint64_t voluntary_switches() {
  rusage ru{};
  ::getrusage(RUSAGE_THREAD, &ru);
  return static_cast<uint64_t>(ru.ru_nvcsw);
}

}  // namespace

void Connection::worker_loop() {
  // A thread takes one request, plus further ones already complete in the
  // read buffer (up to kBatch requests or kBatchBytes of payload): these cost
  // no system call to read, running them here saves waking another thread for
  // each, and their replies leave together in one write.
  //
  // Whether the thread keeps the read side while it executes, and reads on
  // after replying, is read_side_'s call (server/read_side.h).
  std::array<Request, kBatch> batch;
  Replies out;
  out.iov.reserve(2 * kBatch);
  out.headers.reserve(kBatch);
  out.data.reserve(kBatch);
  std::unique_lock lock(read_mu_, std::defer_lock);
  for (;;) {
    size_t n = 0;
    if (!lock.owns_lock()) lock.lock();
    uint64_t bytes = 0;
    bool keep = read_side_.keep();
    while (n < kBatch &&
           (n == 0 ||
            (buffered_request_ready() && bytes + buffered_request_length() <= kBatchBytes)) &&
           next_request(batch[n], out, n == 0)) {
      bytes += batch[n].hdr.length;
      if (ReadSidePolicy::may_block_long(batch[n].hdr)) keep = false;
      ++n;
    }
    if (n == 0 || !keep) lock.unlock();
    uint64_t switches = voluntary_switches();
    for (size_t i = 0; i < n; ++i) {
      // A flush can take long: the replies ready so far do not wait for it.
      if (batch[i].hdr.type == nbd::kCmdFlush) send(out);
      execute(batch[i], out);
      batch[i].payload.reset();
    }
    read_side_.batch_done(voluntary_switches() != switches);
    send(out);
    uint64_t held = 0;
    for (size_t i = 0; i < n; ++i) held += batch[i].accounted;
    release_bytes(held);
    if (n == 0) break;
  }
}

void Connection::execute(Request& r, Replies& out) {
  using namespace nbd;
  const auto& h = r.hdr;
  BlockDevice& dev = *export_->device;
  int e = 0;
  switch (h.type) {
    case kCmdRead:
      ++n_reads_;
      return execute_read(r, out);
    case kCmdWrite:
      ++n_writes_;
      e = dev.write(h.offset, {r.payload.get(), h.length}, h.flags & kCmdFlagFua);
      if (!e) bytes_written_ += h.length;
      break;
    case kCmdFlush:
      ++n_other_;
      e = dev.flush();
      break;
    case kCmdTrim:
      ++n_other_;
      e = dev.trim(h.offset, h.length, h.flags & kCmdFlagFua);
      break;
    case kCmdWriteZeroes:
      ++n_writes_;
      e = dev.write_zeroes(h.offset, h.length,
                           ZeroFlags{.may_trim = !(h.flags & kCmdFlagNoHole),
                                     .fast_only = (h.flags & kCmdFlagFastZero) != 0,
                                     .fua = (h.flags & kCmdFlagFua) != 0});
      break;
    case kCmdCache:
      ++n_other_;
      e = dev.cache(h.offset, h.length);
      break;
    case kCmdBlockStatus:
      ++n_other_;
      return execute_block_status(r, out);
  }
  if (e) {
    if (!(h.type == kCmdWriteZeroes && e == ENOTSUP)) {
      spdlog::warn("conn {}: command {} offset={} length={} failed: {}", id_, h.type, h.offset,
                   h.length, std::strerror(e));
    }
    ++n_errors_;
    reply_error(out, h.cookie, errno_to_nbd(e), std::strerror(e));
  } else {
    reply_ok(out, h.cookie);
  }
}

void Connection::execute_read(Request& r, Replies& out) {
  using namespace nbd;
  const auto& h = r.hdr;
  BlockDevice& dev = *export_->device;
  auto owned = std::make_unique_for_overwrite<std::byte[]>(std::max<uint32_t>(h.length, 1));
  std::byte* buf = owned.get();
  const bool structured = handshake_.structured_replies();

  // Sparse-aware structured read: holes become OFFSET_HOLE chunks.
  std::vector<Extent> ext;
  if (structured && !(h.flags & kCmdFlagDf) && h.length >= kSparseReadThreshold &&
      export_->caps.has_extents && dev.extents(h.offset, h.length, ext) == 0 &&
      std::any_of(ext.begin(), ext.end(), [](const Extent& x) { return x.zero; })) {
    struct Piece {
      Bytes header;
      uint64_t pos;
      uint32_t len;
      bool data;
    };
    std::vector<Piece> pieces;
    uint64_t pos = 0;
    for (size_t i = 0; i < ext.size() && pos < h.length; ++i) {
      uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(ext[i].length, h.length - pos));
      bool last = pos + len >= h.length;
      Bytes header;
      if (ext[i].zero) {
        append_chunk_hole(header, h.cookie, h.offset + pos, len, last);
      } else {
        if (int e = dev.read(h.offset + pos, {buf + pos, len})) {
          ++n_errors_;
          read_error(out, h.cookie, e, h.offset + pos);
          return;
        }
        append_chunk_data_header(header, h.cookie, h.offset + pos, len, last);
      }
      pieces.push_back({std::move(header), pos, len, !ext[i].zero});
      pos += len;
    }
    if (pos == h.length) {
      for (auto& p : pieces) {
        out.add_header(std::move(p.header));
        if (p.data) out.add_data(buf + p.pos, p.len);
      }
      out.data.push_back(std::move(owned));
      out.read_bytes += h.length;
      return;
    }
  }

  if (int e = dev.read(h.offset, {buf, h.length})) {
    ++n_errors_;
    read_error(out, h.cookie, e, h.offset);
    return;
  }
  if (structured && h.length == 0) {
    reply_ok(out, h.cookie);
    return;
  }
  Bytes header;
  if (structured) {
    append_chunk_data_header(header, h.cookie, h.offset, h.length, true);
  } else {
    header.resize(kSimpleReplySize);
    encode_simple_reply(header.data(), 0, h.cookie);
  }
  out.add_header(std::move(header));
  out.add_data(buf, h.length);
  out.data.push_back(std::move(owned));
  out.read_bytes += h.length;
}

void Connection::execute_block_status(Request& r, Replies& out) {
  using namespace nbd;
  const auto& h = r.hdr;
  std::vector<Extent> ext;
  int e = export_->device->extents(h.offset, h.length, ext);
  if (e == 0 && ext.empty()) e = EIO;
  if (e) {
    ++n_errors_;
    reply_error(out, h.cookie, errno_to_nbd(e), std::strerror(e));
    return;
  }
  const bool one = h.flags & kCmdFlagReqOne;
  auto describe = [&](auto flags_of) {
    std::vector<BlockStatusDescriptor> d;
    uint64_t pos = 0;
    for (const auto& x : ext) {
      if (pos >= h.length) break;
      uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(x.length, h.length - pos));
      uint32_t flags = flags_of(x);
      if (!d.empty() && d.back().flags == flags) {
        d.back().length += len;
      } else {
        if (one && !d.empty()) break;
        d.push_back({len, flags});
      }
      pos += len;
    }
    return d;
  };
  Bytes reply;
  const bool base = handshake_.meta_base_allocation();
  const bool depth = handshake_.meta_allocation_depth();
  if (base) {
    auto d = describe(
        [](const Extent& x) { return (x.hole ? kStateHole : 0u) | (x.zero ? kStateZero : 0u); });
    append_chunk_block_status(reply, h.cookie, kMetaIdBaseAllocation, d, !depth);
  }
  if (depth) {
    auto d = describe([](const Extent& x) { return x.depth; });
    append_chunk_block_status(reply, h.cookie, kMetaIdAllocationDepth, d, true);
  }
  out.add_header(std::move(reply));
}

void Connection::read_error(Replies& out, uint64_t cookie, int host_errno, uint64_t offset) {
  spdlog::warn("conn {}: read at offset {} failed: {}", id_, offset, std::strerror(host_errno));
  if (handshake_.structured_replies()) {
    nbd::Bytes reply;
    nbd::append_chunk_error_offset(reply, cookie, nbd::errno_to_nbd(host_errno),
                                   std::strerror(host_errno), offset);
    out.add_header(std::move(reply));
  } else {
    reply_error(out, cookie, nbd::errno_to_nbd(host_errno));
  }
}

void Connection::reply_error(Replies& out, uint64_t cookie, uint32_t error,
                             std::string_view message) {
  nbd::Bytes reply;
  if (handshake_.structured_replies()) {
    nbd::append_chunk_error(reply, cookie, error, message);
  } else {
    reply.resize(nbd::kSimpleReplySize);
    nbd::encode_simple_reply(reply.data(), error, cookie);
  }
  out.add_header(std::move(reply));
}

void Connection::reply_ok(Replies& out, uint64_t cookie) {
  nbd::Bytes reply;
  if (handshake_.structured_replies()) {
    nbd::append_chunk_none(reply, cookie);
  } else {
    reply.resize(nbd::kSimpleReplySize);
    nbd::encode_simple_reply(reply.data(), 0, cookie);
  }
  out.add_header(std::move(reply));
}

void Connection::send(Replies& out) {
  if (out.empty()) return;
  if (send(out.iov)) bytes_read_ += out.read_bytes;
  out.clear();
}

bool Connection::send(std::span<iovec> iov) {
  std::lock_guard lock(write_mu_);
  if (dead_) return false;
  size_t i = 0;
  while (i < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + i;
    msg.msg_iovlen = std::min<size_t>(iov.size() - i, IOV_MAX);
    ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {  // SO_SNDTIMEO expired
        spdlog::warn("conn {}: client stopped reading replies, dropping it", id_);
      } else if (errno != EPIPE && errno != ECONNRESET) {
        spdlog::warn("conn {}: send failed: {}", id_, std::strerror(errno));
      }
      dead_ = true;
      ::shutdown(fd_, SHUT_RDWR);  // the reader sees EOF and the connection ends
      return false;
    }
    size_t left = static_cast<size_t>(n);
    while (i < iov.size() && left >= iov[i].iov_len) {
      left -= iov[i].iov_len;
      ++i;
    }
    if (left) {
      iov[i].iov_base = static_cast<char*>(iov[i].iov_base) + left;
      iov[i].iov_len -= left;
    }
  }
  return true;
}

}  // namespace strata
