// Write paths: a seeded multi-threaded random workload (unaligned and
// cluster-spanning writes, zero writes, trims, flushes) over many image
// variants; afterwards `qemu-img check` must be clean and `qemu-img compare`
// must find the expected content, and backing files must be unchanged.
#include <mutex>
#include <thread>

#include "formats/create.h"
#include "formats/errors.h"
#include "qcow2_helpers.h"

using namespace qtest;

namespace {

void write_file(const std::string& path, const std::vector<std::byte>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

struct Workload {
  uint64_t seed = 1;
  int threads = 4;
  int ops = 150;
  uint64_t span = 16 << 20;  // ops land in [0, span)
  uint64_t stripe = 1 << 20;
  bool zero = true, trim = true, may_trim = true;
};

// Runs the workload on `img` (opened read-write with `o`), mirrors it in an
// expected image, then checks with qemu-img.
void run_workload(const std::string& img, const std::string& dir, const Workload& w,
                  strata::OpenOptions o = {}, const std::string& qemu_img_opts = "") {
  sh("qemu-img convert " + qemu_img_opts + " -O raw '" + img + "' '" + dir + "/expected.raw'");
  auto expected = file_bytes(dir + "/expected.raw");
  {
    auto dev = open_rw(img, o);
    REQUIRE(!dev->capabilities().read_only);
    REQUIRE(dev->size() == expected.size());
    const uint64_t span = std::min<uint64_t>(w.span, dev->size());
    const uint64_t nstripes = (span + w.stripe - 1) / w.stripe;
    std::mutex fail_mu;
    std::vector<std::string> failures;
    auto worker = [&](int t) {
      std::mt19937_64 rng(w.seed * 1000 + t);
      std::vector<std::byte> buf;
      for (int i = 0; i < w.ops; ++i) {
        uint64_t s = (rng() % ((nstripes + w.threads - 1) / w.threads)) * w.threads + t;
        if (s >= nstripes) continue;
        uint64_t sstart = s * w.stripe, send = std::min(span, sstart + w.stripe);
        uint64_t off = sstart + rng() % (send - sstart);
        uint64_t len = 1 + rng() % std::min<uint64_t>(send - off, (rng() % 4 == 0) ? 300000 : 9000);
        if (rng() % 3 == 0) {  // aligned ranges hit the whole-cluster paths
          off &= ~uint64_t{4095};
          len = std::min<uint64_t>((len + 4095) & ~uint64_t{4095}, send - off);
        }
        int kind = static_cast<int>(rng() % 10);
        int r = 0;
        if (kind < 6 || (!w.zero && kind < 8) || (!w.trim && kind == 8)) {
          buf.resize(len);
          uint8_t pat = static_cast<uint8_t>(rng());
          for (uint64_t k = 0; k < len; ++k)
            buf[k] = std::byte(static_cast<uint8_t>(pat + k * 7 + (k >> 9)));
          r = dev->write(off, buf, rng() % 16 == 0);
          if (!r) std::memcpy(expected.data() + off, buf.data(), len);
        } else if (kind < 8) {
          strata::ZeroFlags f;
          f.may_trim = w.may_trim && rng() % 2;
          r = dev->write_zeroes(off, len, f);
          if (!r) std::memset(expected.data() + off, 0, len);
        } else if (kind == 8) {
          r = dev->trim(off, len, false);
          if (!r) {
            // Trimmed bytes read as the old contents or as zeros.
            buf.resize(len);
            r = dev->read(off, buf);
            for (uint64_t k = 0; !r && k < len; ++k) {
              if (buf[k] != expected[off + k] && buf[k] != std::byte{0}) {
                std::lock_guard lk(fail_mu);
                failures.push_back("trim at " + std::to_string(off) + " exposed other data at +" +
                                   std::to_string(k));
                break;
              }
            }
            if (!r) std::memcpy(expected.data() + off, buf.data(), len);
          }
        } else {
          r = dev->flush();
        }
        if (!r && rng() % 4 == 0) {  // read back a range of our own stripe
          buf.resize(send - sstart);
          r = dev->read(sstart, buf);
          if (!r && std::memcmp(buf.data(), expected.data() + sstart, buf.size()) != 0) {
            std::lock_guard lk(fail_mu);
            failures.push_back("read-back mismatch in stripe " + std::to_string(s) + " after op " +
                               std::to_string(i));
          }
        }
        if (r) {
          std::lock_guard lk(fail_mu);
          failures.push_back("op " + std::to_string(kind) + " at " + std::to_string(off) + "+" +
                             std::to_string(len) + " failed: " + std::strerror(r));
          return;
        }
      }
    };
    std::vector<std::thread> ths;
    for (int t = 0; t < w.threads; ++t) ths.emplace_back(worker, t);
    for (auto& th : ths) th.join();
    std::string all;
    for (const auto& f : failures) all += f + "\n";
    INFO(all);
    REQUIRE(failures.empty());
    REQUIRE(dev->flush() == 0);
    auto got = read_all(*dev);
    CHECK(first_diff(got, expected) == -1);
  }
  write_file(dir + "/expected.raw", expected);
  int st = sh_status("qemu-img check " + qemu_img_opts + " '" + img + "'");
  INFO("qemu-img check: " << last_log());
  CHECK(st == 0);
  st = sh_status("qemu-img compare " + qemu_img_opts + " -F raw '" + img + "' '" + dir +
                 "/expected.raw'");
  INFO("qemu-img compare: " << last_log());
  CHECK(st == 0);
  // Our own check agrees.
  auto dev = open_ro(img, o);
  strata::CheckReport rep;
  dev->check(rep);
  INFO((rep.errors.empty() ? std::string() : rep.errors.front()));
  CHECK(rep.clean());
}

std::string prep(const std::string& img) {
  return "qemu-io -t unsafe -f qcow2 -c 'write -P 0x5e 0 3M' -c 'write -c -P 0x6c 6M 2M' -c 'write "
         "-z 5M 1M' '" +
         img + "'";
}

}  // namespace

TEST_CASE("qcow2 random workload: v3, v2, cluster sizes, refcount widths") {
  TempDir d;
  struct V {
    std::string opts;
    uint64_t seed;
  };
  for (const V& v : {V{"", 1}, V{"compat=0.10", 2}, V{"cluster_size=512", 3},
                     V{"cluster_size=4k,refcount_bits=1", 4}, V{"cluster_size=2M", 5},
                     V{"refcount_bits=64,cluster_size=1k", 6},
                     V{"compression_type=zstd,extended_l2=on,cluster_size=128k,lazy_refcounts=on,"
                       "refcount_bits=64",
                       7}}) {
    INFO("options: " << v.opts);
    std::string img = d / "w.qcow2";
    sh("qemu-img create -q -f qcow2 " + (v.opts.empty() ? "" : "-o " + v.opts) + " " + img +
       " 64M");
    sh(prep(img));
    Workload w;
    w.seed = v.seed;
    run_workload(img, d.path, w);
  }
}

TEST_CASE("qcow2 random workload over backing files (raw, qcow2, extended L2)") {
  TempDir d;
  std::string base = d / "base.raw", mid = d / "mid.qcow2", top = d / "top.qcow2";
  sh("qemu-img create -q -f raw " + base + " 24M");
  sh("qemu-io -t unsafe -f raw -c 'write -P 0xa1 0 20M' " + base);
  sh("qemu-img create -q -f qcow2 -b base.raw -F raw " + mid + " 32M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0xb1 1M 2M' -c 'write -z 6M 1M' -c 'write -c -P 0xb2 "
     "8M 128k' " +
     mid);
  auto base_before = file_bytes(base);
  auto mid_before = file_bytes(mid);
  for (std::string opts :
       {"", "compat=0.10", "extended_l2=on", "extended_l2=on,cluster_size=2M", "cluster_size=4k"}) {
    INFO("overlay options: " << opts);
    sh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 " + (opts.empty() ? "" : "-o " + opts) +
       " " + top + " 32M");
    Workload w;
    w.seed = 11 + opts.size();
    w.span = 30 << 20;
    w.stripe = 3 << 19;
    run_workload(top, d.path, w);
  }
  CHECK(first_diff(file_bytes(base), base_before) == -1);
  CHECK(first_diff(file_bytes(mid), mid_before) == -1);
}

