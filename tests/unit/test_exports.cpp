// Which dirty bitmaps an export offers (server/exports.h, exported_bitmaps):
// the image's, or the configured ones, and a start-up error naming the
// export and the bitmap for one the image does not have.
#include <doctest/doctest.h>

#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "server/exports.h"
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
