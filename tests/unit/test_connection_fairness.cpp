// A connection whose requests are stuck on its device does not stop another
// connection (server/connection.h, "Threads on demand"): with
// limits.max_io_threads 1, connection A's two FLUSHes block in the file's
// sync, holding A's first thread and the server's only extra thread; B's
// READ is still read, executed and answered, and only then is A released.
// Real Connections over socket pairs on a Server's io_context, as in
// tests/fuzz/fuzz_connection.cpp.
#include <doctest/doctest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <asio.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "formats/file.h"
#include "formats/file_system.h"
#include "formats/forwarding_file_system.h"
#include "protocol/nbd.h"
#include "server/connection.h"
#include "server/server.h"
#include "tests/support/forwarding_file.h"
#include "tests/support/temp_dir.h"

using namespace strata;

namespace {

constexpr auto kDeadline = std::chrono::seconds(60);

// Holds every sync() until opened; counts the syncs waiting.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  int waiting = 0;

  void pass() {
    std::unique_lock lock(mu);
    ++waiting;
    cv.notify_all();
    while (!open) cv.wait(lock);
    --waiting;
  }
  // Waits (up to kDeadline) until `n` syncs wait at the gate.
  bool wait_for_waiting(int n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, kDeadline, [&] { return waiting == n; });
  }
  void release() {
    std::lock_guard lock(mu);
    open = true;
    cv.notify_all();
  }
};

class GatedFile final : public test::ForwardingFile {
 public:
  GatedFile(std::unique_ptr<File> inner, Gate& gate)
      : ForwardingFile(std::move(inner)), gate_(gate) {}
  int sync() override {
    gate_.pass();
    return ForwardingFile::sync();
  }

 private:
  Gate& gate_;
};

class GatedFileSystem final : public ForwardingFileSystem {
 public:
  explicit GatedFileSystem(Gate& gate) : ForwardingFileSystem(host_file_system()), gate_(gate) {}
  std::unique_ptr<File> open(const std::string& path, bool writable) override {
    return std::make_unique<GatedFile>(inner().open(path, writable), gate_);
  }

 private:
  Gate& gate_;
};

ExportConfig raw_export(const std::string& name, const std::string& path) {
  ExportConfig e;
  e.name = name;
  e.path = path;
  e.format = Format::raw;
  return e;
}

void make_raw(const std::string& path, uint8_t fill) {
  auto f = create_file(path);
  std::vector<uint8_t> data(1 << 16, fill);
  REQUIRE(write_bytes(*f, 0, data.data(), data.size()) == 0);
}

void send_all(int fd, const void* p, size_t n) {
  REQUIRE(::send(fd, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n));
}

// False when the peer closed or nothing came within kDeadline.
bool recv_all(int fd, void* p, size_t n) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(kDeadline / std::chrono::milliseconds(1))) != 1)
      return false;
    ssize_t r = ::recv(fd, b, n, 0);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

uint64_t be(const uint8_t* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v = (v << 8) | p[i];
  return v;
}

void put_be(std::vector<uint8_t>& out, uint64_t v, size_t n) {
  for (size_t i = n; i-- > 0;) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// Fixed newstyle, no zeroes, NBD_OPT_EXPORT_NAME `name`.
void handshake(int fd, const std::string& name) {
  uint8_t greeting[18];
  REQUIRE(recv_all(fd, greeting, sizeof greeting));
  REQUIRE(std::memcmp(greeting, "NBDMAGIC", 8) == 0);
  std::vector<uint8_t> out;
  put_be(out, nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes, 4);
  put_be(out, nbd::kOptMagic, 8);
  put_be(out, nbd::kOptExportName, 4);
  put_be(out, name.size(), 4);
  out.insert(out.end(), name.begin(), name.end());
  send_all(fd, out.data(), out.size());
  uint8_t info[10];
  REQUIRE(recv_all(fd, info, sizeof info));
  REQUIRE(be(info, 8) == 1 << 16);
}

void request(int fd, uint16_t type, uint64_t cookie, uint64_t offset = 0, uint32_t length = 0) {
  nbd::Request r{};
  r.magic = nbd::kRequestMagic;
  r.type = type;
  r.cookie = cookie;
  r.offset = offset;
  r.length = length;
  uint8_t hdr[nbd::kRequestSize];
  nbd::encode_request(r, hdr);
  send_all(fd, hdr, sizeof hdr);
}

// A simple reply's error, after checking its cookie; -1 when none came.
int64_t reply(int fd, uint64_t cookie) {
  uint8_t r[16];
  if (!recv_all(fd, r, sizeof r)) return -1;
  REQUIRE(be(r, 4) == nbd::kSimpleReplyMagic);
  REQUIRE(be(r + 8, 8) == cookie);
  return static_cast<int64_t>(be(r + 4, 4));
}

bool readable_now(int fd) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1;
}