TEST_CASE("qcow2 random workload: internal snapshot keeps its data") {
  TempDir d;
  std::string img = d / "s.qcow2";
  sh("qemu-img create -q -f qcow2 " + img + " 32M");
  sh(prep(img));
  sh("qemu-img snapshot -c s1 " + img);
  sh("qemu-img convert -O raw -l snapshot.name=s1 " + img + " " + d / "snap_before.raw");
  Workload w;
  w.seed = 21;
  run_workload(img, d.path, w);
  sh("qemu-img convert -O raw -l snapshot.name=s1 " + img + " " + d / "snap_after.raw");
  CHECK(first_diff(file_bytes(d / "snap_before.raw"), file_bytes(d / "snap_after.raw")) == -1);
}

TEST_CASE("qcow2 random workload: external data file, with and without data_file_raw") {
  TempDir d;
  Chdir cd(d.path);
  sh("qemu-img create -q -f qcow2 -o data_file=d.raw d.qcow2 32M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x31 0 3M' -c 'write -z 5M 1M' d.qcow2");
  Workload w;
  w.seed = 31;
  run_workload(d / "d.qcow2", d.path, w);

  for (std::string opts : {"", ",extended_l2=on"}) {
    sh("qemu-img create -q -f qcow2 -o data_file=dr.raw,data_file_raw=on" + opts + " dr.qcow2 32M");
    sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x41 0 3M' -c 'write -z 5M 1M' dr.qcow2");
    w.seed = 32 + opts.size();
    run_workload(d / "dr.qcow2", d.path, w);
    // The raw file alone is the virtual disk.
    CHECK(first_diff(file_bytes(d / "dr.raw"), file_bytes(d / "expected.raw")) == -1);
  }
}

