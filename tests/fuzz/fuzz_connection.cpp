// fuzz_connection: a real Connection (server/connection.*) over a socket
// pair. A Server made once at start-up serves two raw exports from a
// temporary directory: "disk" (1 MiB, read-write, the default) and "ro"
// (64.5 KiB, read-only). For each input, the server side of a new socket
// pair becomes a Connection on the server's io_context; the harness writes
// the input to the other side (then shuts down its writing half), reads
// everything the server sends until it closes, and checks it.
//
// The input is a client byte stream, as for fuzz_handshake: client flags,
// options, then requests with their WRITE payloads. The harness reads it
// the way the server will (with a Handshake of its own over the same
// exports) to know where each request is, and gives each request a unique
// cookie before sending, so that every reply names its request. It cuts the
// stream where what the server does next is a policy, not a rule (after
// refused client flags, after an option over the length limit), and before
// the requests whose READ replies would pass 8 MiB in all.
//
// Invariants (doc/proto.md), on top of ASan/UBSan:
//  - the handshake bytes are exactly the greeting and the replies the
//    handshake logic produced, in order;
//  - every transmission reply is well formed: a known magic, a cookie of a
//    request not yet answered, structured chunks of the types its command
//    may get, with offsets inside the request, data and holes covering a
//    successful READ exactly once, a block-status chunk per selected context
//    with descriptors inside the request (one with REQ_ONE), error chunks
//    with messages of at most 4096 bytes; no simple reply to a READ once
//    structured replies are on; only NBD error values;
//  - every complete request gets exactly one reply, the last (incomplete)
//    one at most an error;
//  - READs return what earlier successful WRITEs and WRITE_ZEROES wrote
//    (the old data or zeros after a TRIM), and what block status flags zero
//    reads as zeros; requests run in order because the server has one
//    worker thread per connection;
//  - no hang (every exchange finishes within 10 s) and no leak: the
//    Connection is destroyed and its socket closed after each input.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <asio.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "formats/file.h"
#include "protocol/handshake.h"
#include "protocol/nbd.h"
#include "server/connection.h"
#include "server/server.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/shadow.h"

