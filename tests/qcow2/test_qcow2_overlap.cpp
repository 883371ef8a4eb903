// Inconsistent qcow2 metadata (docs/CORRUPT-IMAGES.md): the overlap check
// stops a write before it touches metadata in use, marks the image corrupt
// (the v3 header bit), fails with EIO and leaves the device read-only; reads
// keep working and what was acknowledged before is kept. Also refcount
// structures past EOF (read-write open refused) and `check` on references
// the refcount table cannot reach (once a heap read past the table).
#include <spdlog/spdlog.h>

#include "formats/errors.h"
#include "qcow2_helpers.h"
#include "tests/support/fault_file.h"

using namespace qtest;

namespace {

constexpr uint64_t kCopiedFlag = 1ull << 63;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;

struct Image {
  std::string path;
  uint64_t cs;
  uint64_t l1() const { return peek_be64(path, 40); }
  uint64_t reftable() const { return peek_be64(path, 48); }
  uint64_t refblock0() const { return peek_be64(path, reftable()) & kOffsetMask; }
  uint64_t l1_entry(int i) const { return peek_be64(path, l1() + 8 * i); }
  uint64_t l2_entry(int table, int i) const {
    return peek_be64(path, (l1_entry(table) & kOffsetMask) + 8 * i);
  }
  // 16-bit refcounts, all in the first block.
  void set_refcount(uint64_t offset, uint16_t v) const {
    patch(path, refblock0() + 2 * (offset / cs), be16(v));
  }
  bool corrupt_bit() const { return peek_be64(path, 72) & 2; }
};

// 4 KiB clusters, data at guest 0 (cluster 0x5000) and 8K, both under L1 entry 0.
Image small_image(const TempDir& d, const std::string& opts = "") {
  Image img{d / "o.qcow2", 4096};
  sh("qemu-img create -q -f qcow2 -o cluster_size=4k" + opts + " " + img.path + " 4M");
  sh("qemu-io -f qcow2 -c 'write -P 1 0 4k' -c 'write -P 2 8k 4k' " + img.path);
  return img;
}

std::vector<std::byte> pattern(size_t n, int v) { return std::vector<std::byte>(n, std::byte(v)); }

bool qemu_check_clean(const std::string& img) { return sh_status("qemu-img check " + img) == 0; }

}  // namespace

TEST_CASE("qcow2 freeing a cluster whose refcount is already 0 marks the image corrupt") {
  TempDir d;
  Image img = small_image(d);
  img.set_refcount(img.l2_entry(0, 0) & kOffsetMask, 0);
  REQUIRE_FALSE(qemu_check_clean(img.path));
  {
    auto dev = open_rw(img.path);
    REQUIRE(dev->write(1 << 20, pattern(4096, 7), false) == 0);  // acknowledged before
    REQUIRE(dev->trim(0, 4096, false) == 0);
    CHECK(dev->flush() == EIO);  // the free is refused
    CHECK(dev->capabilities().read_only);
    CHECK(dev->write(8192, pattern(512, 9), false) == EPERM);
    CHECK(dev->trim(8192, 4096, false) == EPERM);
    std::vector<std::byte> b(4096);
    REQUIRE(dev->read(8192, b) == 0);
    CHECK(b == pattern(4096, 2));
    CHECK(dev->flush() == 0);  // nothing more is written
  }
  CHECK(img.corrupt_bit());
  CHECK_THROWS_WITH(open_rw(img.path), doctest::Contains("corrupt bit"));
  sh("qemu-io -r -f qcow2 -c 'read -P 0 0 4k' -c 'read -P 2 8k 4k' -c 'read -P 7 1M 4k' " +
     img.path);
}

TEST_CASE("qcow2 freeing a cluster still in use as an L2 table marks the image corrupt") {
  TempDir d;
  Image img = small_image(d);
  const uint64_t l2 = img.l1_entry(0) & kOffsetMask;
  patch(img.path, l2 + 16, be64(kCopiedFlag | l2));  // guest 8K -> its own L2 table
  {
    auto dev = open_rw(img.path);
    REQUIRE(dev->trim(8192, 4096, false) == 0);
    CHECK(dev->flush() == EIO);
    CHECK(dev->capabilities().read_only);
    CHECK(dev->write(1 << 20, pattern(4096, 3), false) == EPERM);
  }
  CHECK(img.corrupt_bit());
  sh("qemu-io -r -f qcow2 -c 'read -P 1 0 4k' -c 'read -P 0 8k 4k' " + img.path);
  CHECK((img.l1_entry(0) & kOffsetMask) == l2);
}

