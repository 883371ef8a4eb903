#include "server/transport.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <climits>

namespace strata {

void make_blocking_with_send_timeout(int fd, int send_timeout_ms) {
  // Blocking from here on: the transmission threads wait in recv and send,
  // not in a reactor.
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  timeval tv{send_timeout_ms / 1000, static_cast<suseconds_t>(send_timeout_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

SocketTransport::SocketTransport(int fd, int send_timeout_ms) : fd_(fd) {
  make_blocking_with_send_timeout(fd_, send_timeout_ms);
}

ssize_t SocketTransport::recv_some(void* dst, size_t n) {
  for (;;) {
    const ssize_t got = ::recv(fd_, dst, n, 0);
    if (got >= 0) return got;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {  // still non-blocking somehow
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, -1) >= 0 || errno == EINTR) continue;
    }
    return -1;
  }
}

bool SocketTransport::send_all(std::span<iovec> iov) {
  size_t i = 0;
  while (i < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + i;
    msg.msg_iovlen = std::min<size_t>(iov.size() - i, IOV_MAX);
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    auto left = static_cast<size_t>(n);
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

void SocketTransport::shutdown(int how) { ::shutdown(fd_, how); }

}  // namespace strata
