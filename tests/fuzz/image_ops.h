// The image driver harness shared by fuzz_qcow2 and fuzz_vhd: an input is an
// op script followed by an image; the image is opened from memory
// (MemoryFile), checked, driven through the script's reads, writes, zeroes,
// trims, flushes and block-status queries, flushed, reopened read-only and
// checked again.
//
// Input layout:
//   bytes [0, 64)   the script: byte 0 = open mode (bit 0: read-only, the
//                   rest is the driver's), byte 1 = metadata cache budget in
//                   4 KiB units, bytes 2-7 unused, then 7 ops of 8 bytes (Op
//                   below; a short script is padded with zeros);
//   bytes [64, end) the image file.
// make_corpus.py writes seeds in this layout.
//
// Invariants (FUZZ_CHECK):
//  - on every image: a successful extents() call covers at least one byte
//    with extents of non-zero length, and what it flags zero reads as zeros;
//  - on images whose check() reports no error ("clean"), with the shadow
//    (Shadow below) of what was written: a read returns what was last
//    written, zeros after a successful write_zeroes, the old data or zeros
//    after a trim, and the same bytes as the last read elsewhere;
//  - a clean image, after the ops and a successful flush, still opens, reads
//    back the same, and its check() still reports no error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "formats/block_device.h"
#include "formats/errors.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/memory_file.h"
#include "tests/fuzz/shadow.h"

namespace strata::fuzz {

inline constexpr size_t kScriptBytes = 64;
inline constexpr size_t kOpBytes = 8;
inline constexpr size_t kOps = (kScriptBytes - 8) / kOpBytes;
// Ops reach the first kWindow bytes of the device (images can be terabytes).
inline constexpr uint64_t kWindow = 64ull << 20;
// Largest buffer one op reads or writes.
inline constexpr uint64_t kMaxIo = 256 * 1024;

// One op: kind, flags, offset (u16), length (u16), two pattern bytes.
//   flags bit 0: FUA; bit 1: write_zeroes may trim; bit 2: fast zero only;
//   bit 3: byte granularity (else 512-byte sectors).
struct Op {
  enum Kind : uint8_t { kRead, kWrite, kZero, kTrim, kFlush, kExtents, kCache, kCount };
  Kind kind;
  bool fua, may_trim, fast_only, bytewise;
  uint16_t offset_units, length_units;
  uint8_t p, q;

  static Op decode(const uint8_t* b) {
    Op op;
    op.kind = static_cast<Kind>(b[0] % kCount);
    op.fua = b[1] & 1;
    op.may_trim = b[1] & 2;
    op.fast_only = b[1] & 4;
    op.bytewise = b[1] & 8;
    op.offset_units = static_cast<uint16_t>(b[2] | b[3] << 8);
    op.length_units = static_cast<uint16_t>(b[4] | b[5] << 8);
    op.p = b[6];
    op.q = b[7];
    return op;
  }
};

// Runs one input against a driver. `open` opens a File as that driver's
// device (throwing ImageError when it refuses the image).
class ImageSession {
 public:
  struct Settings {
    bool writable = true;
    uint64_t cache_bytes = 0;  // 0: the driver's default
    uint8_t variant = 0;       // script byte 0 without bit 0, for the driver to use
  };
  using Opener =
      std::function<std::shared_ptr<BlockDevice>(std::unique_ptr<File>, const Settings&)>;

  // Adjusts the image before it is opened (fuzz_vhd: fixes checksums, so
  // that mutations reach the code behind them).
  using Fixup = std::function<void(Bytes&, const Settings&)>;

  ImageSession(std::string path, Opener open, Fixup fixup = {})
      : path_(std::move(path)), open_(std::move(open)), fixup_(std::move(fixup)) {}

  void run(const uint8_t* data, size_t size) {
    uint8_t script[kScriptBytes] = {};
    std::memcpy(script, data, std::min(size, kScriptBytes));
    if (size <= kScriptBytes) return;
    bytes_ = std::make_shared<Bytes>(reinterpret_cast<const std::byte*>(data) + kScriptBytes,
                                     reinterpret_cast<const std::byte*>(data) + size);
    const bool writable = !(script[0] & 1);
    settings_.cache_bytes = uint64_t{script[1]} * 4096;
    settings_.variant = script[0] >> 1;
    if (fixup_) fixup_(*bytes_, settings_);
    dev_ = open_device(writable);
    if (!dev_) return;
    window_ = std::min(dev_->size(), kWindow);
    clean_ = check_clean(*dev_);
    for (size_t i = 0; i < kOps && window_ > 0; ++i) apply(Op::decode(script + 8 + i * kOpBytes));
    if (!clean_) return;
    verify_known("a read after the ops does not return what was written");
    if (!writable || dev_->flush() != 0) return;
    dev_.reset();  // closes: writes back every cached table
    dev_ = open_device(false);
    FUZZ_CHECK(dev_ != nullptr, "a clean image no longer opens after writes and a flush");
    verify_known("after a flush and a reopen, a read does not return what was written");
    FUZZ_CHECK(check_clean(*dev_), "writes made a clean image fail its check");
  }

 private:
  std::shared_ptr<BlockDevice> open_device(bool writable) {
    auto file = std::make_unique<MemoryFile>(path_, bytes_, writable, ++inode_);
    settings_.writable = writable;
    try {
      return open_(std::move(file), settings_);
    } catch (const ImageError& e) {
      if (std::getenv("STRATA_FUZZ_LOG")) std::fprintf(stderr, "refused: %s\n", e.what());
      return nullptr;
    }
  }

  static bool check_clean(BlockDevice& dev) {
    CheckReport report;
    dev.check(report);
    if (std::getenv("STRATA_FUZZ_LOG")) {
      for (const auto& e : report.errors) std::fprintf(stderr, "check: %s\n", e.c_str());
    }
    return report.clean();
  }

