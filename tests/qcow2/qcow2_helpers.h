// Helpers for the qcow2 unit tests: temp dirs, shell commands (qemu-img,
// qemu-io are the oracles), reading whole devices, comparing with
// `qemu-img convert -O raw` and `qemu-img map`.
#pragma once

#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "formats/open.h"

namespace qtest {

namespace fs = std::filesystem;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/strata-qcow2-XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// Runs the enclosing scope in another working directory (QEMU resolves
// relative data-file names against its working directory).
struct Chdir {
  fs::path old;
  explicit Chdir(const std::string& dir) : old(fs::current_path()) { fs::current_path(dir); }
  ~Chdir() { fs::current_path(old); }
};

inline std::string log_path() {
  return "/tmp/strata-qcow2-last-" + std::to_string(getpid()) + ".log";
}

inline struct LogCleanup {
  ~LogCleanup() { std::remove(log_path().c_str()); }
} log_cleanup;

inline int sh_status(const std::string& cmd) {
  int st = std::system((cmd + " >" + log_path() + " 2>&1").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

inline std::string last_log() {
  std::ifstream f(log_path());
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void sh(const std::string& cmd) {
  int st = sh_status(cmd);
  INFO(cmd << "\n" << last_log());
  REQUIRE(st == 0);
}

inline std::string capture(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

inline std::vector<std::byte> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> v((std::istreambuf_iterator<char>(f)), {});
  std::vector<std::byte> out(v.size());
  std::memcpy(out.data(), v.data(), v.size());
  return out;
}

// Overwrites bytes of a file in place (corrupting images on purpose).
inline void poke(const std::string& path, uint64_t off, const std::vector<uint8_t>& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f.good());
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline std::vector<uint8_t> be16(uint16_t v) { return {uint8_t(v >> 8), uint8_t(v)}; }
inline std::vector<uint8_t> be32(uint32_t v) {
  return {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
}
inline std::vector<uint8_t> be64(uint64_t v) {
  auto a = be32(uint32_t(v >> 32)), b = be32(uint32_t(v));
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

inline uint64_t peek_be64(const std::string& path, uint64_t off) {
  auto bytes = file_bytes(path);
  REQUIRE(off + 8 <= bytes.size());
  uint64_t v = 0;
  for (int k = 0; k < 8; ++k) v = v << 8 | uint8_t(bytes[off + k]);
  return v;
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
