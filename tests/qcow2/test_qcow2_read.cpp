// Read paths of every docs/FORMATS.md Part D qcow2 variant, compared byte for byte
// with `qemu-img convert -O raw`, and allocation maps with `qemu-img map`.
#include "qcow2_helpers.h"

using namespace qtest;

namespace {

// Writes a mix of patterns, zeros and compressed clusters with qemu-io.
void populate(const std::string& img, uint64_t cluster, bool compressed = true, bool zeros = true) {
  std::string c = "qemu-io -t unsafe -f qcow2";
  c += " -c 'write -P 0x11 0 " + std::to_string(cluster) + "'";
  c += " -c 'write -P 0x22 " + std::to_string(cluster * 3 + 512) + " 1536'";
  c += " -c 'write -P 0x33 1M 200k'";
  c += " -c 'write -P 0x44 5000k 3000'";
  if (zeros)
    c += " -c 'write -z " + std::to_string(cluster * 20) + " " + std::to_string(cluster * 2) + "'";
  if (compressed)
    c += " -c 'write -c -P 0x55 " + std::to_string(cluster * 40) + " " + std::to_string(cluster) +
         "'";
  sh(c + " '" + img + "'");
}

}  // namespace

TEST_CASE("qcow2 v2 and v3 images read like qemu-img convert") {
  TempDir d;
  for (std::string compat : {"0.10", "1.1"}) {
    std::string img = d / ("c" + compat + ".qcow2");
    sh("qemu-img create -q -f qcow2 -o compat=" + compat + " " + img + " 64M");
    populate(img, 65536, true, compat != "0.10");
    expect_same_as_qemu(img, d / "out.raw");
    auto dev = open_ro(img);
    CHECK(dev->format() == "qcow2");
    CHECK(dev->size() == 64ull << 20);
    expect_map_consistent(img, *dev);
  }
}

TEST_CASE("qcow2 cluster sizes 512 B to 2 MiB") {
  TempDir d;
  for (uint64_t cs : {512ull, 4096ull, 65536ull, 2ull << 20}) {
    std::string img = d / ("cs" + std::to_string(cs) + ".qcow2");
    sh("qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(cs) + " " + img + " 96M");
    populate(img, cs);
    expect_same_as_qemu(img, d / "out.raw");
    auto dev = open_ro(img);
    expect_map_consistent(img, *dev);
  }
}

TEST_CASE("qcow2 compressed images: zlib, zstd, v2") {
  TempDir d;
  std::string src = d / "src.raw";
  sh("qemu-img create -q -f raw " + src + " 8M");
  sh("qemu-io -t unsafe -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 3M 100k' -c 'write -P "
     "0x63 7M 1000' " +
     src);
  // Some incompressible data too (stored as a normal cluster).
  sh("head -c 300000 /dev/urandom | dd of=" + src + " bs=1 seek=4500000 conv=notrunc status=none");
  for (std::string opt : {"", "-o compression_type=zstd", "-o compat=0.10"}) {
    std::string img = d / "c.qcow2";
    sh("qemu-img convert -c -O qcow2 " + opt + " " + src + " " + img);
    expect_same_as_qemu(img, d / "out.raw");
    auto dev = open_ro(img);
    CHECK(first_diff(read_all(*dev, 7777), file_bytes(src)) == -1);
    expect_map_consistent(img, *dev);
  }
}

TEST_CASE("qcow2 extended L2: subclusters over a backing file") {
  TempDir d;
  std::string base = d / "base.qcow2", ov = d / "ov.qcow2";
  sh("qemu-img create -q -f qcow2 " + base + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x77 0 4M' " + base);
  for (std::string cs : {"64k", "2M"}) {
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 -o extended_l2=on,cluster_size=" + cs +
       " " + ov);
    sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x12 4k 2k' -c 'write -z 16k 4k' -c 'write -P 0x13 "
       "1M 100k' "
       "-c 'write -z 2M 1M' -c 'write -P 0x14 3M 512' " +
       ov);
    expect_same_as_qemu(ov, d / "out.raw");
    auto dev = open_ro(ov);
    expect_map_consistent(ov, *dev);
  }
  std::string zx = d / "zx.qcow2";
  sh("qemu-img create -q -f qcow2 -o "
     "compression_type=zstd,extended_l2=on,cluster_size=128k,lazy_refcounts=on,"
     "refcount_bits=64 " +
     zx + " 64M");
  populate(zx, 128 << 10);
  expect_same_as_qemu(zx, d / "out.raw");
}

