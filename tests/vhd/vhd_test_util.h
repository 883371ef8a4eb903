// Helpers for the VHD unit tests over the shared ones (tests/support: temp
// directories, shell commands, byte patches): checksums, whole-image reads
// and writes, creation and refusals.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
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
#include "tests/support/bytes.h"
#include "tests/support/images.h"
#include "tests/support/shell.h"
#include "tests/support/temp_dir.h"

namespace vhdtest {

namespace fs = std::filesystem;
using namespace strata::test;

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
  std::optional<uint64_t> bytes;
  if (!size.empty()) bytes = strata::parse_size(size);
  create_image(strata::Format::vhd, path, bytes, std::move(o), std::move(backing));
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
