// Hostile and corrupt qcow2 images (docs/FORMATS.md Part C, QEMU iotest 080 field
// set, fuzzed headers and tables): refused with a message naming the file and
// the field, or served with EIO for the bad region; never a crash or a hang.
#include "formats/errors.h"
#include "qcow2_helpers.h"

using namespace qtest;

namespace {

std::string open_error(const std::string& path, bool rw = false) {
  try {
    strata::OpenOptions o;
    o.format = strata::Format::qcow2;
    auto dev = rw ? open_rw(path, o) : open_ro(path, o);
    return {};
  } catch (const strata::ImageError& e) {
    return e.what();
  }
}

}  // namespace

TEST_CASE("qcow2 corrupt headers are refused naming the file and the field") {
  TempDir d;
  std::string good = d / "good.qcow2";
  sh("qemu-img create -q -f qcow2 " + good + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 1 0 1M' " + good);
  struct Case {
    const char* what;
    uint64_t off;
    std::vector<uint8_t> bytes;
    const char* field;
  };
  std::vector<Case> cases = {
      {"magic", 0, {'X', 'F', 'I', 0xfb}, "magic"},
      {"version 4", 4, be32(4), "version"},
      {"cluster_bits 8", 20, be32(8), "cluster_bits"},
      {"cluster_bits 22", 20, be32(22), "cluster_bits"},
      {"cluster_bits huge", 20, be32(0xffffffff), "cluster_bits"},
      {"header_length huge", 100, be32(0xffffffff), "header_length"},
      {"header_length small", 100, be32(100), "header_length"},
      {"extension length", 116, be32(0x7fffffff), "extension"},
      {"refcount_table_clusters huge", 56, be32(0xffffffff), "refcount_table_clusters"},
      {"refcount_table_clusters 0", 56, be32(0), "refcount_table_clusters"},
      {"refcount table misaligned", 48, be64(0x10001), "refcount_table_offset"},
      {"refcount table huge", 48, be64(0xffffffffffff0000ull), "refcount_table_offset"},
      {"refcount table past EOF", 48, be64(1ull << 40), "refcount_table_offset"},
      {"l1_size huge", 36, be32(0x7fffffff), "l1_size"},
      {"l1_size too small", 36, be32(0), "l1_size"},
      {"l1 misaligned", 40, be64(0x30001), "l1_table_offset"},
      {"l1 huge", 40, be64(0xfffffffffff00000ull), "l1_table_offset"},
      {"size huge", 24, be64(0x7fffffffffffffffull), "size"},
      {"nb_snapshots huge", 60, be32(0x7fffffff), "nb_snapshots"},
      {"snapshots misaligned", 60, be32(1), "snapshots_offset"},
      {"unknown incompatible bit", 72, be64(1ull << 40), "bit 40"},
      {"compression bit without type", 72, be64(1ull << 3), "compression_type"},
      {"refcount_order", 96, be32(7), "refcount_order"},
      {"crypt", 32, be32(1), "crypt_method"},
      {"backing name too long", 8, be64(512), "backing_file_size"},
      {"data_file_raw without data file", 88, be64(2), "data_file_raw"},
  };
  for (const auto& c : cases) {
    std::string img = d / "bad.qcow2";
    sh("cp " + good + " " + img);
    if (std::string(c.what) == "backing name too long") patch(img, 16, be32(4000));
    if (std::string(c.what) == "snapshots misaligned") patch(img, 64, be64(0x10008));
    patch(img, c.off, c.bytes);
    std::string err = open_error(img);
    std::string info = std::string(c.what) + ": '" + err + "'";
    INFO(info);
    CHECK(err.find(img) != std::string::npos);
    CHECK(err.find(c.field) != std::string::npos);
  }
}

TEST_CASE("qcow2 unknown incompatible bit is named from the feature table") {
  TempDir d;
  std::string img = d / "f.qcow2";
  sh("qemu-img create -q -f qcow2 " + img + " 64M");
  // Rename the feature-name table entry for bit 4 ("extended l2") to a made-up
  // bit 9 and set that bit.
  auto bytes = file_bytes(img);
  bool found = false;
  for (size_t i = 112; i + 48 < 65536; i += 48) {
    if (std::memcmp(bytes.data() + i + 2 + 8, "extended L2", 11) == 0) {
      patch(img, i + 8, {0, 9});
      patch(img, i + 8 + 2, {'s', 'h', 'i', 'n', 'y', 0, 0, 0, 0, 0, 0, 0});
      found = true;
      break;
    }
  }
  REQUIRE(found);
  patch(img, 72, be64(1ull << 9));
  std::string err = open_error(img);
  INFO(err);
  CHECK(err.find("bit 9 'shiny'") != std::string::npos);
}

TEST_CASE("qcow2 corrupt tables: EIO for the bad region, the rest is served") {
  TempDir d;
  std::string img = d / "t.qcow2";
  sh("qemu-img create -q -f qcow2 " + img + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 1 0 128k' -c 'write -P 2 32M 64k' " + img);
  auto m = qemu_map(img);
  // L1 at 0x30000; the first L2 table follows the data written first.
  auto raw = file_bytes(img);
  auto l1e = [&](int i) {
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v = v << 8 | uint8_t(raw[0x30000 + i * 8 + k]);
    return v & 0x00fffffffffffe00ull;
  };
  uint64_t l2 = l1e(0);
  REQUIRE(l2 != 0);
  // Entry 1 (guest 64k..128k): reserved bits set.
  patch(img, l2 + 8, be64(0x8000000000000000ull | 0x0100000000000000ull | 0x50000));
  {
    auto dev = open_rw(img);
    std::vector<std::byte> b(65536);
    CHECK(dev->read(0, b) == 0);
    CHECK(dev->read(65536, b) == EIO);
    CHECK(dev->read(32 << 20, b) == 0);
    CHECK(b[0] == std::byte{2});
    CHECK(dev->write(65536 + 100, std::span(b).first(10), false) == EIO);
    std::vector<strata::Extent> ex;
    CHECK(dev->extents(0, 1 << 20, ex) == 0);
  }
  // Entry pointing at the header (metadata overlap): writes refused.
  sh("qemu-img create -q -f qcow2 " + img + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 1 0 128k' " + img);
  raw = file_bytes(img);
  l2 = l1e(0);
  patch(img, l2, be64(0x8000000000000000ull | 0x30000));  // guest 0 -> the L1 table
  {
    auto dev = open_rw(img);
    std::vector<std::byte> b(512, std::byte{9});
    CHECK(dev->write(0, b, false) == EIO);
  }
  CHECK(file_bytes(img).size() > 0);
}

TEST_CASE("qcow2 fuzzed headers and tables never crash") {
  TempDir d;
  std::string good = d / "good.qcow2";
  sh("qemu-img create -q -f qcow2 -o cluster_size=4k " + good + " 4M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 1 0 64k' -c 'write -c -P 3 1M 64k' -c 'write -z 2M "
     "8k' " +
     good);
  const auto orig = file_bytes(good);
  std::mt19937_64 rng(99);
  int opened = 0, refused = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string img = d / "fz.qcow2";
    {
      std::ofstream f(img, std::ios::binary | std::ios::trunc);
      f.write(reinterpret_cast<const char*>(orig.data()),
              static_cast<std::streamsize>(orig.size()));
    }
    int nmut = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < nmut; ++k) {
      // Mostly the header, sometimes anywhere in the metadata clusters.
      uint64_t off = rng() % 3 ? rng() % 112 : rng() % std::min<uint64_t>(orig.size(), 0x8000);
      uint8_t v = rng() % 2 ? uint8_t(rng()) : uint8_t(0xff);
      patch(img, off, {v});
    }
    try {
      auto dev = open_rw(img);
      ++opened;
      std::vector<std::byte> b(1 << 20);
      for (uint64_t off = 0; off < dev->size(); off += b.size()) {
        (void)dev->read(off, std::span(b).first(std::min<uint64_t>(b.size(), dev->size() - off)));
      }
      std::vector<strata::Extent> ex;
      (void)dev->extents(0, dev->size(), ex);
      if (dev->size() >= 2 << 20 && !dev->capabilities().read_only) {
        (void)dev->write(12345, std::span(b).first(70000), false);
        (void)dev->write_zeroes(1 << 20, 65536, {});
        (void)dev->trim(0, 65536, false);
        (void)dev->flush();
      }
    } catch (const strata::ImageError& e) {
      ++refused;
      CHECK(std::string(e.what()).find(img) == 0);
    }
  }
  MESSAGE("fuzz: opened " << opened << ", refused " << refused);
  CHECK(opened + refused == 300);
}

TEST_CASE("qcow2 backing chain safety: loops, json:, escapes, depth, raw probing") {
  TempDir d;
  Chdir cd(d.path);
  // Self loop and two-image loop.
  sh("qemu-img create -q -f qcow2 -u -b z.qcow2 -F qcow2 a.qcow2 1M");
  {
    auto bytes = file_bytes(d / "a.qcow2");
    std::string s(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    auto pos = s.find("z.qcow2");
    REQUIRE(pos != std::string::npos);
    patch(d / "a.qcow2", pos, {'a'});
  }
  std::string err = open_error(d / "a.qcow2");
  CHECK(err.find("loop") != std::string::npos);
  sh("qemu-img create -q -f qcow2 b.qcow2 1M");
  sh("qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 c.qcow2 1M");
  sh("qemu-img rebase -q -u -b c.qcow2 -F qcow2 -f qcow2 b.qcow2");
  err = open_error(d / "c.qcow2");
  CHECK(err.find("loop") != std::string::npos);
  // json: and protocol names.
  sh("qemu-img create -q -f qcow2 -u -b 'json:{\"file.filename\":\"/etc/passwd\"}' -F raw j.qcow2 "
     "1M");
  err = open_error(d / "j.qcow2");
  CHECK(err.find("json:") != std::string::npos);
  sh("qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1/x' -F raw p.qcow2 1M");
  err = open_error(d / "p.qcow2");
  CHECK(err.find("protocol") != std::string::npos);
  // Escaping the allowed directory.
  fs::create_directory(d / "sub");
  sh("qemu-img create -q -f raw outside.raw 1M");
  sh("qemu-img create -q -f qcow2 -u -b ../outside.raw -F raw sub/e.qcow2 1M");
  err = open_error(d / "sub/e.qcow2");
  CHECK(err.find("outside the allowed directories") != std::string::npos);
  // Depth limit.
  sh("qemu-img create -q -f qcow2 l0.qcow2 1M");
  for (int i = 1; i <= 20; ++i) {
    sh("qemu-img create -q -f qcow2 -u -b l" + std::to_string(i - 1) + ".qcow2 -F qcow2 l" +
       std::to_string(i) + ".qcow2 1M");
  }
  err = open_error(d / "l20.qcow2");
  CHECK(err.find("deeper than") != std::string::npos);
  CHECK(open_error(d / "l10.qcow2").empty());
  // Backing without a recorded format: qcow2 is probed, raw needs an opt-in.
  // (qemu-img insists on a format: record one, then hide the extension.)
  auto drop_backing_format = [&](const std::string& img) {
    auto bytes = file_bytes(img);
    for (size_t i = 0; i + 4 < 4096; ++i) {
      if (bytes[i] == std::byte{0xE2} && bytes[i + 1] == std::byte{0x79} &&
          bytes[i + 2] == std::byte{0x2A} && bytes[i + 3] == std::byte{0xCA}) {
        patch(img, i, {0x12, 0x34, 0x56, 0x78});
        return;
      }
    }
    FAIL("no backing format extension");
  };
  sh("qemu-img create -q -f qcow2 -u -b outside.raw -F raw nf.qcow2 1M");
  drop_backing_format(d / "nf.qcow2");
  err = open_error(d / "nf.qcow2");
  CHECK(err.find("no recorded format") != std::string::npos);
  strata::OpenOptions o;
  o.allow_raw_backing_probe = true;
  CHECK_NOTHROW(open_ro(d / "nf.qcow2", o));
  sh("qemu-img create -q -f qcow2 -u -b l0.qcow2 -F qcow2 nq.qcow2 1M");
  drop_backing_format(d / "nq.qcow2");
  CHECK(open_error(d / "nq.qcow2").empty());
  // A backing file is never opened writable.
  auto dev = open_rw(d / "l1.qcow2");
  REQUIRE(dev->children().size() == 1);
  CHECK(dev->children()[0].device->capabilities().read_only);
}
