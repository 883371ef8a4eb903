// Transport: the byte stream of one connection once the handshake is done.
// The transmission threads receive and send through it and know nothing of
// what carries the bytes: a plain socket (SocketTransport) now, a TLS session
// behind the same three calls.
//
// A transport that can (can_send_files(): the plain socket, not TLS, which
// must encrypt every byte in user space) also sends file ranges straight
// from the page cache between the iovecs of a batch (send_with_files):
// sendmsg with MSG_MORE up to a file range, sendfile for it. The send
// timeout bounds both. A file that ends before its range does (it shrank
// under us) cannot be reported to the client once the reply header went
// out: the send fails with EIO, after a log line naming the file, and the
// connection closes.
//
// Threads: one thread at a time receives (the holder of the connection's
// read mutex) and one at a time sends (the holder of its write mutex), so a
// transport needs no locks of its own for that; shutdown() may be called
// from any thread at any time.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>

namespace strata {

// `length` bytes of the open file `fd` at `offset`, sent before iov[at].
struct FileSpan {
  size_t at = 0;
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;
};

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
  // Whether send_with_files() works.
  virtual bool can_send_files() const { return false; }
  // send_all(iov) with the file ranges in between, in order (`at`
  // ascending). REQUIRES can_send_files().
  virtual bool send_with_files(std::span<iovec> iov, std::span<const FileSpan> files) {
    (void)iov;
    (void)files;
    errno = ENOTSUP;
    return false;
  }
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
  bool can_send_files() const override { return true; }
  bool send_with_files(std::span<iovec> iov, std::span<const FileSpan> files) override;
  void shutdown(int how) override;

 private:
  // send_all with extra sendmsg flags (MSG_MORE before a file range).
  bool send_iov(std::span<iovec> iov, int flags);
  bool send_file(const FileSpan& f);

  const int fd_;
};

}  // namespace strata
