// The BlockDevice contract, run against every driver configuration: seeded
// random operations (read, write with and without FUA, zero with and without
// may-trim, trim, flush, cache, extents) compared with an in-memory model of
// the guest's bytes; every extents answer is checked against the model (a
// run flagged zero or hole must read as zeros), the image is reopened every
// few thousand operations and compared whole, and at the end the driver's own
// check() must find the image clean. A new driver or filter gets the suite by
// adding a configuration.
//
// The model starts from what the test itself wrote into lower layers (a
// backing file, parents, a compressed image), never from the device.
//
// Host mapping (map_host, for copy-free reads): beside every read, the same
// range is mapped and, where the driver maps it, the pieces (pread from
// their descriptors, zeros for zero runs) must hold the model's bytes;
// configurations whose data cannot move must map every range, and a
// read-only open of every image must map (compressed clusters excepted).
#include <doctest/doctest.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "formats/create.h"
#include "formats/direct_file.h"
#include "formats/open.h"
#include "tests/support/images.h"
#include "tests/support/shell.h"
#include "tests/support/temp_dir.h"

using namespace strata;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kSize = uint64_t{4} << 20;
constexpr int kOps = 10000;
constexpr int kReopenEvery = 2500;

using test::sh;
using test::TempDir;

using Model = std::vector<uint8_t>;
using Opener = std::function<std::shared_ptr<BlockDevice>()>;

std::span<std::byte> bytes(Model& m, uint64_t off, uint64_t len) {
  return {reinterpret_cast<std::byte*>(m.data()) + off, len};
}

// Fills [off, off+len) of a device (and the model) with seeded bytes.
void fill(BlockDevice& dev, Model& m, uint64_t off, uint64_t len, uint32_t seed) {
  std::mt19937 rng(seed);
  for (uint64_t i = off; i < off + len; ++i) m[i] = static_cast<uint8_t>(rng() | 1);
  REQUIRE(dev.write(off, bytes(m, off, len), false) == 0);
  REQUIRE(dev.flush() == 0);
}

// Writes data into every other 64 KiB of a lower layer, so that an upper
// layer has both data and holes to fall through to.
void fill_lower(const std::string& path, Model& m, uint32_t seed) {
  auto dev = open_image(path, OpenOptions{});
  REQUIRE(dev);
  for (uint64_t off = (seed % 2) * 65536; off < kSize; off += 131072) {
    fill(*dev, m, off, 65536, seed + static_cast<uint32_t>(off));
  }
}

void create(Format f, const std::string& path, std::map<std::string, std::string> o = {},
            std::optional<std::string> backing = {}) {
  // VHD would round the size up to a CHS geometry; the model has kSize bytes.
  if (f == Format::vhd) o["force_size"] = "on";
  std::optional<uint64_t> size;
  if (!backing) size = kSize;
  test::create_image(f, path, size, std::move(o), std::move(backing));
}

// Compares the whole device with the model; "" when equal.
std::string compare_all(BlockDevice& dev, const Model& m) {
  std::vector<std::byte> buf(kSize);
  if (int e = dev.read(0, buf)) return "full read failed: errno " + std::to_string(e);
  for (uint64_t i = 0; i < kSize; ++i) {
    if (static_cast<uint8_t>(buf[i]) != m[i]) return "byte " + std::to_string(i) + " differs";
  }
  return {};
}

// Checks an extents answer: in order, contiguous, at least one byte, and
// every run flagged zero or hole reads as zeros in the model.
std::string check_extents(const std::vector<Extent>& ext, uint64_t off, uint64_t len,
                          const Model& m) {
  if (ext.empty()) return "extents: empty answer";
  uint64_t pos = off;
  for (const Extent& x : ext) {
    if (x.length == 0) return "extents: a run of 0 bytes";
    if (pos >= off + len) break;
    const uint64_t end = std::min(pos + x.length, off + len);
    if (x.zero || x.hole) {
      for (uint64_t i = pos; i < end; ++i) {
        if (m[i] != 0) {
          return "extents: byte " + std::to_string(i) + " flagged " + (x.hole ? "hole" : "zero") +
                 " holds data";
        }
      }
    }
    pos = end;
  }
  return {};
}

