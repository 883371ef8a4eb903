// The handshake phase of a Connection: a coroutine on the io thread that
// feeds the client's bytes to nbd::Handshake (protocol/handshake.h, where
// every rule lives) and sends its replies, under the handshake timeout.
// clang-format off
// First, as in every server file: asio.hpp must come before spdlog's headers,
// or GCC frees this file's coroutine frames with the wrong operator delete.
#include "server/connection.h"
// clang-format on

#include <spdlog/spdlog.h>

#include <asio/experimental/as_tuple.hpp>
#include <cstring>
#include <vector>

#include "formats/endian.h"
#include "server/server.h"

namespace strata {

namespace {

constexpr auto use_nothrow = asio::experimental::as_tuple(asio::use_awaitable);

}  // namespace

asio::awaitable<bool> Connection::async_wait_tls() {
  const auto way =
      tls_->wants_write() ? asio::socket_base::wait_write : asio::socket_base::wait_read;
  auto [ec] = co_await socket_.async_wait(way, use_nothrow);
  co_return !ec;  // a timeout or stop closed the socket
}

asio::awaitable<size_t> Connection::async_receive(std::span<uint8_t> space) {
  if (!tls_) {
    auto [ec, got] =
        co_await socket_.async_read_some(asio::buffer(space.data(), space.size()), use_nothrow);
    co_return ec ? 0 : got;
  }
  for (;;) {
    const ssize_t got = tls_->recv(space.data(), space.size());
    if (got >= 0) co_return static_cast<size_t>(got);
    if (got == TlsSession::kFailed) {
      spdlog::warn("conn {}: peer={} TLS: {}", id_, peer_, tls_->error());
      co_return 0;
    }
    if (!co_await async_wait_tls()) co_return 0;
  }
}

asio::awaitable<bool> Connection::async_send(std::span<const uint8_t> bytes) {
  if (!tls_) {
    auto [ec, n] =
        co_await asio::async_write(socket_, asio::buffer(bytes.data(), bytes.size()), use_nothrow);
    co_return !ec;
  }
  while (!bytes.empty()) {
    const ssize_t n = tls_->send(bytes.data(), bytes.size());
    if (n == TlsSession::kFailed) co_return false;
    if (n == TlsSession::kAgain) {
      if (!co_await async_wait_tls()) co_return false;
      continue;
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  co_return true;
}

asio::awaitable<bool> Connection::async_discard(uint64_t n) {
  n -= reader_.skip(n);
  while (n > 0) {
    auto space = reader_.free_space();
    const size_t got = co_await async_receive(space);
    if (got == 0) co_return false;
    reader_.appended(got);
    n -= reader_.skip(n);  // bytes past the payload stay buffered for what follows
  }
  co_return true;
}

asio::awaitable<bool> Connection::async_read_exact(void* dst, size_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  const size_t have = reader_.take(out, n);
  out += have;
  n -= have;
  while (n >= RequestReader::kCapacity / 2) {  // a long payload: straight to its buffer
    const size_t got = co_await async_receive({out, n});
    if (got == 0) co_return false;
    out += got;
    n -= got;
  }
  while (reader_.buffered() < n) {
    const size_t got = co_await async_receive(reader_.free_space());
    if (got == 0) co_return false;
    reader_.appended(got);
  }
  reader_.take(out, n);
  co_return true;
}

asio::awaitable<bool> Connection::start_tls() {
  // Every byte the client sent before our ACK was sent before it could know
  // TLS would start: it is not part of the TLS stream, and acting on it
  // would let a man in the middle inject options (CVE-2021-3716).
  if (const size_t dropped = reader_.skip(reader_.buffered())) {
    spdlog::warn("conn {}: peer={} dropped {} bytes sent before the TLS handshake", id_, peer_,
                 dropped);
  }
  if (!tls_credentials_) co_return false;  // STARTTLS is only acknowledged with TLS configured
  bump(server_.metrics().tls_handshakes);
  std::error_code ec;
  socket_.native_non_blocking(true, ec);
  try {
    tls_ = std::make_unique<TlsSession>(tls_credentials_, fd_);
  } catch (const std::exception& e) {
    spdlog::error("conn {}: {}", id_, e.what());
    co_return false;
  }
  for (;;) {
    const ssize_t r = tls_->handshake_step();
    if (r == 0) break;
    if (r == TlsSession::kFailed) {
      spdlog::warn("conn {}: peer={} TLS handshake failed: {}", id_, peer_, tls_->error());
      tls_failed();
      co_return false;
    }
    if (!co_await async_wait_tls()) {
      tls_failed();
      co_return false;
    }
  }
  handshake_.tls_established(tls_->identity());
  spdlog::info("conn {}: peer={} TLS {} identity='{}'", id_, peer_, tls_->describe(),
               handshake_.identity());
  co_return true;
}

void Connection::tls_failed() {
  bump(server_.metrics().tls_handshakes_failed);
  if (failure_ != HandshakeFailure::timeout) failure_ = HandshakeFailure::tls_handshake;
}

void Connection::note_refusal(const nbd::Handshake::Step& step) {
  using Refusal = nbd::Handshake::Refusal;
  switch (step.refusal) {
    case Refusal::kNone:
      break;
    case Refusal::kTlsRequired:
      failure_ = HandshakeFailure::tls_required;
      break;
    case Refusal::kPolicy:
      failure_ = HandshakeFailure::policy;
      break;
    case Refusal::kUnknownExport:
      failure_ = HandshakeFailure::unknown_export;
      break;
  }
}

void Connection::log_step(const nbd::Handshake::Step& step) const {
  if (step.note.empty()) return;
  if (step.refused) {
    spdlog::warn("conn {}: peer={} identity='{}' refused: {}", id_, peer_, handshake_.identity(),
                 step.note);
  } else if (step.action == nbd::Handshake::Action::kClose) {
    spdlog::info("conn {}: peer={} closing: {}", id_, peer_, step.note);
  } else {
    spdlog::debug("conn {}: {}", id_, step.note);
  }
}

asio::awaitable<bool> Connection::handshake() {
  auto timer = std::make_shared<asio::steady_timer>(
      socket_.get_executor(), std::chrono::milliseconds(limits_.handshake_timeout_ms));
  timer->async_wait([this, self = shared_from_this()](std::error_code ec) {
    if (!ec && !in_transmission_) {
      spdlog::warn("conn {}: handshake timed out", id_);
      failure_ = HandshakeFailure::timeout;
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

  if (!co_await async_send(handshake_.greeting())) co_return false;
  uint8_t flags_buf[4];
  if (!co_await async_read_exact(flags_buf, 4)) co_return false;
  std::string why;
  if (!handshake_.accept_client_flags(load_be32(flags_buf), &why)) {
    spdlog::warn("conn {}: {}", id_, why);
    failure_ = HandshakeFailure::protocol;
    co_return false;
  }
  for (;;) {
    uint8_t hdr[nbd::kOptionHeaderSize];
    if (!co_await async_read_exact(hdr, sizeof hdr)) co_return false;
    auto opt = nbd::decode_option_header(std::span<const uint8_t, nbd::kOptionHeaderSize>(hdr));
    if (opt.magic != nbd::kOptMagic) {
      spdlog::warn("conn {}: bad option magic {:#x}", id_, opt.magic);
      failure_ = HandshakeFailure::protocol;
      co_return false;
    }
    nbd::Handshake::Step step;
    if (opt.length > nbd::Handshake::kMaxOptionLength) {
      step = handshake_.on_oversized_option(opt.option, opt.length);
      if (step.action == nbd::Handshake::Action::kClose) {
        spdlog::warn("conn {}: {}, closing", id_, step.note);
        failure_ = HandshakeFailure::protocol;
        co_return false;
      }
      if (!co_await async_discard(opt.length)) co_return false;
    } else {
      std::vector<uint8_t> data(opt.length);
      if (!co_await async_read_exact(data.data(), data.size())) co_return false;
      step = handshake_.on_option(opt.option, data);
    }
    note_refusal(step);
    log_step(step);
    if (step.action == nbd::Handshake::Action::kTransmit) {
      // A client of the export before it hears so: whoever it tells next
      // finds it in /exports.
      export_ = server_.exports().by_view(step.export_view);
      stats_ = export_->metrics->attach();
    }
    if (!step.reply.empty() && !co_await async_send(step.reply)) co_return false;
    if (step.action == nbd::Handshake::Action::kClose) {
      // Closed by the rules (not by the client's own ABORT) with no refusal
      // named: the client broke them.
      if (opt.option != nbd::kOptAbort && step.refusal == nbd::Handshake::Refusal::kNone) {
        failure_ = HandshakeFailure::protocol;
      }
      co_return false;
    }
    if (step.action == nbd::Handshake::Action::kStartTls && !co_await start_tls()) {
      co_return false;
    }
    if (step.action == nbd::Handshake::Action::kTransmit) {
      // export_->view, not step.export_view: a reload during the send may
      // have taken the export out of the registry (and stopped this
      // connection), export_ keeps it alive.
      session_ = nbd::Session{.size = export_->view.size,
                              .tx_flags = handshake_.tx_flags(export_->view),
                              .read_only = export_->caps.read_only,
                              .max_payload = kMaxRequestBytes,
                              .structured = handshake_.structured_replies()};
      handshake_.fill_meta_contexts(export_->view, session_);
      spdlog::info("conn {}: peer={} export='{}' structured={} flags={:#x} tls={}", id_, peer_,
                   export_->config.name, session_.structured, session_.tx_flags,
                   tls_ ? "yes" : "no");
      co_return !stopping_;
    }
  }
}

}  // namespace strata
