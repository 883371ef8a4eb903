// Helpers shared by the VHD unit tests: temp directories, shell commands
// (qemu-img / qemu-io are the independent oracles), whole-image reads, and
// byte patches of image files.
#pragma once

#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "formats/block_device.h"
#include "formats/create.h"
#include "formats/endian.h"
#include "formats/errors.h"
#include "formats/open.h"
#include "formats/vhd/vhd_format.h"

namespace vhdtest {

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/strata-vhd-XXXXXX";
    path = ::mkdtemp(t);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline int sh(const std::string& cmd) {
  std::string full = cmd + " >/dev/null 2>&1";
  int r = std::system(full.c_str());
  return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

// Runs a command and returns its standard output.
inline std::string sh_out(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>/dev/null").c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

inline Bytes file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  Bytes b(fs::file_size(path));
  in.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(b.size()));
  return b;
}

inline void write_file(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

inline void patch(const std::string& path, uint64_t off, const Bytes& b) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

inline Bytes be32(uint32_t v) {
  Bytes b(4);
  strata::store_be32(b.data(), v);
  return b;
}

// Recomputes the checksum of the footer copies (at 0 for dynamic images, and at
// EOF-512) and of the dynamic header at 512.
inline void fix_checksums(const std::string& path, bool head_footer, bool header) {
  Bytes b = file_bytes(path);
  auto fix = [&](uint64_t off, size_t len, size_t csum) {
    strata::store_be32(b.data() + off + csum, strata::vhd::checksum(b.data() + off, len, csum));
  };
  fix(b.size() - 512, 512, 64);
  if (head_footer) fix(0, 512, 64);
  if (header) fix(512, 1024, 36);
  write_file(path, b);
}

inline strata::OpenOptions opts(bool read_only = false, std::vector<std::string> dirs = {}) {
  strata::OpenOptions o;
  o.format = strata::Format::automatic;
  o.read_only = read_only;
  o.allowed_dirs = std::move(dirs);
  return o;
}

inline std::shared_ptr<strata::BlockDevice> open(const std::string& path, bool ro = false,
                                                 std::vector<std::string> dirs = {}) {
  return strata::open_image(path, opts(ro, std::move(dirs)));
}

inline Bytes read_all(strata::BlockDevice& d) {
  Bytes b(d.size());
  REQUIRE(d.read(0, {reinterpret_cast<std::byte*>(b.data()), b.size()}) == 0);
  return b;
}

inline int write(strata::BlockDevice& d, uint64_t off, const Bytes& b) {
  return d.write(off, {reinterpret_cast<const std::byte*>(b.data()), b.size()}, false);
}

inline Bytes pattern(size_t n, uint32_t seed) {
  Bytes b(n);
  std::mt19937 rng(seed);
  for (auto& x : b) x = static_cast<uint8_t>(rng() | 1);  // never zero
  return b;
}

inline void create(const std::string& path, const std::string& size,
                   std::map<std::string, std::string> o = {},
                   std::optional<std::string> backing = std::nullopt) {
  strata::CreateOptions co;
  co.format = strata::Format::vhd;
  co.path = path;
  if (!size.empty()) co.size = strata::parse_size(size);
  co.options = std::move(o);
  co.backing = std::move(backing);
  strata::create_image(co);
}

// Expects opening to fail with a message naming the file and containing `what`.
inline void expect_refused(const std::string& path, const std::string& what,
                           std::vector<std::string> dirs = {}) {
  std::string msg;
  try {
    strata::OpenOptions o = opts(true, std::move(dirs));
    o.format = strata::Format::vhd;
    strata::open_image(path, o);
  } catch (const strata::ImageError& e) {
    msg = e.what();
  }
  INFO("message: ", msg);
  CHECK(!msg.empty());
  CHECK(msg.find(fs::path(path).filename().string()) != std::string::npos);
  CHECK(msg.find(what) != std::string::npos);
}

}  // namespace vhdtest