// Up to 8 reads and writes (no FUA) in distinct eighths of the disk, run
// as one batch (BlockDevice::run_batch): "" when each did what the model
// says.
std::string run_batch_op(BlockDevice& dev, Model& m, std::mt19937_64& rng,
                         std::ostringstream& what) {
  constexpr uint64_t kSlice = kSize / 8;
  std::vector<BatchIo> ops;
  std::vector<std::vector<std::byte>> bufs(8);
  what << "batch";
  for (uint64_t slice = 0; slice < 8; ++slice) {
    if (rng() % 2) continue;
    const bool aligned = rng() % 2;
    uint64_t len = 1 + rng() % (64 * 1024);
    uint64_t off = slice * kSlice + rng() % (kSlice - len - 1024);  // rounding stays inside
    if (aligned) {
      off &= ~uint64_t{511};
      len = (len + 511) & ~uint64_t{511};
    }
    const bool write = rng() % 2;
    what << (write ? " write " : " read ") << off << "+" << len;
    if (write) {
      for (uint64_t k = 0; k < len; ++k) m[off + k] = static_cast<uint8_t>(rng());
      auto data = bytes(m, off, len);
      bufs[slice].assign(data.begin(), data.end());
    } else {
      bufs[slice].assign(len, std::byte{0xee});
    }
    ops.push_back({.offset = off, .data = bufs[slice].data(), .length = len, .write = write});
  }
  dev.run_batch(ops);
  for (const BatchIo& op : ops) {
    if (op.result) return "errno " + std::to_string(op.result) + " at " + std::to_string(op.offset);
    for (uint64_t k = 0; !op.write && k < op.length; ++k) {
      if (static_cast<uint8_t>(op.data[k]) != m[op.offset + k]) {
        return "byte " + std::to_string(op.offset + k);
      }
    }
  }
  return {};
}

// What a mapping of [off, off + len) holds compared with the model; "" when
// equal. `mapped`: map_host succeeded; `from_files`: it named file bytes.
struct MappingCheck {
  std::string fail;
  bool mapped = false;
  bool from_files = false;
};

MappingCheck check_mapping(BlockDevice& dev, uint64_t off, uint64_t len, const Model& m) {
  MappingCheck c;
  std::vector<HostPiece> pieces;
  const int e = dev.map_host(off, len, pieces);
  if (e == ENOTSUP) return c;
  if (e) {
    c.fail = "map_host: errno " + std::to_string(e);
    return c;
  }
  c.mapped = true;
  std::vector<uint8_t> buf;
  uint64_t pos = off;
  for (const HostPiece& p : pieces) {
    if (p.length == 0) c.fail = "map_host: a piece of 0 bytes";
    if (pos + p.length > off + len) c.fail = "map_host: pieces past the range";
    if (!c.fail.empty()) return c;
    buf.assign(p.length, 0);
    if (!p.zero()) {
      c.from_files = true;
      const ssize_t n = ::pread(p.fd, buf.data(), buf.size(), static_cast<off_t>(p.host_offset));
      if (n != static_cast<ssize_t>(buf.size())) {
        c.fail = "map_host: piece at host " + std::to_string(p.host_offset) + " reads short";
        return c;
      }
    }
    for (uint64_t k = 0; k < p.length; ++k) {
      if (buf[k] != m[pos + k]) {
        c.fail = "map_host: byte " + std::to_string(pos + k) + " differs";
        return c;
      }
    }
    pos += p.length;
  }
  if (pos != off + len) c.fail = "map_host: pieces cover " + std::to_string(pos - off) + " bytes";
  return c;
}

