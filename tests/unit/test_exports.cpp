// Which dirty bitmaps an export offers (server/exports.h, exported_bitmaps):
// the image's, or the configured ones, and a start-up error naming the
// export and the bitmap for one the image does not have; how open_export
// refuses an image in use.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "formats/errors.h"
#include "server/exports.h"
#include "tests/support/temp_dir.h"
#include "tests/unit/fake_bitmap_device.h"

using namespace strata;
using strata::testing::FakeBitmapDevice;

namespace {

using Names = std::vector<std::string>;

ExportConfig config(std::optional<Names> bitmaps) {
  ExportConfig c;
  c.name = "vm1";
  c.path = "/images/fake.qcow2";
  c.bitmaps = std::move(bitmaps);
  return c;
}

std::string error_of(const ExportConfig& c, const BlockDevice& d) {
  try {
    exported_bitmaps(c, d);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("without a bitmaps key every exportable bitmap of the image is exported") {
  FakeBitmapDevice dev;
  dev.bitmaps = {"backup-0", "daily"};
  CHECK(exported_bitmaps(config(std::nullopt), dev) ==
        std::vector<std::string>{"backup-0", "daily"});
  dev.bitmaps.clear();
  CHECK(exported_bitmaps(config(std::nullopt), dev).empty());
}

TEST_CASE("bitmaps lists those exported, in its order; an empty list exports none") {
  FakeBitmapDevice dev;
  dev.bitmaps = {"backup-0", "daily", "weekly"};
  CHECK(exported_bitmaps(config(Names{"weekly", "backup-0"}), dev) ==
        std::vector<std::string>{"weekly", "backup-0"});
  CHECK(exported_bitmaps(config(Names{}), dev).empty());
}

TEST_CASE("a listed bitmap the image does not have stops the start, naming export and bitmap") {
  FakeBitmapDevice dev;
  dev.bitmaps = {"backup-0", "daily"};
  CHECK(error_of(config(Names{"daily", "nope"}), dev) ==
        "export 'vm1': bitmap 'nope' is not an exportable dirty bitmap of /images/fake.qcow2 "
        "(it has 'backup-0', 'daily')");
  dev.bitmaps.clear();
  CHECK(error_of(config(Names{"daily"}), dev) ==
        "export 'vm1': bitmap 'daily' is not an exportable dirty bitmap of /images/fake.qcow2 "
        "(it has none)");
}

// What a reload relies on (Server::reload): a second export of an image
// already open read-write is refused with ImageInUseError, which it tells
// from other refusals, and an unlocked read-only open still checks it.
TEST_CASE("an image in use by another export is refused as in use") {
  strata::test::TempDir dir("exports");
  const std::string path = dir / "disk.raw";
  { std::ofstream(path).write("\0", 1); }
  std::filesystem::resize_file(path, 1 << 20);
  ExportConfig a;
  a.name = "a";
  a.path = path;
  a.format = Format::raw;
  auto first = open_export(a);
  ExportConfig b = a;
  b.name = "b";
  b.read_only = true;
  CHECK_THROWS_AS(open_export(b), ImageInUseError);
  OpenOptions unlocked = b.open_options();
  unlocked.lock = false;
  CHECK(open_export(b, unlocked)->view.size == 1 << 20);
  first.reset();  // closing releases the lock
  CHECK(open_export(b)->caps.read_only);
}

TEST_CASE("a missing image is refused naming the export, not as in use") {
  ExportConfig a;
  a.name = "gone";
  a.path = "/nonexistent/strata/disk.raw";
  a.format = Format::raw;
  try {
    open_export(a);
    FAIL("opened a missing image");
  } catch (const ImageInUseError&) {
    FAIL("a missing image reported as in use");
  } catch (const ImageError& e) {
    CHECK(std::string(e.what()).find("export 'gone'") != std::string::npos);
  }
}