TEST_CASE("qcow2 dirty image: refcounts rebuilt on a read-write open") {
  TempDir d;
  std::string img = d / "lazy.qcow2";
  sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on " + img + " 64M");
  sh_status("qemu-io -f qcow2 -c 'write -P 0x44 0 128k' -c 'write -P 0x45 5M 3M' -c 'sigraise 9' " +
            img);
  CHECK(sh_status("qemu-img check " + img) != 0);  // the oracle sees the stale refcounts
  Workload w;
  w.seed = 41;
  run_workload(img, d.path, w);
  auto j = nlohmann::json::parse(capture("qemu-img info --output=json " + img));
  CHECK(j["format-specific"]["data"]["lazy-refcounts"] == true);
  CHECK(j["dirty-flag"] == false);
}

TEST_CASE("qcow2 write edge cases: fast zero, read-only backing, corrupt bit") {
  TempDir d;
  std::string img = d / "e.qcow2";
  sh("qemu-img create -q -f qcow2 -o compat=0.10 " + img + " 8M");
  {
    auto dev = open_rw(img);
    strata::ZeroFlags f;
    f.fast_only = true;
    std::vector<std::byte> b(4096, std::byte{1});
    REQUIRE(dev->write(0, b, false) == 0);
    CHECK(dev->write_zeroes(0, 4096, f) == ENOTSUP);  // v2: no zero flag
  }
  std::string v3 = d / "v3.qcow2";
  sh("qemu-img create -q -f qcow2 " + v3 + " 8M");
  {
    auto dev = open_rw(v3);
    strata::ZeroFlags f;
    f.fast_only = true;
    std::vector<std::byte> b(65536 * 2, std::byte{1});
    REQUIRE(dev->write(0, b, false) == 0);
    CHECK(dev->write_zeroes(0, 65536, f) == 0);
    CHECK(dev->write_zeroes(65536, 100, f) == ENOTSUP);
  }
  sh("qemu-io -t unsafe -f qcow2 -c 'read -P 0 0 64k' -c 'read -P 1 64k 64k' " + v3);
  // Corrupt bit: refused read-write (as QEMU), served read-only.
  sh("printf '\\0\\0\\0\\0\\0\\0\\0\\2' | dd of=" + v3 + " bs=1 seek=72 conv=notrunc status=none");
  CHECK_THROWS_WITH(open_rw(v3), doctest::Contains("corrupt bit"));
  auto dev = open_ro(v3);
  CHECK(dev->capabilities().read_only);
  std::vector<std::byte> b(512);
  CHECK(dev->write(0, b, false) == EPERM);
  CHECK(dev->read(65536, b) == 0);
}