// Runs the contract; "" when every answer matched the model, else the first
// mismatch with the operation that showed it.
// `must_map`: every read's range must map (data that cannot move).
std::string run_contract(const Opener& open, Model& m, uint32_t seed, int ops = kOps,
                         bool must_map = false) {
  std::mt19937_64 rng(seed);
  auto dev = open();
  if (!dev) return "open failed";
  if (dev->size() != kSize) return "size " + std::to_string(dev->size());
  std::vector<std::byte> buf;
  auto pick = [&](uint64_t max_len) {
    const bool aligned = rng() % 2;
    uint64_t len = 1 + rng() % max_len;
    uint64_t off = rng() % kSize;
    if (aligned) {
      off &= ~uint64_t{511};
      len = (len + 511) & ~uint64_t{511};
    }
    len = std::min(len, kSize - off);
    return std::pair{off, len};
  };
  for (int i = 0; i < ops; ++i) {
    std::ostringstream what;
    const unsigned op = rng() % 100;
    std::string fail;
    if (op < 30) {  // read
      auto [off, len] = pick(256 * 1024);
      what << "read " << off << "+" << len;
      buf.resize(len);
      if (int e = dev->read(off, buf)) {
        fail = "errno " + std::to_string(e);
      } else {
        for (uint64_t k = 0; k < len && fail.empty(); ++k) {
          if (static_cast<uint8_t>(buf[k]) != m[off + k]) fail = "byte " + std::to_string(off + k);
        }
      }
      if (fail.empty()) {
        const MappingCheck c = check_mapping(*dev, off, len, m);
        fail = c.fail;
        if (fail.empty() && must_map && !c.mapped) fail = "map_host: not mapped";
      }
    } else if (op < 55) {  // write
      auto [off, len] = pick(192 * 1024);
      const bool fua = rng() % 4 == 0;
      what << "write " << off << "+" << len << (fua ? " fua" : "");
      for (uint64_t k = 0; k < len; ++k) m[off + k] = static_cast<uint8_t>(rng());
      if (int e = dev->write(off, bytes(m, off, len), fua)) fail = "errno " + std::to_string(e);
    } else if (op < 67) {  // write_zeroes
      auto [off, len] = pick(512 * 1024);
      const ZeroFlags f{.may_trim = rng() % 2 == 0, .fast_only = false, .fua = rng() % 4 == 0};
      what << "zero " << off << "+" << len << (f.may_trim ? " may-trim" : "");
      std::fill(m.begin() + off, m.begin() + off + len, 0);
      if (int e = dev->write_zeroes(off, len, f)) fail = "errno " + std::to_string(e);
    } else if (op < 74) {  // trim: afterwards each byte is as before or zero
      auto [off, len] = pick(512 * 1024);
      what << "trim " << off << "+" << len;
      buf.resize(len);
      if (int e = dev->trim(off, len, false)) {
        fail = "errno " + std::to_string(e);
      } else if (int e2 = dev->read(off, buf)) {
        fail = "read after trim: errno " + std::to_string(e2);
      } else {
        for (uint64_t k = 0; k < len && fail.empty(); ++k) {
          const auto b = static_cast<uint8_t>(buf[k]);
          if (b != m[off + k] && b != 0) fail = "byte " + std::to_string(off + k);
          m[off + k] = b;
        }
      }
    } else if (op < 81) {  // a batch: reads and writes in flight together, never overlapping
      fail = run_batch_op(*dev, m, rng, what);
    } else if (op < 90) {  // extents
      auto [off, len] = pick(kSize);
      what << "extents " << off << "+" << len;
      std::vector<Extent> ext;
      if (int e = dev->extents(off, len, ext)) {
        fail = "errno " + std::to_string(e);
      } else {
        fail = check_extents(ext, off, len, m);
      }
    } else if (op < 95) {
      what << "flush";
      if (int e = dev->flush()) fail = "errno " + std::to_string(e);
    } else {
      auto [off, len] = pick(1 << 20);
      what << "cache " << off << "+" << len;
      if (int e = dev->cache(off, len)) fail = "errno " + std::to_string(e);
    }
    if (!fail.empty()) return "op " + std::to_string(i) + " (" + what.str() + "): " + fail;
    if ((i + 1) % kReopenEvery == 0) {
      if (int e = dev->flush()) return "flush before reopen: errno " + std::to_string(e);
      dev.reset();
      dev = open();
      if (!dev) return "reopen failed";
      if (auto f = compare_all(*dev, m); !f.empty()) return "after reopen: " + f;
    }
  }
  if (int e = dev->flush()) return "final flush: errno " + std::to_string(e);
  CheckReport report;
  dev->check(report);
  if (!report.clean()) return "check: " + report.errors.front();
  return compare_all(*dev, m);
}

Opener opener(const std::string& path, OpenOptions o = {}) {
  return [path, o] { return open_image(path, o); };
}

// One configuration: makes its images in `dir`, sets the model's starting
// bytes, and names the image to open.
struct Config {
  const char* name;
  std::function<std::string(const TempDir&, Model&)> make;
  // Written to, it still maps every range: its data never moves (raw, VHD,
  // data_file_raw).
  bool maps_writable = false;
};