namespace strata::fuzz {
namespace {

using namespace strata::nbd;
using Clock = std::chrono::steady_clock;

constexpr size_t kMaxString = 4096;
constexpr uint64_t kReadBudget = 8ull << 20;
constexpr auto kDeadline = std::chrono::seconds(10);

uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t be32(const uint8_t* p) { return uint32_t{be16(p)} << 16 | be16(p + 2); }
uint64_t be64(const uint8_t* p) { return uint64_t{be32(p)} << 32 | be32(p + 4); }
void put_be64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<uint8_t>(v);
}

// ---- the server, made once --------------------------------------------------

struct World {
  std::string dir;
  std::unique_ptr<Server> server;
  std::unique_ptr<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::thread io_thread;
  uint64_t next_id = 1;
};
World* g_world = nullptr;

void make_raw(const std::string& path, uint64_t size) {
  auto f = create_file(path);
  FUZZ_CHECK(f->truncate(size) == 0, "cannot size a raw export");
  std::vector<uint8_t> piece(4096);
  for (uint64_t off = 0; off < size / 2; off += 3 * piece.size()) {  // data and holes
    for (size_t i = 0; i < piece.size(); ++i) piece[i] = static_cast<uint8_t>(off / 4096 + i);
    FUZZ_CHECK(write_bytes(*f, off, piece.data(), piece.size()) == 0, "cannot fill an export");
  }
}

ExportConfig raw_export(const std::string& name, const std::string& path, bool read_only) {
  ExportConfig e;
  e.name = name;
  e.path = path;
  e.format = Format::raw;
  e.read_only = read_only;
  return e;
}

void start_world() {
  auto* w = new World;
  w->dir = strata::fuzz::make_temp_dir("conn");
  make_raw(w->dir + "/disk.raw", 1 << 20);
  make_raw(w->dir + "/ro.raw", 64 * 1024 + 512);
  Config c;
  c.listeners.push_back(ListenerConfig{});  // never bound: connections come from socketpair()
  c.exports.push_back(raw_export("disk", w->dir + "/disk.raw", false));
  c.exports.push_back(raw_export("ro", w->dir + "/ro.raw", true));
  c.limits.workers = 1;  // requests then run in order: the shadow can follow them
  // The server's signal_set takes SIGINT and SIGTERM; give them back to libFuzzer.
  struct sigaction old_int, old_term;
  ::sigaction(SIGINT, nullptr, &old_int);
  ::sigaction(SIGTERM, nullptr, &old_term);
  w->server = std::make_unique<Server>(c);
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  w->work = std::make_unique<asio::executor_work_guard<asio::io_context::executor_type>>(
      w->server->io().get_executor());
  w->io_thread = std::thread([w] { w->server->io().run(); });
  g_world = w;
  std::atexit([] {
    g_world->work.reset();
    g_world->server->io().stop();
    g_world->io_thread.join();
    std::filesystem::remove_all(g_world->dir);
  });
}

// ---- what the client sends, read the way the server reads it ----------------

struct Req {
  nbd::Request hdr;
  size_t payload_pos = 0;  // in Plan::stream
  bool complete = true;    // header and payload were sent whole
};

struct Plan {
  std::vector<uint8_t> stream;         // what is sent (cookies rewritten)
  std::vector<uint8_t> expected;       // greeting and option replies
  std::optional<uint32_t> cut_option;  // the stream ends after this over-long option
  bool transmission = false;
  bool structured = false, base = false, depth = false;
  std::shared_ptr<Export> exp;
  std::vector<Req> reqs;
};

Plan plan_for(const uint8_t* data, size_t size) {
  Plan p;
  p.stream.assign(data, data + size);
  Handshake hs(g_world->server->exports());
  auto g = hs.greeting();
  p.expected.assign(g.begin(), g.end());
  if (size < 4) return p;
  std::string why;
  if (!hs.accept_client_flags(be32(data), &why)) {
    p.stream.resize(4);
    return p;
  }
  size_t pos = 4;
  while (size - pos >= kOptionHeaderSize) {
    auto hdr = decode_option_header(std::span<const uint8_t, kOptionHeaderSize>(data + pos, 16));
    if (hdr.magic != kOptMagic) return p;
    if (hdr.length > Handshake::kMaxOptionLength) {
      p.stream.resize(std::min<size_t>(size, pos + 16 + hdr.length));
      p.cut_option = hdr.option;
      return p;
    }
    if (hdr.length > size - pos - 16) return p;
    auto step = hs.on_option(hdr.option, {data + pos + 16, hdr.length});
    pos += 16 + hdr.length;
    p.expected.insert(p.expected.end(), step.reply.begin(), step.reply.end());
    if (step.action == Handshake::Action::kClose) return p;
    if (step.action == Handshake::Action::kTransmit) {
      p.transmission = true;
      p.structured = hs.structured_replies();
      p.base = hs.meta_selected(kMetaIdBaseAllocation);
      p.depth = hs.meta_selected(kMetaIdAllocationDepth);
      p.exp = g_world->server->exports().by_view(step.export_view);
      break;
    }
  }
  if (!p.transmission) return p;
  uint64_t read_bytes = 0;
  while (size - pos >= kRequestSize) {
    uint8_t* h = p.stream.data() + pos;
    Req r;
    r.hdr = decode_request(std::span<const uint8_t, kRequestSize>(h, kRequestSize));
    if (r.hdr.type == kCmdRead) read_bytes += std::min<uint64_t>(r.hdr.length, p.exp->view.size);
    if (read_bytes > kReadBudget) {
      p.stream.resize(pos);
      return p;
    }
    if (r.hdr.magic != kRequestMagic || r.hdr.type == kCmdDisc) return p;
    r.hdr.cookie = p.reqs.size() + 1;
    put_be64(h + 8, r.hdr.cookie);
    pos += kRequestSize;
    r.payload_pos = pos;
    if (r.hdr.type == kCmdWrite) {
      if (r.hdr.length > size - pos) {
        r.complete = false;
        p.reqs.push_back(r);
        return p;
      }
      pos += r.hdr.length;
    }
    p.reqs.push_back(r);
  }
  return p;
}

// ---- the exchange -----------------------------------------------------------

// Serves one connection on `fd` (the server's end); returns it so the caller
// can wait for its end.
std::weak_ptr<Connection> start_connection(int fd) {
  std::promise<std::weak_ptr<Connection>> made;
  asio::post(g_world->server->io(), [&] {
    Connection::Socket sock(g_world->server->io(),
                            asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fd);
    auto conn = std::make_shared<Connection>(*g_world->server, std::move(sock), g_world->next_id++,
                                             "fuzz", nbd::TlsPolicy::kOff, nullptr);
    asio::co_spawn(g_world->server->io(), Connection::run(conn), asio::detached);
    made.set_value(conn);
  });
  return made.get_future().get();
}

// Writes `out`, then half-closes, and reads until the server closes.
std::vector<uint8_t> talk(int fd, const std::vector<uint8_t>& out) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::vector<uint8_t> in;
  size_t sent = 0;
  bool write_open = true;
  if (out.empty()) {
    ::shutdown(fd, SHUT_WR);
    write_open = false;
  }
  const auto deadline = Clock::now() + kDeadline;
  uint8_t buf[65536];
  for (;;) {
    FUZZ_CHECK(Clock::now() < deadline, "the connection hung (no end within 10 s)");
    pollfd pfd{fd, static_cast<short>(POLLIN | (write_open ? POLLOUT : 0)), 0};
    if (::poll(&pfd, 1, 100) < 0) continue;
    if (write_open && (pfd.revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = ::send(fd, out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<size_t>(n);
      if (sent == out.size() || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        ::shutdown(fd, SHUT_WR);
        write_open = false;
      }
    }
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;
      if (n > 0) in.insert(in.end(), buf, buf + n);
      FUZZ_CHECK(in.size() <= 2 * kReadBudget + (8u << 20), "the server sent far more than asked");
    }
  }
  return in;
}

void wait_released(const std::weak_ptr<Connection>& conn, int server_fd) {
  const auto deadline = Clock::now() + kDeadline;
  while (!conn.expired()) {
    FUZZ_CHECK(Clock::now() < deadline, "the connection was not released after its end");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // Nothing else opens files meanwhile, so the number is not reused yet.
  FUZZ_CHECK(::fcntl(server_fd, F_GETFD) == -1, "the connection left its socket open");
}

// ---- checking the replies -----------------------------------------------------

bool nbd_error(uint32_t e) {
  static const std::set<uint32_t> known{kEPERM,  kEIO,       kENOMEM,  kEINVAL,
                                        kENOSPC, kEOVERFLOW, kENOTSUP, kESHUTDOWN};
  return known.count(e) > 0;
}

class ReplyChecker {
 public:
  ReplyChecker(const Plan& p, const std::vector<uint8_t>& in) : p_(p), in_(in) {
    states_.resize(p.reqs.size());
  }

  void check() {
    check_handshake();
    if (!p_.transmission) return;
    while (pos_ < in_.size()) next_reply();
    for (size_t i = 0; i < p_.reqs.size(); ++i) {
      if (p_.reqs[i].complete) {
        FUZZ_CHECK(states_[i].done, "a complete request got no reply");
      } else {
        FUZZ_CHECK(!states_[i].done || states_[i].error, "an incomplete WRITE succeeded");
      }
    }
  }

 private:
  struct State {
    bool done = false, error = false;
    uint64_t covered = 0;  // READ bytes in data and hole chunks
    std::set<std::pair<uint64_t, uint64_t>> pieces;
    std::set<uint32_t> contexts;  // BLOCK_STATUS chunks seen
  };

  void check_handshake() {
    const auto& e = p_.expected;
    FUZZ_CHECK(in_.size() >= e.size() && std::equal(e.begin(), e.end(), in_.begin()),
               "the handshake bytes differ from the handshake's replies");
    pos_ = e.size();
    if (p_.transmission) return;
    if (p_.cut_option && pos_ < in_.size()) {
      // An over-long option: the server closed, or refused it with an error.
      FUZZ_CHECK(in_.size() - pos_ >= 20 && be64(&in_[pos_]) == kOptReplyMagic &&
                     be32(&in_[pos_ + 8]) == *p_.cut_option && (be32(&in_[pos_ + 12]) >> 31),
                 "an over-long option got something other than an error reply");
      uint32_t len = be32(&in_[pos_ + 16]);
      FUZZ_CHECK(len <= kMaxString && in_.size() - pos_ == 20u + len,
                 "bytes after the reply to an over-long option");
      return;
    }
    FUZZ_CHECK(pos_ == in_.size(), "bytes after a handshake that did not enter transmission");
  }

  const uint8_t* take(size_t n, const char* what) {
    FUZZ_CHECK(in_.size() - pos_ >= n, what);
    const uint8_t* p = in_.data() + pos_;
    pos_ += n;
    return p;
  }

  size_t request_of(uint64_t cookie) {
    FUZZ_CHECK(cookie >= 1 && cookie <= p_.reqs.size(), "a reply with a cookie never sent");
    FUZZ_CHECK(!states_[cookie - 1].done, "a second reply to one request");
    return cookie - 1;
  }

  void next_reply() {
    uint32_t magic = be32(take(4, "a truncated reply magic"));
    if (magic == kSimpleReplyMagic) return simple_reply();
    FUZZ_CHECK(magic == kStructuredReplyMagic, "a reply with an unknown magic");
    FUZZ_CHECK(p_.structured, "a structured reply without structured replies negotiated");
    chunk();
  }

  void simple_reply() {
    const uint8_t* h = take(12, "a truncated simple reply");
    uint32_t error = be32(h);
    size_t i = request_of(be64(h + 4));
    const Req& r = p_.reqs[i];
    FUZZ_CHECK(error == 0 || nbd_error(error), "an error value NBD does not define");
    FUZZ_CHECK(!(p_.structured && r.hdr.type == kCmdRead),
               "a simple reply to a READ once structured replies are on");
    if (r.hdr.type == kCmdRead && error == 0) {
      const uint8_t* d = take(r.hdr.length, "a READ reply with less data than asked for");
      read_data(r, r.hdr.offset, d, r.hdr.length);
    }
    finish(i, error != 0);
  }

  void chunk() {
    const uint8_t* h = take(16, "a truncated structured reply header");
    uint16_t flags = be16(h), type = be16(h + 2);
    uint32_t len = be32(h + 12);
    size_t i = request_of(be64(h + 4));
    const Req& r = p_.reqs[i];
    State& s = states_[i];
    FUZZ_CHECK(!(flags & ~kReplyFlagDone), "a structured reply flag NBD does not define");
    FUZZ_CHECK(len <= uint64_t{r.hdr.length} + kMaxString + 64,
               "a structured reply chunk larger than its request calls for");
    const uint8_t* d = take(len, "a truncated structured reply chunk");
    const bool is_read = r.hdr.type == kCmdRead;
    switch (type) {
      case kChunkNone:
        FUZZ_CHECK(len == 0 && (flags & kReplyFlagDone), "NBD_REPLY_TYPE_NONE malformed");
        break;
      case kChunkOffsetData: {
        FUZZ_CHECK(is_read && len > 8, "OFFSET_DATA for a non-READ, or without data");
        uint64_t off = be64(d);
        piece(r, s, off, len - 8);
        read_data(r, off, d + 8, len - 8);
        break;
      }
      case kChunkOffsetHole: {
        FUZZ_CHECK(is_read && len == 12, "OFFSET_HOLE malformed");
        uint64_t off = be64(d);
        uint32_t n = be32(d + 8);
        FUZZ_CHECK(n > 0, "an OFFSET_HOLE of length 0");
        piece(r, s, off, n);
        std::vector<uint8_t> zeros(n);
        read_data(r, off, zeros.data(), n);
        break;
      }
      case kChunkBlockStatus:
        block_status(r, s, d, len);
        break;
      case kChunkError:
      case kChunkErrorOffset: {
        FUZZ_CHECK(len >= 6, "an error chunk too short");
        uint32_t error = be32(d);
        uint16_t mlen = be16(d + 4);
        FUZZ_CHECK(error != 0 && nbd_error(error), "an error chunk without an NBD error value");
        FUZZ_CHECK(mlen <= kMaxString, "an error message over 4096 bytes");
        FUZZ_CHECK(len == 6u + mlen + (type == kChunkErrorOffset ? 8u : 0u),
                   "an error chunk whose length disagrees with its message");
        if (type == kChunkErrorOffset) {
          uint64_t off = be64(d + 6 + mlen);
          FUZZ_CHECK(off >= r.hdr.offset && off - r.hdr.offset < r.hdr.length,
                     "ERROR_OFFSET outside its request");
        }
        s.error = true;
        break;
      }
      default:
        FUZZ_CHECK(false, "a structured reply chunk type NBD does not define");
    }
    if (flags & kReplyFlagDone) finish(i, s.error);
  }

  void piece(const Req& r, State& s, uint64_t off, uint64_t n) {
    FUZZ_CHECK(off >= r.hdr.offset && n <= r.hdr.length && off - r.hdr.offset <= r.hdr.length - n,
               "a READ chunk outside its request");
    auto it = s.pieces.lower_bound({off, 0});
    FUZZ_CHECK(it == s.pieces.end() || it->first >= off + n, "READ chunks overlap");
    FUZZ_CHECK(it == s.pieces.begin() || std::prev(it)->second <= off, "READ chunks overlap");
    s.pieces.insert({off, off + n});
    s.covered += n;
  }

  void block_status(const Req& r, State& s, const uint8_t* d, uint32_t len) {
    FUZZ_CHECK(r.hdr.type == kCmdBlockStatus, "a BLOCK_STATUS chunk for another command");
    FUZZ_CHECK(len >= 12 && (len - 4) % 8 == 0, "a BLOCK_STATUS chunk of a bad length");
    uint32_t id = be32(d);
    FUZZ_CHECK(
        (id == kMetaIdBaseAllocation && p_.base) || (id == kMetaIdAllocationDepth && p_.depth),
        "a BLOCK_STATUS chunk for a context not selected");
    FUZZ_CHECK(s.contexts.insert(id).second, "two BLOCK_STATUS chunks for one context");
    uint32_t n = (len - 4) / 8;
    FUZZ_CHECK(!(r.hdr.flags & kCmdFlagReqOne) || n == 1, "REQ_ONE answered with many extents");
    uint64_t pos = r.hdr.offset;
    for (uint32_t k = 0; k < n; ++k) {
      uint32_t elen = be32(d + 4 + 8 * k), flags = be32(d + 8 + 8 * k);
      FUZZ_CHECK(elen > 0, "a block status extent of length 0");
      FUZZ_CHECK(pos + elen <= r.hdr.offset + r.hdr.length, "block status past the request");
      if (id == kMetaIdBaseAllocation) {
        FUZZ_CHECK(!(flags & ~(kStateHole | kStateZero)),
                   "base:allocation flags NBD does not define");
        if (flags & kStateZero) {
          std::vector<uint8_t> zeros(elen);
          FUZZ_CHECK(shadow_.check_and_learn(pos, zeros.data(), elen) < 0,
                     "block status flags zero a range that holds written data");
        }
      }
      pos += elen;
    }
  }

  void read_data(const Req&, uint64_t off, const uint8_t* data, uint64_t n) {
    FUZZ_CHECK(shadow_.check_and_learn(off, data, n) < 0,
               "a READ does not return what was written");
  }

  bool in_range(const nbd::Request& h) const {
    uint64_t size = p_.exp->view.size;
    return h.offset <= size && h.length <= size - h.offset;
  }

  // A request's last reply: its effect on the export becomes known.
  void finish(size_t i, bool error) {
    State& s = states_[i];
    s.done = true;
    s.error = error;
    const Req& r = p_.reqs[i];
    const auto& h = r.hdr;
    if (!in_range(h)) return;  // refused: no effect, and no bytes to follow
    switch (h.type) {
      case kCmdRead:
        if (!error && p_.structured) {
          FUZZ_CHECK(s.covered == h.length, "a successful READ not covered exactly once");
        }
        break;
      case kCmdBlockStatus:
        if (!error) {
          FUZZ_CHECK(s.contexts.size() == size_t{p_.base} + size_t{p_.depth},
                     "a successful BLOCK_STATUS without a chunk per selected context");
        }
        break;
      case kCmdWrite:
        if (error) {
          shadow_.forget(h.offset, h.length);
        } else {
          FUZZ_CHECK(r.complete, "an incomplete WRITE succeeded");
          shadow_.set(h.offset, p_.stream.data() + r.payload_pos, h.length);
        }
        break;
      case kCmdWriteZeroes:
        error ? shadow_.forget(h.offset, h.length) : shadow_.set_zero(h.offset, h.length);
        break;
      case kCmdTrim:
        error ? shadow_.forget(h.offset, h.length) : shadow_.weaken(h.offset, h.length);
        break;
      default:
        break;
    }
  }

  const Plan& p_;
  const std::vector<uint8_t>& in_;
  size_t pos_ = 0;
  std::vector<State> states_;
  Shadow shadow_;
};

}  // namespace
}  // namespace strata::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  strata::fuzz::quiet_logs();
  strata::fuzz::start_world();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace strata::fuzz;
  Plan plan = plan_for(data, size);
  int fds[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0, "socketpair");
  auto conn = start_connection(fds[1]);
  auto in = talk(fds[0], plan.stream);
  ::close(fds[0]);
  wait_released(conn, fds[1]);
  ReplyChecker(plan, in).check();
  return 0;
}
