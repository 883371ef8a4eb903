// RequestExecutor (server/executor.h) on a fake device: which device calls a
// block status makes for the selected contexts, and what a failing one
// answers.
#include <doctest/doctest.h>

#include <cerrno>
#include <vector>

#include "formats/endian.h"
#include "protocol/transmission.h"
#include "server/executor.h"
#include "tests/unit/fake_bitmap_device.h"

using namespace strata;
using strata::testing::FakeBitmapDevice;

namespace {

nbd::Session session(bool base, bool depth, std::vector<nbd::SessionBitmap> bitmaps) {
  nbd::Session s;
  s.size = 1 << 20;
  s.tx_flags = nbd::kTxHasFlags;
  s.max_payload = 32 << 20;
  s.structured = true;
  s.base_allocation = base;
  s.allocation_depth = depth;
  s.bitmaps = std::move(bitmaps);
  return s;
}

nbd::Request block_status(uint64_t offset, uint32_t length, uint16_t flags = 0) {
  return nbd::Request{nbd::kRequestMagic, flags, nbd::kCmdBlockStatus, 77, offset, length};
}

// The reply bytes the executor queued.
nbd::Bytes run(FakeBitmapDevice& dev, const nbd::Session& s, const nbd::Request& r) {
  RequestCounters stats;
  RequestExecutor ex(1, dev, true, s, stats);
  REQUIRE(nbd::validate_request(r, s) == 0);
  ReplyBatch out;
  ex.execute(r, nullptr, out);
  nbd::Bytes bytes;
  for (const auto& h : out.headers) bytes.insert(bytes.end(), h.begin(), h.end());
  return bytes;
}

// The NBD error of a reply that is one structured ERROR chunk, else 0.
uint32_t error_of(const nbd::Bytes& b) {
  if (b.size() < 26 || load_be16(b.data() + 6) != nbd::kChunkError) return 0;
  return load_be32(b.data() + 20);
}

FakeBitmapDevice device() {
  FakeBitmapDevice d;
  d.bitmaps = {"backup-0", "daily"};
  d.extent_table = {{.length = 1 << 20, .depth = 1}};
  d.dirty_table["backup-0"] = {{.length = 4096, .dirty = true}, {.length = 1 << 20}};
  d.dirty_table["daily"] = {{.length = 1 << 20, .dirty = true}};
  return d;
}

}  // namespace

TEST_CASE("block status of bitmaps only asks each bitmap, never the extents") {
  FakeBitmapDevice dev = device();
  const auto s = session(false, false, {{3, "backup-0"}, {4, "daily"}});
  const auto r = block_status(8192, 65536);
  const nbd::Bytes reply = run(dev, s, r);
  CHECK(dev.extent_calls.empty());
  REQUIRE(dev.dirty_calls.size() == 2);
  CHECK(dev.dirty_calls[0].bitmap == "backup-0");
  CHECK(dev.dirty_calls[1].bitmap == "daily");
  for (const auto& c : dev.dirty_calls) {
    CHECK(c.offset == 8192);
    CHECK(c.length == 65536);
  }
  // The reply is what the protocol rules make of the device's runs.
  nbd::Bytes expected;
  REQUIRE(nbd::append_block_status(
      expected, r, s, {},
      std::vector<std::vector<DirtyRun>>{dev.dirty_table["backup-0"], dev.dirty_table["daily"]}));
  CHECK(reply == expected);
}

TEST_CASE("block status with base:allocation and a bitmap asks the extents once") {
  FakeBitmapDevice dev = device();
  const auto s = session(true, true, {{4, "daily"}});
  const nbd::Bytes reply = run(dev, s, block_status(0, 4096));
  CHECK(dev.extent_calls.size() == 1);
  REQUIRE(dev.dirty_calls.size() == 1);
  CHECK(dev.dirty_calls[0].bitmap == "daily");
  CHECK(error_of(reply) == 0);
  CHECK(reply.size() == 3 * (20 + 4 + 8));
}

TEST_CASE("a context that fails gives the error reply") {
  SUBCASE("a bitmap fails") {
    FakeBitmapDevice dev = device();
    dev.dirty_errors["daily"] = EIO;
    CHECK(error_of(run(dev, session(true, false, {{3, "backup-0"}, {4, "daily"}}),
                       block_status(0, 4096))) == nbd::kEIO);
  }
  SUBCASE("a bitmap the device no longer has") {
    FakeBitmapDevice dev = device();
    dev.dirty_table.erase("backup-0");
    CHECK(error_of(run(dev, session(false, false, {{3, "backup-0"}}), block_status(0, 4096))) ==
          nbd::errno_to_nbd(ENOENT));
  }
  SUBCASE("the extents fail: no bitmap is asked") {
    FakeBitmapDevice dev = device();
    dev.extents_error = ENOMEM;
    CHECK(error_of(run(dev, session(true, false, {{3, "backup-0"}}), block_status(0, 4096))) ==
          nbd::kENOMEM);
    CHECK(dev.dirty_calls.empty());
  }
  SUBCASE("a bitmap's runs cover nothing: EIO") {
    FakeBitmapDevice dev = device();
    dev.dirty_table["daily"] = {};
    CHECK(error_of(run(dev, session(false, false, {{4, "daily"}}), block_status(0, 4096))) ==
          nbd::kEIO);
  }
  SUBCASE("the extents cover nothing: EIO") {
    FakeBitmapDevice dev = device();
    dev.extent_table.clear();
    CHECK(error_of(run(dev, session(false, true, {}), block_status(0, 4096))) == nbd::kEIO);
  }
}