std::string qemu_qcow2(const TempDir& d, const std::string& opts) {
  sh("qemu-img create -f qcow2 -o " + opts + " " + (d / "t.qcow2") + " " + std::to_string(kSize));
  return d / "t.qcow2";
}

std::vector<Config> configs() {
  return {
      {"raw",
       [](const TempDir& d, Model&) {
         create(Format::raw, d / "t.raw");
         return d / "t.raw";
       },
       true},
      {"vhd fixed",
       [](const TempDir& d, Model&) {
         create(Format::vhd, d / "t.vhd", {{"type", "fixed"}});
         return d / "t.vhd";
       },
       true},
      {"vhd dynamic",
       [](const TempDir& d, Model&) {
         create(Format::vhd, d / "t.vhd", {{"type", "dynamic"}, {"block_size", "65536"}});
         return d / "t.vhd";
       },
       true},
      {"vhd differencing 1 deep",
       [](const TempDir& d, Model& m) {
         create(Format::vhd, d / "p.vhd", {{"block_size", "65536"}});
         fill_lower(d / "p.vhd", m, 11);
         create(Format::vhd, d / "t.vhd", {{"block_size", "65536"}}, "p.vhd");
         return d / "t.vhd";
       },
       true},
      {"vhd differencing 3 deep",
       [](const TempDir& d, Model& m) {
         create(Format::vhd, d / "a.vhd", {{"block_size", "65536"}});
         fill_lower(d / "a.vhd", m, 21);
         create(Format::vhd, d / "b.vhd", {{"block_size", "65536"}}, "a.vhd");
         fill_lower(d / "b.vhd", m, 32);
         create(Format::vhd, d / "c.vhd", {{"block_size", "65536"}}, "b.vhd");
         fill_lower(d / "c.vhd", m, 43);
         create(Format::vhd, d / "t.vhd", {{"block_size", "65536"}}, "c.vhd");
         return d / "t.vhd";
       },
       true},
      {"qcow2 v2", [](const TempDir& d, Model&) { return qemu_qcow2(d, "compat=0.10"); }},
      {"qcow2 v3",
       [](const TempDir& d, Model&) { return qemu_qcow2(d, "compat=1.1,cluster_size=4096"); }},
      {"qcow2 extended L2",
       [](const TempDir& d, Model&) {
         return qemu_qcow2(d, "compat=1.1,extended_l2=on,cluster_size=65536");
       }},
      {"qcow2 compressed",
       [](const TempDir& d, Model& m) {
         create(Format::raw, d / "src.raw");
         fill_lower(d / "src.raw", m, 51);
         sh("qemu-img convert -c -f raw -O qcow2 -o cluster_size=65536 " + (d / "src.raw") + " " +
            (d / "t.qcow2"));
         return d / "t.qcow2";
       }},
      {"qcow2 backing",
       [](const TempDir& d, Model& m) {
         sh("qemu-img create -f qcow2 " + (d / "b.qcow2") + " " + std::to_string(kSize));
         fill_lower(d / "b.qcow2", m, 61);
         sh("qemu-img create -f qcow2 -F qcow2 -b b.qcow2 -o cluster_size=65536 " +
            (d / "t.qcow2"));
         return d / "t.qcow2";
       }},
      {"qcow2 data_file",
       [](const TempDir& d, Model&) {
         return qemu_qcow2(d, "data_file=" + (d / "t.data") + ",cluster_size=65536");
       }},
      {"qcow2 data_file_raw",
       [](const TempDir& d, Model&) {
         return qemu_qcow2(d, "data_file=" + (d / "t.data") + ",data_file_raw=on");
       },
       true},
  };
}

// A driver that forwards everything but claims the whole device is a hole:
// the suite must notice.
class HoleClaimingDevice final : public BlockDevice {
 public:
  explicit HoleClaimingDevice(std::shared_ptr<BlockDevice> d) : d_(std::move(d)) {}
  std::string_view format() const override { return d_->format(); }
  const std::string& path() const override { return d_->path(); }
  uint64_t size() const override { return d_->size(); }
  Capabilities capabilities() const override { return d_->capabilities(); }
  int read(uint64_t o, std::span<std::byte> b) override { return d_->read(o, b); }
  int write(uint64_t o, std::span<const std::byte> b, bool fua) override {
    return d_->write(o, b, fua);
  }
  int write_zeroes(uint64_t o, uint64_t n, ZeroFlags f) override {
    return d_->write_zeroes(o, n, f);
  }
  int trim(uint64_t o, uint64_t n, bool fua) override { return d_->trim(o, n, fua); }
  int flush() override { return d_->flush(); }
  int extents(uint64_t, uint64_t length, std::vector<Extent>& out) override {
    out.push_back({.length = length, .hole = true, .zero = true, .depth = 0});
    return 0;
  }

