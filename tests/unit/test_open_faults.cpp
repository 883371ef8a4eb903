// Open-time faults through the FileSystem seam (OpenOptions::file_system):
// a FaultFileSystem fails the open of one file of a chain, and the open of the
// whole chain must fail cleanly, with an ImageError that names that file and
// the reason, and without leaking what was opened before it (ASan checks).
#include <doctest/doctest.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "formats/errors.h"
#include "formats/open.h"
#include "tests/support/fault_file_system.h"
#include "tests/support/images.h"
#include "tests/support/temp_dir.h"

using namespace strata;

namespace {

struct Faults {
  std::shared_ptr<test::FaultFileSystem> files = std::make_shared<test::FaultFileSystem>();
  OpenOptions options(bool read_only = true) const {
    OpenOptions o;
    o.read_only = read_only;
    o.file_system = files;
    return o;
  }
};

// The message of the ImageError that opening `path` throws; "" if it opens.
std::string open_error(const std::string& path, const OpenOptions& o) {
  try {
    open_image(path, o);
  } catch (const ImageError& e) {
    return e.what();
  }
  return {};
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("open faults: every file of a chain is opened through OpenOptions::file_system") {
  test::TempDir d("strata-faults");
  test::create_image(Format::qcow2, d / "base.qcow2", 1 << 20);
  test::create_image(Format::qcow2, d / "top.qcow2", std::nullopt, {{"data_file", "top.raw"}},
                     std::string("base.qcow2"));
  Faults f;
  auto dev = open_image(d / "top.qcow2", f.options(false));
  REQUIRE(dev);
  CHECK(f.files->opened().size() >= 3);
  for (const char* name : {"top.qcow2", "top.raw", "base.qcow2"}) {
    INFO(name);
    CHECK(f.files->file(name) != nullptr);
  }
  // The files it opened are FaultFiles: I/O faults reach the driver.
  f.files->file("top.raw")->read_error = EIO;
  std::vector<std::byte> buf(4096);
  REQUIRE(dev->write(0, buf, false) == 0);
  CHECK(dev->read(0, buf) == EIO);
}

TEST_CASE("open faults: the top image") {
  test::TempDir d("strata-faults");
  test::create_image(Format::raw, d / "top.raw", 1 << 20);
  Faults f;
  f.files->fail_open("top.raw", EACCES);
  auto msg = open_error(d / "top.raw", f.options());
  INFO(msg);
  CHECK(contains(msg, "top.raw"));
  CHECK(contains(msg, "Permission denied"));
}

TEST_CASE("open faults: a qcow2 backing file") {
  test::TempDir d("strata-faults");
  test::create_image(Format::qcow2, d / "base.qcow2", 1 << 20);
  test::create_image(Format::qcow2, d / "top.qcow2", std::nullopt, {}, std::string("base.qcow2"));
  for (int error : {EACCES, EIO}) {
    Faults f;
    f.files->fail_open("base.qcow2", error);
    auto msg = open_error(d / "top.qcow2", f.options());
    INFO(msg);
    CHECK(contains(msg, "base.qcow2"));
    CHECK(contains(msg, std::strerror(error)));
  }
}

TEST_CASE("open faults: a VHD parent") {
  test::TempDir d("strata-faults");
  test::create_image(Format::vhd, d / "base.vhd", 1 << 20);
  test::create_image(Format::vhd, d / "child.vhd", std::nullopt, {}, std::string("base.vhd"));
  for (int error : {EACCES, EIO}) {
    Faults f;
    f.files->fail_open("base.vhd", error);
    auto msg = open_error(d / "child.vhd", f.options());
    INFO(msg);
    CHECK(contains(msg, "child.vhd"));
    CHECK(contains(msg, "no usable parent"));
    CHECK(contains(msg, "base.vhd"));
    CHECK(contains(msg, std::strerror(error)));
  }
}

TEST_CASE("open faults: a qcow2 data file") {
  test::TempDir d("strata-faults");
  test::create_image(Format::qcow2, d / "top.qcow2", 1 << 20, {{"data_file", "top.raw"}});
  for (bool read_only : {true, false}) {
    for (int error : {EACCES, EIO}) {
      Faults f;
      f.files->fail_open("top.raw", error);
      auto msg = open_error(d / "top.qcow2", f.options(read_only));
      INFO(msg);
      CHECK(contains(msg, "top.raw"));
      CHECK(contains(msg, std::strerror(error)));
      CHECK(contains(msg, read_only ? "cannot open:" : "cannot open read-write:"));
    }
  }
}