struct Client {
  int fd = -1;
  std::weak_ptr<Connection> conn;
};

Client connect(Server& server, uint64_t id) {
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  std::promise<std::weak_ptr<Connection>> made;
  asio::post(server.io(), [&] {
    Connection::Socket sock(server.io(), asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM),
                            fds[0]);
    auto c = std::make_shared<Connection>(server, std::move(sock), id, "test", nbd::TlsPolicy::kOff,
                                          nullptr);
    asio::co_spawn(server.io(), Connection::run(c), asio::detached);
    made.set_value(c);
  });
  return {fds[1], made.get_future().get()};
}

// Sends NBD_CMD_DISC and waits until the server closed its end.
void disconnect(Client& c) {
  request(c.fd, nbd::kCmdDisc, 99);
  uint8_t byte;
  CHECK_FALSE(recv_all(c.fd, &byte, 1));
  ::close(c.fd);
}

}  // namespace

TEST_CASE("a connection stuck on its device does not stop another one") {
  test::TempDir dir("fairness");
  make_raw(dir / "a.raw", 0);
  make_raw(dir / "b.raw", 0xb5);
  Config c;
  c.listeners.push_back(ListenerConfig{});  // never bound: clients come from socketpair()
  c.exports.push_back(raw_export("b", dir / "b.raw"));
  c.limits.workers = 16;
  c.limits.max_io_threads = 1;
  Server server(c);
  // Export "a" on the gated file system, next to the registry's "b".
  Gate gate;
  ExportConfig a = raw_export("a", dir / "a.raw");
  OpenOptions options = a.open_options();
  options.file_system = std::make_shared<GatedFileSystem>(gate);
  server.exports().replace({open_export(a, options), server.exports().by_name("b")});
  auto work = asio::make_work_guard(server.io());
  std::thread io([&] { server.io().run(); });

  Client ca = connect(server, 1), cb = connect(server, 2);
  handshake(ca.fd, "a");
  handshake(cb.fd, "b");
  // One FLUSH at a time, so that each is a batch of its own: the first
  // blocks A's first thread, which starts the one extra thread; that one
  // reads the second and blocks too.
  request(ca.fd, nbd::kCmdFlush, 1);
  REQUIRE(gate.wait_for_waiting(1));
  request(ca.fd, nbd::kCmdFlush, 2);
  REQUIRE(gate.wait_for_waiting(2));
  CHECK(server.io_threads().extra() == 1);
  CHECK(server.io_threads().threads() == 3);

  request(cb.fd, nbd::kCmdRead, 3, 4096, 4096);
  CHECK(reply(cb.fd, 3) == 0);
  std::vector<uint8_t> data(4096);
  REQUIRE(recv_all(cb.fd, data.data(), data.size()));
  CHECK(data == std::vector<uint8_t>(4096, 0xb5));
  // A is still stuck: both its syncs wait and it has answered nothing.
  CHECK(gate.waiting == 2);
  CHECK_FALSE(readable_now(ca.fd));

  gate.release();
  // The two flushes may finish in either order; each gets one reply.
  std::vector<uint64_t> answered;
  for (int i = 0; i < 2; ++i) {
    uint8_t r[16];
    REQUIRE(recv_all(ca.fd, r, sizeof r));
    CHECK(be(r, 4) == nbd::kSimpleReplyMagic);
    CHECK(be(r + 4, 4) == 0);
    answered.push_back(be(r + 8, 8));
  }
  std::sort(answered.begin(), answered.end());
  CHECK(answered == std::vector<uint64_t>{1, 2});
  disconnect(ca);
  disconnect(cb);
  const auto deadline = std::chrono::steady_clock::now() + kDeadline;
  while (!(ca.conn.expired() && cb.conn.expired()) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(ca.conn.expired());
  CHECK(cb.conn.expired());
  work.reset();
  server.io().stop();
  io.join();
  CHECK(server.io_threads().threads() == 0);
}