 private:
  std::shared_ptr<BlockDevice> d_;
};

}  // namespace

TEST_CASE("every driver configuration keeps the BlockDevice contract") {
  for (const Config& c : configs()) {
    SUBCASE(c.name) {
      TempDir dir;
      Model model(kSize, 0);
      const std::string image = c.make(dir, model);
      INFO(c.name);
      CHECK(run_contract(opener(image), model, 20261203, kOps, c.maps_writable) == "");
    }
  }
}

// Cache none reads and writes every file of the chain with O_DIRECT
// (formats/direct_file.h); the drivers must not see the difference.
TEST_CASE("every driver configuration keeps the BlockDevice contract under cache none") {
  for (const Config& c : configs()) {
    SUBCASE(c.name) {
      TempDir dir;
      Model model(kSize, 0);
      const std::string image = c.make(dir, model);
      INFO(c.name);
      OpenOptions o;
      o.file_system = direct_file_system();
      CHECK(run_contract(opener(image, o), model, 20261204) == "");
    }
  }
}

// A read-only layer maps every range but compressed clusters, and the pieces
// hold what read() reads: ranges of every alignment, across cluster and block
// boundaries, through backing files, parents and data files.
TEST_CASE("a read-only open of every configuration maps its ranges to the host bytes") {
  for (const Config& c : configs()) {
    SUBCASE(c.name) {
      TempDir dir;
      Model model(kSize, 0);
      const std::string image = c.make(dir, model);
      INFO(c.name);
      OpenOptions ro;
      ro.read_only = true;
      const bool compressed = std::string_view(c.name) == "qcow2 compressed";
      if (compressed) {  // every cluster of data is compressed until written
        auto fresh = open_image(image, ro);
        REQUIRE(fresh);
        const MappingCheck m = check_mapping(*fresh, 0, kSize, model);
        CHECK(m.fail == "");
        CHECK_FALSE(m.mapped);
      }
      // Some writes first, so that the layer holds data of its own.
      REQUIRE(run_contract(opener(image), model, 20261205, 600) == "");
      auto dev = open_image(image, ro);
      REQUIRE(dev);
      std::mt19937_64 rng(99);
      for (int i = 0; i < 400; ++i) {
        uint64_t off = rng() % kSize;
        if (i % 3 == 0) off &= ~uint64_t{65535};  // from a cluster or block start
        const uint64_t len = std::min<uint64_t>(1 + rng() % (640 * 1024), kSize - off);
        INFO("range " << off << "+" << len);
        const MappingCheck m = check_mapping(*dev, off, len, model);
        REQUIRE(m.fail == "");
        if (!compressed) REQUIRE(m.mapped);
      }
      CHECK(check_mapping(*dev, 0, kSize, model).fail == "");
    }
  }
}

// Cache none bypasses the page cache: nothing may be sent from it.
TEST_CASE("under cache none no configuration maps file bytes") {
  for (const Config& c : configs()) {
    SUBCASE(c.name) {
      TempDir dir;
      Model model(kSize, 0);
      const std::string image = c.make(dir, model);
      INFO(c.name);
      REQUIRE(run_contract(opener(image), model, 20261206, 300) == "");
      OpenOptions o;
      o.read_only = true;
      o.file_system = direct_file_system();
      auto dev = open_image(image, o);
      REQUIRE(dev);
      const MappingCheck m = check_mapping(*dev, 0, kSize, model);
      CHECK(m.fail == "");
      CHECK_FALSE(m.from_files);
    }
  }
}

TEST_CASE("the suite fails a driver whose extents claim a hole over data") {
  TempDir dir;
  create(Format::raw, dir / "t.raw");
  Model model(kSize, 0);
  const std::string path = dir / "t.raw";
  auto broken = [path] {
    return std::make_shared<HoleClaimingDevice>(open_image(path, OpenOptions{}));
  };
  const std::string result = run_contract(broken, model, 7, 2000);
  CHECK(result.find("flagged hole holds data") != std::string::npos);
}
