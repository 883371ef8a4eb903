// RequestReader: the receive buffer of one connection. One recv into its
// 64 KiB buffer often yields many requests; long payloads bypass it and go
// straight into their own buffer.
//
// The handshake coroutine fills it with Asio reads (free_space/appended);
// bytes the client sent past the handshake stay buffered for the
// transmission threads, which read through the Transport.
//
// Not thread-safe: the caller holds the connection's read mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "server/transport.h"

namespace strata {

class RequestReader {
 public:
  static constexpr size_t kCapacity = size_t{64} * 1024;

  RequestReader() : buf_(new uint8_t[kCapacity]) {}

  // ---- Blocking reads through a transport (transmission phase) ----
  // False at end of stream or on an error.
  bool read_exact(Transport& t, void* dst, size_t n);
  bool discard(Transport& t, uint64_t n);

  // Whether a whole request (header, and a WRITE's payload) is buffered, so
  // reading it costs no system call.
  bool request_buffered() const;
  // The length field of the buffered request. REQUIRES: request_buffered().
  uint32_t buffered_request_length() const;
  // Puts back the request header just read, which stays buffered whole.
  void unread_request_header();

  // ---- Filled by the handshake coroutine ----
  // Copies out up to n buffered bytes; returns how many.
  size_t take(void* dst, size_t n);
  size_t buffered() const { return end_ - pos_; }
  // Room to receive into, after the buffered bytes (all of it when empty),
  // then appended(k) for the k bytes received there.
  std::span<uint8_t> free_space();
  void appended(size_t k) { end_ += k; }
  // Drops up to n buffered bytes; returns how many.
  size_t skip(uint64_t n);

 private:
  std::unique_ptr<uint8_t[]> buf_;
  size_t pos_ = 0;  // next unread byte
  size_t end_ = 0;  // end of the buffered bytes
};

}  // namespace strata
