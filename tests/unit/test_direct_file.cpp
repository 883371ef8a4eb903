// Cache mode none (formats/direct_file.h): unaligned I/O through O_DIRECT
// gives the bytes buffered I/O gives, partial-block writes in flight together
// all land, and the page cache never holds a page of the file.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "formats/direct_file.h"
#include "formats/errors.h"
#include "formats/io_ring.h"
#include "formats/open.h"

using namespace strata;
namespace fs = std::filesystem;

namespace {

// Under the working directory (the build tree), not /tmp: /tmp may be a
// tmpfs, which has no direct I/O.
struct DirectDir {
  fs::path path;
  DirectDir() {
    path = fs::current_path() / ("direct-io-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~DirectDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// A file of `size` bytes of a pattern, written buffered, made durable and
// dropped from the page cache.
std::vector<std::byte> make_file(const std::string& path, size_t size) {
  std::vector<std::byte> data(size);
  for (size_t i = 0; i < size; ++i) data[i] = static_cast<std::byte>((i * 7 + i / 512) & 0xff);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data.data()), size);
  int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  return data;
}

// Pages of the file in the page cache (mincore over a mapping that is never
// touched, so mapping it brings nothing in).
size_t resident_pages(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  struct stat st {};
  ::fstat(fd, &st);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t len = static_cast<size_t>(st.st_size);
  if (len == 0) {
    ::close(fd);
    return 0;
  }
  void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  REQUIRE(map != MAP_FAILED);
  std::vector<unsigned char> vec((len + page - 1) / page);
  REQUIRE(::mincore(map, len, vec.data()) == 0);
  ::munmap(map, len);
  size_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

std::vector<std::byte> read_buffered(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  std::memcpy(out.data(), c.data(), c.size());
  return out;
}

}  // namespace

TEST_CASE("cache none: unaligned reads and writes give the bytes buffered I/O gives") {
  DirectDir d;
  const std::string path = d / "disk.raw";
  const size_t size = 1 << 20;
  std::vector<std::byte> shadow = make_file(path, size);
  auto f = direct_file_system()->open(path, true);
  std::mt19937 rng(7);
  std::vector<std::byte> buf(70000 + 1);
  for (int i = 0; i < 400; ++i) {
    const size_t len = 1 + rng() % 70000;
    const size_t off = rng() % (size - len);
    // An odd start in memory too: the bounce path for memory alignment.
    std::span<std::byte> mem(buf.data() + (i % 2), len);
    if (i % 3 == 0) {
      for (size_t k = 0; k < len; ++k) mem[k] = static_cast<std::byte>(rng());
      REQUIRE(f->write_at(off, mem) == 0);
      std::memcpy(shadow.data() + off, mem.data(), len);
    } else {
      REQUIRE(f->read_at(off, mem) == 0);
      REQUIRE(std::memcmp(mem.data(), shadow.data() + off, len) == 0);
    }
  }
  CHECK(f->size() == static_cast<int64_t>(size));
  REQUIRE(f->sync() == 0);
  f.reset();
  CHECK(read_buffered(path) == shadow);
}

TEST_CASE("cache none: the page cache never holds a page of the file") {
  DirectDir d;
  const std::string path = d / "disk.raw";
  const size_t size = 4 << 20;
  make_file(path, size);
  REQUIRE(resident_pages(path) == 0);
  {
    auto f = direct_file_system()->open(path, true);
    std::vector<std::byte> buf(size);
    REQUIRE(f->read_at(0, buf) == 0);
    REQUIRE(f->read_at(100, {buf.data() + 3, 5000}) == 0);
    REQUIRE(f->write_at(4096, {buf.data(), 65536}) == 0);
    REQUIRE(f->write_at(777, {buf.data() + 1, 3000}) == 0);
    REQUIRE(f->zero_range(10000, 20000) == 0);
    REQUIRE(f->punch_hole(100000, 300001) == 0);
    REQUIRE(f->sync() == 0);
  }
  CHECK(resident_pages(path) == 0);
  // The same reads buffered do fill it: the check above can fail.
  {
    auto f = host_file_system()->open(path, false);
    std::vector<std::byte> buf(size);
    REQUIRE(f->read_at(0, buf) == 0);
  }
  CHECK(resident_pages(path) > 0);
}

TEST_CASE("cache none: writes to different bytes of one block in flight together all land") {
  DirectDir d;
  const std::string path = d / "disk.raw";
  make_file(path, 8192);
  auto f = direct_file_system()->open(path, true);
  constexpr int kThreads = 8;
  constexpr int kBytesEach = 64;  // byte t + kThreads * k belongs to thread t
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&f, t] {
      for (int k = 0; k < kBytesEach; ++k) {
        const std::byte b{static_cast<unsigned char>(0x80 | t)};
        REQUIRE(f->write_at(1000 + t + kThreads * k, {&b, 1}) == 0);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<std::byte> got(kThreads * kBytesEach);
  REQUIRE(f->read_at(1000, got) == 0);
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(got[i] == std::byte{static_cast<unsigned char>(0x80 | (i % kThreads))});
  }
}

TEST_CASE("cache none: zeroing and hole punching keep the bytes around the range") {
  DirectDir d;
  const std::string path = d / "disk.raw";
  std::vector<std::byte> shadow = make_file(path, 1 << 20);
  auto f = direct_file_system()->open(path, true);
  const std::pair<uint64_t, uint64_t> ranges[] = {{3, 10}, {511, 2}, {4095, 8194}, {12345, 300000}};
  for (auto [off, len] : ranges) {
    REQUIRE(f->zero_range(off, len) == 0);
    std::memset(shadow.data() + off, 0, len);
  }
  int r = f->punch_hole(700001, 100000);
  if (r != ENOTSUP) {
    REQUIRE(r == 0);
    std::memset(shadow.data() + 700001, 0, 100000);
  }
  std::vector<std::byte> got(shadow.size());
  REQUIRE(f->read_at(0, got) == 0);
  CHECK(got == shadow);
}

TEST_CASE("cache none: a file whose size is not aligned reads to its end and keeps its size") {
  DirectDir d;
  const std::string path = d / "odd.raw";
  std::vector<std::byte> shadow = make_file(path, 10000);
  auto ro = direct_file_system()->open(path, false);
  std::vector<std::byte> got(3000);
  REQUIRE(ro->read_at(8000, got) == 0);  // 2000 bytes of file, then zeros
  CHECK(std::memcmp(got.data(), shadow.data() + 8000, 2000) == 0);
  CHECK(std::all_of(got.begin() + 2000, got.end(), [](std::byte b) { return b == std::byte{0}; }));
  CHECK(ro->write_at(0, {got.data(), 1}) == EPERM);
  ro.reset();
  auto rw = direct_file_system()->open(path, true);
  std::vector<std::byte> data(300, std::byte{0x33});
  REQUIRE(rw->write_at(9800, {data.data(), 200}) == 0);  // the partial last block
  std::memset(shadow.data() + 9800, 0x33, 200);
  REQUIRE(rw->write_at(9000, {data.data(), 300}) == 0);
  std::memset(shadow.data() + 9000, 0x33, 300);
  CHECK(rw->size() == 10000);
  REQUIRE(rw->write_at(9950, {data.data(), 100}) == 0);  // past the end: as buffered
  shadow.resize(10050);
  std::memset(shadow.data() + 9950, 0x33, 100);
  CHECK(rw->size() == 10050);
  rw.reset();
  CHECK(read_buffered(path) == shadow);
}

TEST_CASE("cache none: a write past the end extends the file to a block boundary") {
  DirectDir d;
  const std::string path = d / "grow.raw";
  make_file(path, 4096);
  auto f = direct_file_system()->open(path, true);
  const std::byte b{0x5a};
  REQUIRE(f->write_at(5000, {&b, 1}) == 0);
  CHECK(f->size() % 512 == 0);
  CHECK(f->size() >= 5001);
  std::byte got{};
  REQUIRE(f->read_at(5000, {&got, 1}) == 0);
  CHECK(got == b);
}

namespace {

// One batch of `count` reads and writes in distinct 64 KiB slots (ops in
// flight together must not overlap), aligned or not, in memory aligned for
// direct I/O or not; `shadow` follows the writes and the reads are checked
// against it.
void run_random_batch(File& f, std::vector<std::byte>& shadow, std::mt19937& rng, size_t count) {
  constexpr size_t kSlot = 65536;
  const size_t slots = shadow.size() / kSlot;
  std::vector<size_t> order(slots);
  for (size_t i = 0; i < slots; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  struct Mem {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<std::byte, Mem>> mem;
  std::vector<BatchIo> ops;
  for (size_t i = 0; i < count; ++i) {
    const bool aligned = rng() % 4 != 0;
    const size_t len = aligned ? 4096 * (1 + rng() % 8) : 1 + rng() % 20000;
    const size_t off = order[i] * kSlot + (aligned ? 0 : rng() % (kSlot - len));
    mem.emplace_back(static_cast<std::byte*>(std::aligned_alloc(4096, 65536 + 4096)));
    std::byte* p = mem.back().get() + (aligned ? 0 : rng() % 2);
    const bool write = rng() % 2 == 0;
    if (write) {
      for (size_t k = 0; k < len; ++k) p[k] = static_cast<std::byte>(rng());
      std::memcpy(shadow.data() + off, p, len);
    }
    ops.push_back({.offset = off, .data = p, .length = len, .write = write, .result = -1});
  }
  f.run_batch(ops);
  for (const BatchIo& op : ops) {
    CAPTURE(op.offset);
    CAPTURE(op.length);
    REQUIRE(op.result == 0);
    if (!op.write) CHECK(std::memcmp(op.data, shadow.data() + op.offset, op.length) == 0);
  }
}

}  // namespace

TEST_CASE("cache none: a batch of reads and writes gives the bytes buffered I/O gives") {
  DirectDir d;
  const std::string path = d / "disk.raw";
  std::vector<std::byte> shadow = make_file(path, 4 << 20);
  auto f = direct_file_system()->open(path, true);
  CHECK(f->runs_batches());
  std::mt19937 rng(11);
  SUBCASE("through io_uring") {
    const uint64_t before = ring_ops_submitted();
    for (int round = 0; round < 20; ++round) run_random_batch(*f, shadow, rng, 1 + rng() % 40);
    if (io_uring_available()) {
      CHECK(ring_ops_submitted() > before);
    } else {
      MESSAGE("io_uring is not available here: only the fallback was tested");
    }
  }
  SUBCASE("without it") {
    allow_io_uring(false);
    const uint64_t before = ring_ops_submitted();
    for (int round = 0; round < 20; ++round) run_random_batch(*f, shadow, rng, 1 + rng() % 40);
    CHECK(ring_ops_submitted() == before);
    allow_io_uring(true);
  }
  REQUIRE(f->sync() == 0);
  f.reset();
  CHECK(resident_pages(path) == 0);
  CHECK(read_buffered(path) == shadow);
}

TEST_CASE("cache none: a batched read past the end of the file reads zeros there") {
  DirectDir d;
  const std::string path = d / "odd.raw";
  std::vector<std::byte> shadow = make_file(path, 10000);
  auto f = direct_file_system()->open(path, false);
  auto* a = static_cast<std::byte*>(std::aligned_alloc(4096, 3 * 4096));
  std::memset(a, 0xee, 3 * 4096);
  std::vector<BatchIo> ops = {{.offset = 0, .data = a, .length = 4096},
                              {.offset = 8192, .data = a + 4096, .length = 4096},
                              {.offset = 12288, .data = a + 8192, .length = 4096},
                              {.offset = 16, .data = a, .length = 1, .write = true}};
  f->run_batch(ops);
  CHECK(ops[0].result == 0);
  CHECK(ops[1].result == 0);
  CHECK(ops[2].result == 0);
  CHECK(ops[3].result == EPERM);  // a read-only file
  CHECK(std::memcmp(a + 4096, shadow.data() + 8192, 10000 - 8192) == 0);
  CHECK(std::all_of(a + 4096 + (10000 - 8192), a + 3 * 4096,
                    [](std::byte b) { return b == std::byte{0}; }));
  std::free(a);
}

TEST_CASE("cache none: the config key and the open options") {
  ExportConfig e;
  CHECK(e.cache == "writeback");
  CHECK(e.open_options().file_system == host_file_system());
  e.cache = "none";
  CHECK(e.open_options().file_system == direct_file_system());
}
