// Transport: the byte stream of one connection once the handshake is done.
// The transmission threads receive and send through it and know nothing of
// what carries the bytes: a plain socket (SocketTransport) now, a TLS session
// behind the same three calls.
//
// Threads: one thread at a time receives (the holder of the connection's
// read mutex) and one at a time sends (the holder of its write mutex), so a
// transport needs no locks of its own for that; shutdown() may be called
// from any thread at any time.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <span>

namespace strata {

class Transport {
 public:
  virtual ~Transport() = default;
  // Receives up to n bytes, waiting for at least one: the count, 0 at end of
  // stream, -1 on an error (errno says which).
  virtual ssize_t recv_some(void* dst, size_t n) = 0;
  // Sends every byte of iov, in order (the entries are advanced in place).
  // False when the stream failed or the peer stopped reading (errno says
  // which; EAGAIN: the send timeout expired).
  virtual bool send_all(std::span<iovec> iov) = 0;
  // SHUT_RD: receivers get end of stream once what was sent has been read.
  // SHUT_RDWR: also fails sends that are waiting. Both idempotent.
  virtual void shutdown(int how) = 0;
};

// Makes a connected socket blocking, with a send timeout so a peer that
// does not read its replies cannot hold a thread for ever.
void make_blocking_with_send_timeout(int fd, int send_timeout_ms);

// A connected stream socket (TCP or unix), blocking, with a send timeout so a
// peer that does not read its replies cannot hold a thread for ever. Does
// not own the descriptor.
class SocketTransport final : public Transport {
 public:
  SocketTransport(int fd, int send_timeout_ms);
  ssize_t recv_some(void* dst, size_t n) override;
  bool send_all(std::span<iovec> iov) override;
  void shutdown(int how) override;

 private:
  const int fd_;
};

}  // namespace strata