TEST_CASE("qcow2 backing chains: depth, zero clusters over data, sizes") {
  TempDir d;
  std::string base = d / "base.raw", mid = d / "mid.qcow2", top = d / "top.qcow2";
  sh("qemu-img create -q -f raw " + base + " 32M");
  sh("qemu-io -t unsafe -f raw -c 'write -P 0xa1 0 8M' -c 'write -P 0xa2 20M 1M' " + base);
  sh("qemu-img create -q -f qcow2 -b base.raw -F raw " + mid + " 48M");  // larger than its backing
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0xb1 1M 1M' -c 'write -z 4M 1M' -c 'write -P 0xb2 "
     "40M 64k' " +
     mid);
  sh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 " + top +
     " 40M");  // smaller than its backing
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0xc1 1536k 64k' -c 'write -z 0 64k' -c 'write -P "
     "0xc2 39M 1000' " +
     top);
  expect_same_as_qemu(top, d / "out.raw");
  auto dev = open_ro(top);
  CHECK(dev->size() == 40ull << 20);
  expect_map_consistent(top, *dev);

  auto depth_at = [&](uint64_t off) {
    std::vector<strata::Extent> ex;
    REQUIRE(dev->extents(off, 4096, ex) == 0);
    REQUIRE(!ex.empty());
    return ex[0];
  };
  CHECK(depth_at(0).depth == 1);  // zero cluster in top
  CHECK(depth_at(0).zero);
  CHECK(depth_at(1536 << 10).depth == 1);
  CHECK(depth_at(1 << 20).depth == 2);  // mid data
  CHECK(depth_at(4 << 20).depth == 2);  // mid zero cluster over base data
  CHECK(depth_at(4 << 20).zero);
  CHECK(depth_at(6 << 20).depth == 3);   // base data
  CHECK(depth_at(12 << 20).depth == 3);  // raw hole: allocated in the base (qemu: 3)
  CHECK(depth_at(12 << 20).hole);
  CHECK(depth_at(34ull << 20).depth == 0);  // beyond the raw base
  CHECK(dev->children().size() == 1);
}

