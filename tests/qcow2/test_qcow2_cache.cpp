// Metadata cache: bounded by the configured size (RSS stays within the cache
// plus a fixed overhead while reading a sparse 64 GiB image end to end), hit
// and miss counters, and parallel readers/writers on one image.
#include <unistd.h>

#include <thread>

#include "qcow2_helpers.h"

using namespace qtest;

// Keep freed memory out of ASan's quarantine so RSS reflects live memory.
extern "C" const char* __asan_default_options() {
  return "quarantine_size_mb=0:thread_local_quarantine_size_kb=0:detect_leaks=1";
}

namespace {

uint64_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

uint64_t stat_value(const std::string& stats, const std::string& cache, const std::string& key) {
  auto p = stats.find(cache + " cache:");
  REQUIRE(p != std::string::npos);
  p = stats.find(key + " ", p);
  REQUIRE(p != std::string::npos);
  return std::stoull(stats.substr(p + key.size() + 1));
}

}  // namespace

TEST_CASE("qcow2 reading a sparse 64 GiB image with a small cache keeps RSS bounded") {
  TempDir d;
  std::string img = d / "big.qcow2";
  // 4 KiB clusters: one L2 table maps 2 MiB, so 64 GiB needs 32768 tables.
  sh("qemu-img create -q -f qcow2 -o cluster_size=4k " + img + " 64G");
  // Allocate 4096 L2 tables (16 MiB of tables), one data cluster each.
  {
    std::ofstream cmds(d / "cmds.txt");
    for (int i = 0; i < 4096; ++i) {
      cmds << "write -P " << (i % 250 + 1) << " " << uint64_t(i) * (16ull << 20) << " 4k\n";
    }
  }
  sh("qemu-io -t unsafe -f qcow2 " + img + " < " + d / "cmds.txt");
  strata::OpenOptions o;
  o.metadata_cache_bytes = 1 << 20;
  auto dev = open_ro(img, o);
  REQUIRE(dev->size() == 64ull << 30);
  const uint64_t before = rss_bytes();
  // End to end: extents over the whole disk, and reads of every allocated
  // cluster plus the start of every 2 MiB table range.
  uint64_t data_bytes = 0;
  for (uint64_t off = 0; off < dev->size();) {
    std::vector<strata::Extent> ex;
    REQUIRE(dev->extents(off, dev->size() - off, ex) == 0);
    for (const auto& e : ex) {
      uint64_t n = std::min(e.length, dev->size() - off);
      if (!e.hole) data_bytes += n;
      off += n;
    }
  }
  CHECK(data_bytes == 4096ull * 4096);
  std::vector<std::byte> b(64 << 10);
  for (uint64_t off = 0; off < dev->size(); off += 2 << 20) {
    REQUIRE(dev->read(off, b) == 0);
    if (off % (16ull << 20) == 0) {
      CHECK(b[0] == std::byte(static_cast<uint8_t>((off >> 24) % 250 + 1)));
      CHECK(b[4096] == std::byte{0});
    }
  }
  const uint64_t after = rss_bytes();
  std::string st = dev->stats();
  MESSAGE("RSS before " << before / 1024 << " KiB, after " << after / 1024 << " KiB; " << st);
  // 16 MiB of L2 tables were read; the cache holds at most 1 MiB of them.
  CHECK(after < before + (6 << 20));
  CHECK(stat_value(st, "L2", "misses") >= 4096);
  CHECK(stat_value(st, "L2", "evictions") >= 4096 - 256);
}

TEST_CASE("qcow2 cache counters and parallel access") {
  TempDir d;
  std::string img = d / "p.qcow2";
  sh("qemu-img create -q -f qcow2 " + img + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x21 0 32M' " + img);
  auto dev = open_rw(img);
  std::vector<std::thread> ths;
  std::atomic<int> bad{0};
  for (int t = 0; t < 8; ++t) {
    ths.emplace_back([&, t] {
      std::vector<std::byte> b(4096);
      std::mt19937_64 rng(t);
      for (int i = 0; i < 2000; ++i) {
        uint64_t off = (rng() % (32 << 20)) & ~uint64_t{4095};
        if (t % 2) {  // writers on the upper half allocate concurrently
          uint64_t w = (32ull << 20) + (rng() % (32 << 20) & ~uint64_t{4095});
          std::fill(b.begin(), b.end(), std::byte(static_cast<uint8_t>(w >> 12)));
          if (dev->write(w, b, false) != 0) ++bad;
        } else {
          if (dev->read(off, b) != 0 || b[0] != std::byte{0x21}) ++bad;
        }
      }
    });
  }
  for (auto& th : ths) th.join();
  CHECK(bad == 0);
  REQUIRE(dev->flush() == 0);
  std::string st = dev->stats();
  CHECK(stat_value(st, "L2", "hits") > 0);
  dev.reset();
  CHECK(sh_status("qemu-img check " + img) == 0);
}

TEST_CASE("qcow2 tables hit under the shared lock get a second chance at eviction") {
  TempDir d;
  std::string img = d / "lru.qcow2";
  // 4 KiB clusters: one L2 table maps 2 MiB. Tables A, B and C map 0, 2 and 4 MiB.
  sh("qemu-img create -q -f qcow2 -o cluster_size=4k " + img + " 16M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x0a 0 4k' -c 'write -P 0x0b 2M 4k' "
     "-c 'write -P 0x0c 4M 4k' " +
     img);
  strata::OpenOptions o;
  o.metadata_cache_bytes = 6 * 4096;  // 4 refcount blocks + 2 L2 tables
  auto dev = open_ro(img, o);
  std::vector<std::byte> b(4096);
  auto read_misses = [&](uint64_t off, uint8_t expect) {
    REQUIRE(dev->read(off, b) == 0);
    CHECK(b[0] == std::byte{expect});
    return stat_value(dev->stats(), "L2", "misses");
  };
  CHECK(read_misses(0, 0x0a) == 1);        // A loaded
  CHECK(read_misses(2 << 20, 0x0b) == 2);  // B loaded; A is now least recent
  CHECK(read_misses(0, 0x0a) == 2);        // A hit (shared lock: marked, not moved)
  CHECK(read_misses(4 << 20, 0x0c) == 3);  // C loaded: A gets a second chance, B goes
  CHECK(read_misses(0, 0x0a) == 3);        // A still cached
  CHECK(read_misses(2 << 20, 0x0b) == 4);  // B was the one evicted
  CHECK(stat_value(dev->stats(), "L2", "evictions") == 2);
}
