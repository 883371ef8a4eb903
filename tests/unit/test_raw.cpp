// The raw driver, the File layer under fault injection, and format probing.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "formats/errors.h"
#include "formats/open.h"
#include "formats/raw/raw.h"
#include "tests/support/fault_file.h"
#include "tests/support/temp_dir.h"

using namespace strata;
namespace fs = std::filesystem;

namespace {

using test::TempDir;

std::string write_file(const fs::path& p, const std::string& content, uint64_t size = 0) {
  std::ofstream(p, std::ios::binary) << content;
  if (size) fs::resize_file(p, size);
  return p.string();
}

std::vector<std::byte> bytes(size_t n) { return std::vector<std::byte>(n); }

}  // namespace

TEST_CASE("raw device reads and writes through its File") {
  TempDir d;
  auto path = write_file(d.root() / "a.raw", std::string(8192, 'x'));
  RawDevice dev(host_file_system()->open(path, true));
  CHECK(dev.size() == 8192);
  auto buf = bytes(100);
  REQUIRE(dev.read(4000, buf) == 0);
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{'x'}; }));
  std::vector<std::byte> w(10, std::byte{'y'});
  REQUIRE(dev.write(100, w, true) == 0);
  REQUIRE(dev.read(95, buf) == 0);
  CHECK(buf[4] == std::byte{'x'});
  CHECK(buf[5] == std::byte{'y'});
  CHECK(buf[15] == std::byte{'x'});
}

TEST_CASE("raw extents follow the file's holes; zero writes and trims punch holes") {
  TempDir d;
  auto path = write_file(d.root() / "s.raw", "", 4 << 20);
  RawDevice dev(host_file_system()->open(path, true));
  std::vector<std::byte> w(65536, std::byte{1});
  REQUIRE(dev.write(1 << 20, w, false) == 0);
  std::vector<Extent> ext;
  REQUIRE(dev.extents(0, 4 << 20, ext) == 0);
  REQUIRE(ext.size() == 3);
  CHECK(ext[0].hole);
  CHECK(ext[0].zero);
  CHECK(ext[0].length == 1 << 20);
  CHECK(ext[0].depth == 1);  // holes of a raw file are allocated in it (qemu)
  CHECK_FALSE(ext[1].hole);
  CHECK(ext[1].depth == 1);
  CHECK(ext[2].hole);
  REQUIRE(dev.trim(1 << 20, 65536, false) == 0);
  ext.clear();
  REQUIRE(dev.extents(0, 4 << 20, ext) == 0);
  CHECK(ext.size() == 1);
  CHECK(ext[0].hole);
}

TEST_CASE("injected faults come back as errno values, never exceptions") {
  TempDir d;
  auto path = write_file(d.root() / "f.raw", std::string(65536, 'z'));
  auto fault = std::make_unique<test::FaultFile>(host_file_system()->open(path, true));
  auto* f = fault.get();
  RawDevice dev(std::move(fault));
  auto buf = bytes(512);
  f->read_error = EIO;
  f->read_fail_from = 4096;
  f->read_fail_to = 8192;
  CHECK(dev.read(0, buf) == 0);
  CHECK(dev.read(4000, buf) == EIO);
  f->read_error = 0;
  f->write_error = ENOSPC;
  std::vector<std::byte> w(512);
  CHECK(dev.write(0, w, false) == ENOSPC);
  f->write_error = 0;
  f->sync_error = EIO;
  CHECK(dev.write(0, w, true) == EIO);  // FUA: the sync failure is reported
  CHECK(dev.flush() == EIO);
  f->sync_error = 0;
  CHECK(dev.flush() == 0);
  // No punch-hole support: write_zeroes falls back to writing zeros unless
  // only a fast zero was asked for.
  f->punch_error = ENOTSUP;
  CHECK(dev.write_zeroes(0, 4096, {.may_trim = true, .fast_only = true}) == ENOTSUP);
  CHECK(dev.write_zeroes(0, 4096, {.may_trim = true}) == 0);
  REQUIRE(dev.read(0, buf) == 0);
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
  CHECK(dev.trim(0, 4096, false) == 0);  // trim is advisory
}

TEST_CASE("File reads past end of file return zeros") {
  TempDir d;
  auto path = write_file(d.root() / "short.raw", "abc");
  auto f = host_file_system()->open(path, false);
  auto buf = bytes(8);
  REQUIRE(f->read_at(1, buf) == 0);
  CHECK(buf[0] == std::byte{'b'});
  CHECK(buf[1] == std::byte{'c'});
  CHECK(buf[2] == std::byte{0});
  CHECK(f->write_at(0, buf) == EPERM);  // opened read-only
}

TEST_CASE("probing: qcow2 by magic, VHD by footer, else raw; raw exports never probed") {
  TempDir d;
  auto q = write_file(d.root() / "q.img", std::string("QFI\xfb", 4), 4096);
  auto f = host_file_system()->open(q, false);
  CHECK(probe_format(*f) == Format::qcow2);
  std::string footer(512, '\0');
  std::memcpy(footer.data(), "conectix", 8);
  auto v = write_file(d.root() / "v.img", std::string(4096, '\0') + footer);
  f = host_file_system()->open(v, false);
  CHECK(probe_format(*f) == Format::vhd);
  auto r = write_file(d.root() / "r.img", std::string(4096, 'r'));
  f = host_file_system()->open(r, false);
  CHECK(probe_format(*f) == Format::raw);
  // A raw export that happens to start with a qcow2 header stays raw.
  OpenOptions o;
  o.format = Format::raw;
  o.read_only = true;
  auto dev = open_image(q, o);
  CHECK(dev->format() == "raw");
  CHECK(dev->size() == 4096);
}

TEST_CASE("child paths: json:, protocols and escapes from the allowed directories are refused") {
  TempDir d;
  fs::create_directories(d.root() / "ok");
  auto img = write_file(d.root() / "ok" / "top.raw", "x");
  write_file(d.root() / "outside.raw", "y");
  ChainContext ctx;
  ctx.allowed_dirs = {(d.root() / "ok").string()};
  CHECK_THROWS_WITH_AS(resolve_child_path(ctx, img, "json:{\"file\":1}", ChildRole::backing),
                       doctest::Contains("json:"), ImageError);
  CHECK_THROWS_WITH_AS(resolve_child_path(ctx, img, "nbd://host/x", ChildRole::backing),
                       doctest::Contains("protocol"), ImageError);
  CHECK_THROWS_WITH_AS(resolve_child_path(ctx, img, "../outside.raw", ChildRole::backing),
                       doctest::Contains("outside the allowed directories"), ImageError);
  CHECK_THROWS_WITH_AS(resolve_child_path(ctx, img, "missing.raw", ChildRole::backing),
                       doctest::Contains("missing.raw"), ImageError);
  CHECK(resolve_child_path(ctx, img, "top.raw", ChildRole::backing) == fs::canonical(img).string());
}