  // The op's byte range, inside the window; length 0 means nothing to do.
  std::pair<uint64_t, uint64_t> range(const Op& op, uint64_t max_len) const {
    const uint64_t unit = std::max<uint64_t>(512, (window_ / 65536 + 511) / 512 * 512);
    uint64_t off = uint64_t{op.offset_units} * unit % window_;
    uint64_t len;
    if (op.bytewise) {
      off = std::min(off + op.p, window_ - 1);
      len = 1 + op.length_units % max_len;
    } else {
      off -= off % 512;
      len = (1 + op.length_units % (max_len / 512)) * 512;
    }
    return {off, std::min(len, window_ - off)};
  }

  FUZZ_NO_COVERAGE void fill(std::vector<uint8_t>& buf, const Op& op) const {
    // Differs per sector, so a sector written to the wrong place shows.
    for (size_t i = 0; i < buf.size(); ++i) {
      buf[i] = static_cast<uint8_t>(op.q + i * 7 + (i >> 9) * 13 + op.p);
    }
  }

  void apply(const Op& op) {
    switch (op.kind) {
      case Op::kRead:
        return read_and_check(range(op, kMaxIo), "a read does not return what was written");
      case Op::kWrite: {
        auto [off, len] = range(op, kMaxIo);
        std::vector<uint8_t> buf(len);
        fill(buf, op);
        int r = dev_->write(off, {reinterpret_cast<const std::byte*>(buf.data()), len}, op.fua);
        if (r == 0) {
          shadow_.set(off, buf.data(), len);
        } else {
          shadow_.forget(off, len);
        }
        return;
      }
      case Op::kZero: {
        auto [off, len] = range(op, kWindow);
        ZeroFlags f{.may_trim = op.may_trim, .fast_only = op.fast_only, .fua = op.fua};
        if (dev_->write_zeroes(off, len, f) == 0) {
          shadow_.set_zero(off, len);
        } else {
          shadow_.forget(off, len);
        }
        return;
      }
      case Op::kTrim: {
        auto [off, len] = range(op, kWindow);
        if (dev_->trim(off, len, op.fua) == 0) {
          shadow_.weaken(off, len);
        } else {
          shadow_.forget(off, len);
        }
        return;
      }
      case Op::kFlush:
        dev_->flush();
        return;
      case Op::kExtents:
        return extents(op);
      case Op::kCache: {
        auto [off, len] = range(op, kWindow);
        dev_->cache(off, len);
        return;
      }
      case Op::kCount:
        break;
    }
  }

  void read_and_check(std::pair<uint64_t, uint64_t> r, const char* what) {
    auto [off, len] = r;
    if (len == 0) return;
    std::vector<uint8_t> buf(len);
    if (dev_->read(off, {reinterpret_cast<std::byte*>(buf.data()), len}) != 0) return;
    if (!clean_) return;
    int64_t bad = shadow_.check_and_learn(off, buf.data(), len);
    if (bad >= 0) std::fprintf(stderr, "device offset %lld\n", static_cast<long long>(bad));
    FUZZ_CHECK(bad < 0, what);
  }

  // Block status over up to the whole device from the op's offset; every
  // extent flagged zero (inside the window, up to kWindow bytes in all) is read.
  void extents(const Op& op) {
    auto [off, unused] = range(op, kMaxIo);
    (void)unused;
    uint64_t len = std::min<uint64_t>(dev_->size() - off, (uint64_t{op.length_units} + 1) << 16);
    std::vector<Extent> out;
    if (dev_->extents(off, len, out) != 0) return;
    FUZZ_CHECK(!out.empty(), "extents() succeeded without an extent");
    uint64_t pos = off, budget = kWindow;
    for (const Extent& e : out) {
      FUZZ_CHECK(e.length > 0, "extents() returned an extent of length 0");
      if (pos >= off + len || pos >= window_) break;
      uint64_t n = std::min({e.length, off + len - pos, window_ - pos, budget});
      if (e.zero) read_zeros(pos, n);
      budget -= n;
      pos += std::min(e.length, off + len - pos);
    }
  }

  FUZZ_NO_COVERAGE static bool all_zero(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (p[i]) return false;
    }
    return true;
  }

  void read_zeros(uint64_t off, uint64_t len) {
    std::vector<uint8_t> buf;
    for (uint64_t done = 0; done < len;) {
      uint64_t n = std::min(len - done, kMaxIo);
      buf.assign(n, 0xa5);
      if (dev_->read(off + done, {reinterpret_cast<std::byte*>(buf.data()), n}) != 0) return;
      bool zeros = all_zero(buf.data(), n);
      if (!zeros) std::fprintf(stderr, "extent at %llu\n", static_cast<unsigned long long>(off));
      FUZZ_CHECK(zeros, "a range that extents() flags zero does not read as zeros");
      if (clean_) {
        FUZZ_CHECK(shadow_.check_and_learn(off + done, buf.data(), n) < 0,
                   "extents() flags zero a range that holds written data");
      }
      done += n;
    }
  }

  void verify_known(const char* what) {
    for (auto [off, len] : shadow_.known_pages()) {
      if (off < window_) read_and_check({off, std::min(len, window_ - off)}, what);
    }
  }

  const std::string path_;
  const Opener open_;
  const Fixup fixup_;
  std::shared_ptr<Bytes> bytes_;
  std::shared_ptr<BlockDevice> dev_;
  Settings settings_;
  uint64_t window_ = 0;
  bool clean_ = false;
  Shadow shadow_;
  ino_t inode_ = 0;
};

}  // namespace strata::fuzz
