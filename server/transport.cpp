#include "server/transport.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <string>

namespace strata {
namespace {

// The most one sendfile call moves (the kernel's own limit).
constexpr uint64_t kMaxSendfile = 0x7ffff000;

// sendfile has no MSG_NOSIGNAL: a peer gone would raise SIGPIPE, whose
// default ends the process. The sending thread blocks it instead, once; a
// SIGPIPE sent to the thread then stays pending, harmless, and EPIPE is
// what the call returns.
void block_sigpipe_in_this_thread() {
  static thread_local const bool blocked = [] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    return pthread_sigmask(SIG_BLOCK, &set, nullptr) == 0;
  }();
  (void)blocked;
}

std::string path_of_descriptor(int fd) {
  std::string link = "/proc/self/fd/" + std::to_string(fd);
  char buf[4096];
  const ssize_t n = ::readlink(link.c_str(), buf, sizeof buf);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : link;
}

}  // namespace

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

bool SocketTransport::send_all(std::span<iovec> iov) { return send_iov(iov, 0); }

bool SocketTransport::send_iov(std::span<iovec> iov, int flags) {
  size_t i = 0;
  while (i < iov.size()) {
    msghdr msg{};
    msg.msg_iov = iov.data() + i;
    msg.msg_iovlen = std::min<size_t>(iov.size() - i, IOV_MAX);
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | flags);
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

bool SocketTransport::send_with_files(std::span<iovec> iov, std::span<const FileSpan> files) {
  size_t from = 0;
  for (const FileSpan& f : files) {
    // MSG_MORE: the header waits for the file's bytes instead of leaving in
    // a small segment of its own.
    if (!send_iov(iov.subspan(from, f.at - from), MSG_MORE)) return false;
    if (!send_file(f)) return false;
    from = f.at;
  }
  return send_iov(iov.subspan(from), 0);
}

bool SocketTransport::send_file(const FileSpan& f) {
  block_sigpipe_in_this_thread();
  auto pos = static_cast<off_t>(f.offset);
  uint64_t left = f.length;
  while (left > 0) {
    const ssize_t n = ::sendfile(fd_, f.fd, &pos, std::min(left, kMaxSendfile));
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) {
      spdlog::error(
          "{}: ends at offset {}, {} bytes before the reply being sent from it: "
          "the file shrank; closing the connection",
          path_of_descriptor(f.fd), pos, left);
      errno = EIO;
      return false;
    }
    left -= static_cast<uint64_t>(n);
  }
  return true;
}

void SocketTransport::shutdown(int how) { ::shutdown(fd_, how); }

}  // namespace strata