TEST_CASE("qcow2 external data file, with and without data_file_raw") {
  TempDir d;
  Chdir cd(d.path);
  std::string img = d / "d.qcow2", raw = d / "d.raw";
  sh("cd " + d.path + " && qemu-img create -q -f qcow2 -o data_file=d.raw d.qcow2 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x31 0 100k' -c 'write -z 1M 64k' -c 'write -P 0x32 "
     "7M 4k' " +
     img);
  expect_same_as_qemu(img, d / "out.raw");
  {
    auto dev = open_ro(img);
    expect_map_consistent(img, *dev);
  }
  std::string imgr = d / "dr.qcow2", rawr = d / "dr.raw";
  sh("cd " + d.path +
     " && qemu-img create -q -f qcow2 -o data_file=dr.raw,data_file_raw=on dr.qcow2 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x41 0 100k' -c 'write -z 1M 64k' -c 'write -P 0x42 "
     "7M 4k' " +
     imgr);
  expect_same_as_qemu(imgr, d / "out.raw");
  {
    auto dev = open_ro(imgr);
    CHECK(first_diff(read_all(*dev), file_bytes(rawr)) == -1);
    expect_map_consistent(imgr, *dev);
  }
  // data_file_raw with extended L2: the raw file is authoritative even where
  // QEMU 7.2 reads zeros (empty subcluster bitmaps, docs/FORMATS.md B10).
  std::string imgx = d / "drx.qcow2", rawx = d / "drx.raw";
  sh("cd " + d.path +
     " && qemu-img create -q -f qcow2 -o data_file=drx.raw,data_file_raw=on,extended_l2=on "
     "drx.qcow2 64M");
  sh("qemu-io -t unsafe -f raw -c 'write -P 0x5a 2M 64k' " + rawx);
  {
    auto dev = open_ro(imgx);
    CHECK(first_diff(read_all(*dev), file_bytes(rawx)) == -1);
  }
  // Data file overridden by configuration.
  std::string other = d / "other.raw";
  sh("cp " + raw + " " + other);
  sh("qemu-io -t unsafe -f raw -c 'write -P 0x99 0 4k' " + other);
  strata::OpenOptions o;
  o.data_file = other;
  auto dev = open_ro(img, o);
  std::vector<std::byte> b(4096);
  REQUIRE(dev->read(0, b) == 0);
  CHECK(b[0] == std::byte{0x99});
}

TEST_CASE("qcow2 dirty lazy-refcount image, odd size, snapshot, refcount_bits=1, preallocation") {
  TempDir d;
  std::string lazy = d / "lazy.qcow2";
  sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + lazy + " 64M");
  sh_status("qemu-io -f qcow2 -c 'write -P 0x44 0 128k' -c 'sigraise 9' " + lazy);
  expect_same_as_qemu(lazy, d / "out.raw");
  expect_map_consistent(lazy, *open_ro(lazy));

  std::string odd = d / "odd.qcow2";
  sh("qemu-img create -q -f qcow2 " + odd + " 10000001");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x45 9999360 512' " + odd);
  expect_same_as_qemu(odd, d / "out.raw");
  expect_map_consistent(odd, *open_ro(odd));
  CHECK(open_ro(odd)->size() == 10000384);  // qemu-img create rounds up to 512

  std::string snap = d / "snap.qcow2";
  sh("qemu-img create -q -f qcow2 -o compat=0.10 " + snap + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x46 0 1M' " + snap);
  sh("qemu-img snapshot -c s1 " + snap);
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x47 512k 1M' " + snap);
  expect_same_as_qemu(snap, d / "out.raw");
  expect_map_consistent(snap, *open_ro(snap));

  std::string r1 = d / "r1.qcow2";
  sh("qemu-img create -q -f qcow2 -o refcount_bits=1 " + r1 + " 64M");
  populate(r1, 65536);
  expect_same_as_qemu(r1, d / "out.raw");
  expect_map_consistent(r1, *open_ro(r1));

  std::string pm = d / "pm.qcow2";
  sh("qemu-img create -q -f qcow2 -o preallocation=metadata " + pm + " 64M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x48 3M 5k' " + pm);
  expect_same_as_qemu(pm, d / "out.raw");
  expect_map_consistent(pm, *open_ro(pm));
}

TEST_CASE("qcow2 info and check on a clean image") {
  TempDir d;
  std::string img = d / "i.qcow2";
  sh("qemu-img create -q -f qcow2 -o compression_type=zstd " + img + " 64M");
  populate(img, 65536);
  auto dev = open_ro(img);
  nlohmann::json j;
  dev->describe(j);
  CHECK(j["compat"] == "1.1");
  CHECK(j["cluster-size"] == 65536);
  CHECK(j["compression-type"] == "zstd");
  strata::CheckReport rep;
  dev->check(rep);
  INFO(rep.errors.size() << (rep.errors.empty() ? "" : rep.errors[0]));
  CHECK(rep.clean());
  CHECK(rep.leaks.empty());
  CHECK(dev->stats().find("L2 cache") != std::string::npos);
}
