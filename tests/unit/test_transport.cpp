// SocketTransport's copy-free sending (server/transport.h) and ReplyBatch's
// file pieces (server/reply_batch.h), over a unix socket pair: what the peer
// receives is the headers and the file's bytes in order, and a file that
// ends before its piece fails the send instead of hanging or sending
// something else.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <thread>
#include <vector>

#include "server/reply_batch.h"
#include "server/transport.h"
#include "tests/support/temp_dir.h"

using namespace strata;

namespace {

// A connected pair; [0] sends, [1] is the peer.
struct SocketPair {
  int fd[2] = {-1, -1};
  SocketPair() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fd) == 0); }
  ~SocketPair() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
  void close_sender() {
    ::close(fd[0]);
    fd[0] = -1;
  }
};

// Everything the peer receives until end of stream, read on its own thread
// so that the sender never waits for room.
class Drain {
 public:
  explicit Drain(int fd)
      : thread_([this, fd] {
          char buf[65536];
          ssize_t n;
          while ((n = ::read(fd, buf, sizeof buf)) > 0) got_.append(buf, static_cast<size_t>(n));
        }) {}
  std::string finish() {
    thread_.join();
    return got_;
  }

 private:
  std::string got_;
  std::thread thread_;
};

// A file of `size` patterned bytes; returns its descriptor and contents.
int patterned_file(const test::TempDir& dir, size_t size, std::string& contents) {
  contents.resize(size);
  for (size_t i = 0; i < size; ++i) contents[i] = static_cast<char>('a' + (i * 7) % 26);
  const int fd = ::open((dir / "f").c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, contents.data(), size) == static_cast<ssize_t>(size));
  return fd;
}

nbd::Bytes text(const std::string& s) {
  nbd::Bytes b(s.size());
  for (size_t i = 0; i < s.size(); ++i) b[i] = static_cast<uint8_t>(s[i]);
  return b;
}

}  // namespace

TEST_CASE("a batch with file pieces reaches the peer in order: headers, file bytes, zeros") {
  test::TempDir dir("strata-transport");
  std::string contents;
  const int file = patterned_file(dir, 3 << 20, contents);
  SocketPair sp;
  SocketTransport t(sp.fd[0], 10000);
  REQUIRE(t.can_send_files());

  ReplyBatch out;
  out.add_header(text("HEAD1"));
  const std::vector<HostPiece> pieces = {{.fd = file, .host_offset = 100, .length = 2 << 20},
                                         {.fd = -1, .host_offset = 0, .length = 1500000},
                                         {.fd = file, .host_offset = 7, .length = 9}};
  out.add_pieces(pieces);
  out.add_header(text("HEAD2"));
  CHECK(out.files.size() == 2);
  CHECK(out.copy_free_bytes == (2 << 20) + 9);

  Drain peer(sp.fd[1]);
  REQUIRE(t.send_with_files(out.iov, out.files));
  sp.close_sender();
  const std::string want = "HEAD1" + contents.substr(100, 2 << 20) + std::string(1500000, '\0') +
                           contents.substr(7, 9) + "HEAD2";
  CHECK(peer.finish() == want);
  ::close(file);
}

TEST_CASE("a file that ends before its piece fails the send with EIO") {
  test::TempDir dir("strata-transport");
  std::string contents;
  const int file = patterned_file(dir, 1 << 20, contents);
  SocketPair sp;
  SocketTransport t(sp.fd[0], 10000);
  ReplyBatch out;
  out.add_header(text("HEAD"));
  const std::vector<HostPiece> pieces = {{.fd = file, .host_offset = 4096, .length = 2 << 20}};
  out.add_pieces(pieces);

  Drain peer(sp.fd[1]);
  errno = 0;
  CHECK_FALSE(t.send_with_files(out.iov, out.files));
  CHECK(errno == EIO);
  sp.close_sender();
  // What went out is a prefix of the reply, never other bytes.
  const std::string got = peer.finish();
  const std::string reply = "HEAD" + contents.substr(4096);
  CHECK(got == reply);
  ::close(file);
}

TEST_CASE("a peer gone fails the send without a signal") {
  test::TempDir dir("strata-transport");
  std::string contents;
  const int file = patterned_file(dir, 1 << 20, contents);
  SocketPair sp;
  SocketTransport t(sp.fd[0], 10000);
  ::close(sp.fd[1]);
  sp.fd[1] = -1;
  const FileSpan span{.at = 0, .fd = file, .offset = 0, .length = 1 << 20};
  std::vector<iovec> none;
  errno = 0;
  CHECK_FALSE(t.send_with_files(none, {&span, 1}));
  CHECK(errno == EPIPE);
  ::close(file);
}