TEST_CASE("qcow2 an L2 table overlapping the refcount table is never written") {
  TempDir d;
  Image img = small_image(d);
  patch(img.path, img.l1() + 8, be64(kCopiedFlag | img.reftable()));  // L1[1] -> refcount table
  const auto before = file_bytes(img.path);
  {
    auto dev = open_rw(img.path);
    CHECK(dev->write(2 << 20, pattern(4096, 5), false) == EIO);
    CHECK(dev->capabilities().read_only);
    std::vector<std::byte> b(4096);
    REQUIRE(dev->read(0, b) == 0);
    CHECK(b == pattern(4096, 1));
  }
  auto after = file_bytes(img.path);
  REQUIRE(after.size() == before.size());
  after[79] = before[79];  // the corrupt bit, the only byte that changed
  CHECK(first_diff(after, before) == -1);
  CHECK(img.corrupt_bit());
}

TEST_CASE("qcow2 two L1 entries naming one L2 table: a write through one is refused") {
  TempDir d;
  Image img = small_image(d, ",compat=0.10");
  patch(img.path, img.l1() + 8, be64(img.l1_entry(0)));  // guest 2M maps like guest 0
  {
    auto dev = open_rw(img.path);
    CHECK(dev->write(2 << 20, pattern(4096, 5), false) == EIO);
    CHECK(dev->capabilities().read_only);
  }
  CHECK_FALSE(img.corrupt_bit());  // version 2: no such bit, read-only for this session only
  sh("qemu-io -r -f qcow2 -c 'read -P 1 0 4k' " + img.path);
}

TEST_CASE("qcow2 guest data over metadata is refused through a fault-injecting file") {
  // The corrupt bit cannot be written either: still EIO and read-only.
  TempDir d;
  Image img = small_image(d);
  const uint64_t l1e0 = img.l1_entry(0);
  patch(img.path, l1e0 & kOffsetMask, be64(kCopiedFlag | img.l1()));  // guest 0 -> the L1 table
  auto fault =
      std::make_unique<strata::test::FaultFile>(strata::host_file_system()->open(img.path, true));
  auto* f = fault.get();
  strata::ChainContext ctx;
  auto dev = strata::open_qcow2(std::move(fault), ctx);
  f->write_error = ENOSPC;
  CHECK(dev->write(0, pattern(512, 9), false) == EIO);
  CHECK(dev->capabilities().read_only);
  f->write_error = 0;
  CHECK(dev->write(8192, pattern(512, 9), false) == EPERM);
  dev.reset();
  CHECK_FALSE(img.corrupt_bit());
  CHECK(img.l1_entry(0) == l1e0);
}

TEST_CASE("qcow2 refcount block past EOF: refused read-write, served read-only") {
  TempDir d;
  Image img = small_image(d);
  const uint64_t eof = file_bytes(img.path).size();
  patch(img.path, img.reftable(), be64(eof + 4096));
  CHECK_THROWS_WITH(open_rw(img.path), doctest::Contains("refcount block 0"));
  CHECK_THROWS_WITH(open_rw(img.path), doctest::Contains("past the end of the file"));
  auto dev = open_ro(img.path);
  std::vector<std::byte> b(4096);
  REQUIRE(dev->read(8192, b) == 0);
  CHECK(b == pattern(4096, 2));
}

TEST_CASE("qcow2 check: references the refcount table cannot reach are reported, never read past") {
  // 512-byte clusters: one refcount table cluster of 64 entries, each block
  // counting 256 clusters, reach 8 MiB. Point a data cluster just past it.
  TempDir d;
  Image img{d / "r.qcow2", 512};
  sh("qemu-img create -q -f qcow2 -o cluster_size=512 " + img.path + " 1M");
  sh("qemu-io -f qcow2 -c 'write -P 1 0 512' " + img.path);
  const uint64_t reftable_clusters = peek_be64(img.path, 56) >> 32;
  REQUIRE(reftable_clusters == 1);
  const uint64_t l2 = img.l1_entry(0) & kOffsetMask;
  patch(img.path, l2 + 8, be64(kCopiedFlag | (8ull << 20)));
  strata::CheckReport report;
  open_ro(img.path)->check(report);
  std::string all;
  for (const auto& e : report.errors) all += e + "\n";
  INFO(all);
  CHECK(all.find("cluster 16384 is used 1 times but has no refcount block") != std::string::npos);
  CHECK(all.find("past the end of the file") != std::string::npos);
}
