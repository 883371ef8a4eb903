// Helpers for the qcow2 unit tests over the shared ones (tests/support: temp
// dirs, shell commands, byte patches): reading whole devices, comparing with
// `qemu-img convert -O raw` (qemu-img and qemu-io are the oracles) and
// `qemu-img map`.
#pragma once

#include <doctest/doctest.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "formats/open.h"
#include "tests/support/bytes.h"
#include "tests/support/shell.h"
#include "tests/support/temp_dir.h"

namespace qtest {

namespace fs = std::filesystem;
using namespace strata::test;

// Whole files as std::byte, to compare with device reads.
inline std::vector<std::byte> file_bytes(const std::string& path) {
  return strata::test::file_bytes<std::byte>(path);
}

inline std::vector<std::byte> read_all(strata::BlockDevice& dev, uint64_t chunk = 3 << 20) {
  std::vector<std::byte> out(dev.size());
  for (uint64_t off = 0; off < out.size(); off += chunk) {
    uint64_t n = std::min<uint64_t>(chunk, out.size() - off);
    int r = dev.read(off, std::span(out).subspan(off, n));
    REQUIRE(r == 0);
  }
  return out;
}

inline std::shared_ptr<strata::BlockDevice> open_ro(const std::string& path,
                                                    strata::OpenOptions o = {}) {
  o.read_only = true;
  return strata::open_image(path, o);
}

inline std::shared_ptr<strata::BlockDevice> open_rw(const std::string& path,
                                                    strata::OpenOptions o = {}) {
  o.read_only = false;
  return strata::open_image(path, o);
}

// First differing offset, or -1.
inline int64_t first_diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<int64_t>(n);
}

// Reads the image through our driver and through `qemu-img convert -O raw`.
inline void expect_same_as_qemu(const std::string& img, const std::string& tmp_raw,
                                strata::OpenOptions o = {}, const std::string& qemu_opts = "") {
  sh("qemu-img convert " + qemu_opts + " -O raw '" + img + "' '" + tmp_raw + "'");
  auto want = file_bytes(tmp_raw);
  auto dev = open_ro(img, o);
  auto got = read_all(*dev);
  INFO(img);
  CHECK(got.size() == want.size());
  CHECK(first_diff(got, want) == -1);
}

struct MapEntry {
  uint64_t start, length;
  bool data, zero;
  int depth;
};

inline std::vector<MapEntry> qemu_map(const std::string& img, const std::string& extra = "") {
  auto j = nlohmann::json::parse(capture("qemu-img map --output=json " + extra + " '" + img + "'"));
  std::vector<MapEntry> out;
  for (auto& e : j) {
    out.push_back({e["start"].get<uint64_t>(), e["length"].get<uint64_t>(), e["data"].get<bool>(),
                   e["zero"].get<bool>(), e["depth"].get<int>()});
  }
  return out;
}

inline std::vector<strata::Extent> our_map(strata::BlockDevice& dev) {
  std::vector<strata::Extent> out;
  uint64_t off = 0;
  while (off < dev.size()) {
    std::vector<strata::Extent> tmp;
    REQUIRE(dev.extents(off, dev.size() - off, tmp) == 0);
    REQUIRE(!tmp.empty());
    for (auto e : tmp) {
      e.length = std::min(e.length, dev.size() - off);
      if (!e.length) break;
      strata::append_extent(out, e);
      off += e.length;
    }
  }
  return out;
}

// Compares allocation facts byte range by byte range: data <-> !hole, and
// for non-data ranges the zero flag.
inline void expect_map_consistent(const std::string& img, strata::BlockDevice& dev) {
  auto q = qemu_map(img);
  auto ours = our_map(dev);
  size_t oi = 0;
  uint64_t opos = 0;
  for (const auto& m : q) {
    uint64_t pos = m.start;
    while (pos < m.start + m.length) {
      REQUIRE(oi < ours.size());
      while (opos + ours[oi].length <= pos) {
        opos += ours[oi].length;
        ++oi;
        REQUIRE(oi < ours.size());
      }
      const auto& e = ours[oi];
      INFO(img << " offset " << pos << " qemu data=" << m.data << " zero=" << m.zero
               << " ours hole=" << e.hole << " zero=" << e.zero);
      CHECK(m.data == !e.hole);
      if (!m.data) CHECK(m.zero == e.zero);
      pos = std::min(m.start + m.length, opos + e.length);
    }
  }
}

}  // namespace qtest