TEST_CASE("qcow2 create: images qemu-img accepts, writable by both") {
  TempDir d;
  Chdir cd(d.path);
  sh("qemu-img create -q -f raw base.raw 8M");
  sh("qemu-io -t unsafe -f raw -c 'write -P 0x3c 0 8M' base.raw");
  struct V {
    std::map<std::string, std::string> o;
    bool backing;
  };
  std::vector<V> vs = {
      {{}, false},
      {{{"compat", "0.10"}}, false},
      {{{"cluster_size", "512"}, {"refcount_bits", "1"}}, false},
      {{{"cluster_size", "2M"}, {"extended_l2", "on"}, {"compression_type", "zstd"}}, false},
      {{{"refcount_bits", "64"}, {"lazy_refcounts", "on"}}, true},
      {{{"data_file", "new.raw"}}, false},
      {{{"data_file", "newr.raw"}, {"data_file_raw", "on"}, {"extended_l2", "on"}}, false},
  };
  for (const auto& v : vs) {
    strata::CreateOptions c;
    c.format = strata::Format::qcow2;
    c.path = d / "n.qcow2";
    c.options = v.o;
    if (v.backing) {
      c.backing = "base.raw";
      c.backing_format = strata::Format::raw;
    } else {
      c.size = 12 << 20;
    }
    strata::create_image(c);
    std::string desc;
    for (auto& [k, val] : v.o) desc += k + "=" + val + " ";
    INFO("create " << desc);
    CHECK(sh_status("qemu-img check n.qcow2") == 0);
    auto j = nlohmann::json::parse(capture("qemu-img info --output=json n.qcow2"));
    CHECK(j["virtual-size"] == (v.backing ? 8 << 20 : 12 << 20));
    {
      auto dev = open_rw(c.path);
      std::vector<std::byte> b(100000, std::byte{0x6d});
      REQUIRE(dev->write(70000, b, false) == 0);
    }
    sh("qemu-io -t unsafe -f qcow2 -c 'read -P 0x6d 70000 100000' -c 'write -P 0x6e 1M 64k' "
       "n.qcow2");
    CHECK(sh_status("qemu-img check n.qcow2") == 0);
    auto dev = open_ro(c.path);
    std::vector<std::byte> b(65536);
    REQUIRE(dev->read(1 << 20, b) == 0);
    CHECK(b[0] == std::byte{0x6e});
    if (v.backing) {
      REQUIRE(dev->read(4 << 20, b) == 0);
      CHECK(b[0] == std::byte{0x3c});
    }
  }
  strata::CreateOptions bad;
  bad.format = strata::Format::qcow2;
  bad.path = d / "bad.qcow2";
  bad.size = 1 << 20;
  bad.options = {{"cluster_size", "3000"}};
  CHECK_THROWS_WITH_AS(strata::create_image(bad), doctest::Contains("cluster_size"),
                       strata::ImageError);
}

TEST_CASE("qcow2 persistent bitmaps: autoclear bit cleared before the first write") {
  TempDir d;
  std::string img = d / "b.qcow2";
  sh("qemu-img create -q -f qcow2 " + img + " 16M");
  sh("qemu-io -t unsafe -f qcow2 -c 'write -P 0x71 0 1M' " + img);
  sh("qemu-img bitmap --add " + img + " b0");
  expect_same_as_qemu(img, d / "out.raw");
  {
    auto dev = open_rw(img);
    std::vector<std::byte> b(70000, std::byte{0x72});
    REQUIRE(dev->write(500000, b, false) == 0);
  }
  // The bitmap is now known stale (QEMU then ignores the extension and counts
  // its clusters as leaked); the image itself stays consistent.
  int st = sh_status("qemu-img check " + img);
  CHECK((st == 0 || st == 3));
  CHECK(last_log().find("ERROR") == std::string::npos);
  auto info = nlohmann::json::parse(capture("qemu-img info --output=json " + img));
  CHECK(info["format-specific"]["data"]["corrupt"] == false);
  sh("qemu-io -f qcow2 -r -c 'read -P 0x72 500000 70000' -c 'read -P 0x71 0 500000' " + img);
  auto dev = open_ro(img);
  strata::CheckReport rep;
  dev->check(rep);
  CHECK(rep.clean());
  CHECK(rep.leaks.empty());
}

TEST_CASE("qcow2 random workload with a tiny metadata cache (dirty evictions)") {
  TempDir d;
  strata::OpenOptions o;
  o.metadata_cache_bytes = 1;  // clamps to the minimum: 2 L2 tables, 4 refcount blocks
  for (std::string opts :
       {"cluster_size=4k", "cluster_size=16k,extended_l2=on", "cluster_size=512,refcount_bits=8"}) {
    INFO("options: " << opts);
    std::string img = d / "tiny.qcow2";
    sh("qemu-img create -q -f qcow2 -o " + opts + " " + img + " 32M");
    sh(prep(img));
    sh("qemu-img snapshot -c s1 " + img);
    Workload w;
    w.seed = 51 + opts.size();
    w.ops = 100;
    run_workload(img, d.path, w, o);
  }
}
