// Corrupt and hostile VHDs are refused with a message naming the file and the
// field: no crash, no hang, nothing silently served.
#include <algorithm>
#include <filesystem>

#include "vhd_test_util.h"

using namespace vhdtest;

namespace {

// A dynamic 4 MiB image (two 2 MiB blocks, both allocated).
std::string good_dynamic(const TempDir& t, const std::string& name = "d.vhd") {
  std::string img = t / name;
  create(img, "4M", {{"force_size", "on"}});
  auto d = open(img);
  REQUIRE(write(*d, 0, pattern(4096, 1)) == 0);
  REQUIRE(write(*d, 3 << 20, pattern(4096, 2)) == 0);
  return img;
}

constexpr uint64_t kHeader = 512, kBat = 1536;

}  // namespace

TEST_CASE("footer and header damage is refused") {
  TempDir t;
  std::string img = good_dynamic(t);
  const uint64_t size = fs::file_size(img);
  SUBCASE("both footer checksums wrong") {
    patch(img, 100, {1});
    patch(img, size - 512 + 100, {1});
    expect_refused(img, "checksum");
  }
  SUBCASE("unknown disk type") {
    patch(img, 60, be32(5));
    patch(img, size - 512 + 60, be32(5));
    fix_checksums(img, true, false);
    expect_refused(img, "disk type 5");
  }
  SUBCASE("dynamic header checksum") {
    patch(img, kHeader + 800, {1});
    expect_refused(img, "dynamic header: checksum");
  }
  SUBCASE("header offset outside the file") {
    Bytes off(8);
    strata::store_be64(off.data(), 1ull << 40);
    patch(img, 16, off);
    patch(img, size - 512 + 16, off);
    fix_checksums(img, true, false);
    expect_refused(img, "data_offset");
  }
  SUBCASE("block size zero") {
    patch(img, kHeader + 32, be32(0));
    fix_checksums(img, false, true);
    expect_refused(img, "block_size 0 is not a power of two");
  }
  SUBCASE("block size not a power of two") {
    patch(img, kHeader + 32, be32(3000));
    fix_checksums(img, false, true);
    expect_refused(img, "block_size 3000 is not a power of two");
  }
  SUBCASE("block size too large") {
    patch(img, kHeader + 32, be32(512u << 20));
    fix_checksums(img, false, true);
    expect_refused(img, "block_size 536870912 is outside 512 B .. 256 MiB");
  }
  SUBCASE("huge max_table_entries") {
    patch(img, kHeader + 28, be32(0x7FFFFFFF));
    fix_checksums(img, false, true);
    expect_refused(img, "max_table_entries");
  }
  SUBCASE("max_table_entries too small for the size") {
    patch(img, kHeader + 28, be32(1));
    fix_checksums(img, false, true);
    expect_refused(img, "max_table_entries 1 is too small");
  }
  SUBCASE("BAT outside the file") {
    Bytes off(8);
    strata::store_be64(off.data(), size + 4096);
    patch(img, kHeader + 16, off);
    fix_checksums(img, false, true);
    expect_refused(img, "table_offset");
  }
}

TEST_CASE("BAT damage is refused") {
  TempDir t;
  std::string img = good_dynamic(t);
  const uint64_t size = fs::file_size(img);
  Bytes bat = file_bytes(img);
  uint32_t e0 = strata::load_be32(bat.data() + kBat);
  SUBCASE("entry past the end of the file") {
    patch(img, kBat, be32(static_cast<uint32_t>(size / 512 + 8)));
    expect_refused(img, "BAT entry 0");
  }
  SUBCASE("entry far past the end (huge)") {
    patch(img, kBat + 4, be32(0xFFFFFFF0u));
    expect_refused(img, "points past the end of the file");
  }
  SUBCASE("entries overlapping each other") {
    patch(img, kBat + 4, be32(e0 + 1));
    expect_refused(img, "overlapping");
  }
  SUBCASE("entry pointing at the dynamic header") {
    patch(img, kBat, be32(1));
    expect_refused(img, "overlaps image metadata");
  }
  SUBCASE("truncated file") {
    fs::resize_file(img, size - 3000);
    expect_refused(img, "truncated");
  }
  SUBCASE("file shorter than a footer") {
    fs::resize_file(img, 100);
    expect_refused(img, "too small");
  }
}

TEST_CASE("a truncated fixed VHD is refused") {
  TempDir t;
  std::string img = t / "f.vhd";
  create(img, "1M", {{"type", "fixed"}, {"force_size", "on"}});
  Bytes b = file_bytes(img);
  Bytes foot(b.end() - 512, b.end());
  b.resize(512 * 1024);
  b.insert(b.end(), foot.begin(), foot.end());
  write_file(img, b);
  expect_refused(img, "truncated");
}

namespace {

strata::vhd::Uuid uuid_of(const std::string& img) {
  Bytes b = file_bytes(img);
  strata::vhd::Uuid u;
  std::copy(b.end() - 512 + 68, b.end() - 512 + 84, u.begin());
  return u;
}

// Points a locator-less differencing child at `name` with parent id `id`.
void repoint(const std::string& child, const std::string& name, const strata::vhd::Uuid& id) {
  Bytes raw(512, 0);
  auto u = strata::vhd::utf8_to_utf16(name, true);
  std::copy(u.begin(), u.end(), raw.begin());
  patch(child, kHeader + 64, raw);
  patch(child, kHeader + 40, Bytes(id.begin(), id.end()));
  fix_checksums(child, false, true);
}

}  // namespace

TEST_CASE("broken differencing chains are refused") {
  TempDir t;
  std::string base = t / "base.vhd", a = t / "a.vhd", b = t / "b.vhd";
  create(base, "4M");
  create(a, "", {{"locators", ""}}, std::string("base.vhd"));
  create(b, "", {{"locators", ""}}, std::string("a.vhd"));
  CHECK_NOTHROW(open(b, true));
  SUBCASE("missing parent") {
    fs::remove(base);
    expect_refused(a, "no usable parent");
    expect_refused(b, "No such file");
  }
  SUBCASE("parent id mismatch") {
    fs::remove(base);
    create(base, "4M");
    expect_refused(a, "parent id mismatch");
  }
  SUBCASE("self parent") {
    repoint(a, "a.vhd", uuid_of(a));
    expect_refused(a, "loop");
  }
  SUBCASE("parent loop") {
    repoint(a, "b.vhd", uuid_of(b));
    expect_refused(b, "loop");
  }
  SUBCASE("chain deeper than the limit") {
    strata::OpenOptions o = opts(true);
    o.max_chain_depth = 1;
    std::string msg;
    try {
      strata::open_image(b, o);
    } catch (const strata::ImageError& e) {
      msg = e.what();
    }
    CHECK(msg.find("deeper") != std::string::npos);
  }
  SUBCASE("a hostile locator is ignored, the parent name still works") {
    std::string c = t / "c.vhd";
    create(c, "", {{"locators", "w2ru"}}, std::string("base.vhd"));
    patch(c, kHeader + 576 + 8, be32(0xFFFFFFF0u));  // data length
    fix_checksums(c, false, true);
    CHECK_NOTHROW(open(c, true));
  }
  SUBCASE("a differencing disk that names no parent") {
    repoint(a, "", uuid_of(base));
    expect_refused(a, "no parent locator");
  }
}

TEST_CASE("randomly mutated images are refused or served, never crash") {
  TempDir t;
  std::string base = t / "base.vhd", child = t / "child.vhd", fuzz = t / "fuzz.vhd";
  create(base, "4M", {{"force_size", "on"}, {"block_size", "1M"}});
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, pattern(8192, 1)) == 0);
    REQUIRE(write(*d, 3 << 20, pattern(4096, 2)) == 0);
  }
  create(child, "", {{"block_size", "512K"}}, std::string("base.vhd"));
  {
    auto d = open(child);
    REQUIRE(write(*d, 1000, pattern(3000, 3)) == 0);
  }
  std::mt19937 rng(2024);
  int opened = 0, refused = 0;
  for (int i = 0; i < 200; ++i) {
    Bytes b = file_bytes(i % 2 ? child : base);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly metadata: footers, header, BAT, locators, bitmaps.
      uint64_t where = rng() % 3 == 0 ? b.size() - 512 + rng() % 512 : rng() % 4096;
      if (rng() % 4 == 0) where = rng() % b.size();
      b[where] = static_cast<uint8_t>(rng());
    }
    write_file(fuzz, b);
    if (rng() % 2) fix_checksums(fuzz, true, true);
    try {
      strata::OpenOptions o = opts(true);
      o.format = strata::Format::vhd;
      auto d = strata::open_image(fuzz, o);
      ++opened;
      if (d->size() <= (8u << 20)) {
        Bytes all(d->size());
        (void)d->read(0, {reinterpret_cast<std::byte*>(all.data()), all.size()});
        std::vector<strata::Extent> ex;
        (void)d->extents(0, d->size(), ex);
      }
      strata::CheckReport rep;
      d->check(rep);
    } catch (const strata::ImageError& e) {
      ++refused;
      CHECK(std::string(e.what()).find("fuzz.vhd") != std::string::npos);
    }
  }
  MESSAGE("opened ", opened, ", refused ", refused);
  CHECK(refused > 0);
}

// Whatever block size a header claims, open either works (and then reads and
// maps the disk) or refuses with an ImageError: never a crash. The BAT is
// sized to fit each claim, so the small sizes get past the table checks.
TEST_CASE("any block size in the dynamic header opens or is refused cleanly") {
  std::vector<uint32_t> sizes = {0, 1, 3, 256, 511, 513, 3000, 0xFFFFFFFFu, 0x80000001u};
  for (int k = 0; k < 32; ++k) sizes.push_back(1u << k);
  for (uint32_t bs : sizes) {
    TempDir t;
    std::string img = good_dynamic(t);
    const uint64_t needed = bs ? ((4u << 20) + uint64_t{bs} - 1) / bs : 1;
    patch(img, kHeader + 32, be32(bs));
    patch(img, kHeader + 28, be32(static_cast<uint32_t>(std::min<uint64_t>(needed, 65536))));
    fix_checksums(img, false, true);
    INFO("block size ", bs);
    try {
      auto d = open(img, true);
      Bytes all(d->size());
      CHECK(d->read(0, {reinterpret_cast<std::byte*>(all.data()), all.size()}) >= 0);
      std::vector<strata::Extent> ext;
      CHECK(d->extents(0, d->size(), ext) >= 0);
    } catch (const strata::ImageError& e) {
      CHECK(std::string(e.what()).find("d.vhd") != std::string::npos);
    }
  }
}

TEST_CASE("blocks of one to eight sectors open with a one-sector bitmap") {
  for (const char* bs : {"512", "1K", "2K", "4K"}) {
    TempDir t;
    std::string img = t / "s.vhd";
    create(img, "1M", {{"block_size", bs}});
    INFO("block size ", bs);
    {
      auto d = open(img);
      REQUIRE(write(*d, 0, pattern(5000, 3)) == 0);
      REQUIRE(d->flush() == 0);
    }
    auto d = open(img, true);
    Bytes want(d->size());
    Bytes p = pattern(5000, 3);
    std::copy(p.begin(), p.end(), want.begin());
    CHECK(read_all(*d) == want);
    // Block 0's data starts one sector after its bitmap.
    Bytes file = file_bytes(img);
    const uint32_t entry = strata::load_be32(file.data() + kBat);
    CHECK(std::equal(p.begin(), p.begin() + 24, file.begin() + (uint64_t{entry} + 1) * 512));
  }
}

namespace {

// Gives locator slot `slot` of a differencing child a W2ku entry whose data
// (`space` bytes declared at `offset`) lies wherever the caller says.
void set_locator(const std::string& child, int slot, uint32_t space, uint64_t offset) {
  Bytes e(24, 0);
  strata::store_be32(e.data(), strata::vhd::kPlatW2ku);
  strata::store_be32(e.data() + 4, space);
  strata::store_be32(e.data() + 8, 40);  // data length
  strata::store_be64(e.data() + 16, offset);
  patch(child, kHeader + 576 + 24 * slot, e);
  fix_checksums(child, false, true);
}

// Opens `img` read-write if Strata accepts that, writes into two blocks and
// flushes. Returns the refusal message, empty when the writes were made.
std::string try_writes(const std::string& img, Bytes& expect) {
  try {
    auto d = open(img);
    Bytes a = pattern(6000, 7), b = pattern(512, 8);
    REQUIRE(write(*d, 1u << 20, a) == 0);
    REQUIRE(write(*d, 3u << 20, b) == 0);
    REQUIRE(d->flush() == 0);
    std::copy(a.begin(), a.end(), expect.begin() + (1u << 20));
    std::copy(b.begin(), b.end(), expect.begin() + (3u << 20));
    return "";
  } catch (const strata::ImageError& e) {
    return e.what();
  }
}

}  // namespace

// A locator whose data lies past the end of the file (a truncated image, or a
// damaged offset) is left out of parent resolution. Writing such an image would
// put the footer or new blocks where the locator claims to be, and the next
// open would find them overlapping it; so the image opens read-only only, is
// never written, and check reports it.
TEST_CASE("a locator whose data lies past the end of the file keeps the image read-only") {
  TempDir t;
  std::string base = t / "base.vhd", child = t / "child.vhd";
  create(base, "4M", {{"force_size", "on"}, {"block_size", "512K"}});
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, pattern(4u << 20, 1)) == 0);
  }
  create(child, "", {{"locators", "w2ru"}, {"block_size", "512K"}}, std::string("base.vhd"));
  {
    auto d = open(child);
    REQUIRE(write(*d, 1000, pattern(3000, 2)) == 0);
  }
  Bytes expect = read_all(*open(child, true));
  const uint64_t size = fs::file_size(child);
  SUBCASE("right at the end of the file, trailing footer intact") {
    set_locator(child, 1, 65536, size);
  }
  SUBCASE("across the trailing footer") { set_locator(child, 1, 4096, size - 512); }
  SUBCASE("far past the end of the file") { set_locator(child, 1, 512, size + (64u << 20)); }
  SUBCASE("right at the end of the file, trailing footer lost") {
    set_locator(child, 1, 65536, size);
    patch(child, size - 512, Bytes(8, 0xFF));  // the cookie: the copy at 0 is used
  }
  const Bytes before = file_bytes(child);

  std::string refused = try_writes(child, expect);
  // Whatever happened, the image still opens and reads what it holds.
  std::shared_ptr<strata::BlockDevice> d;
  REQUIRE_NOTHROW(d = open(child, true));
  CHECK(read_all(*d) == expect);

  INFO("refusal: ", refused);
  CHECK(refused.find("child.vhd") != std::string::npos);
  CHECK(refused.find("locator 1 (W2ku)") != std::string::npos);
  CHECK(refused.find("read-only") != std::string::npos);
  CHECK(file_bytes(child) == before);
  strata::CheckReport rep;
  d->check(rep);
  CHECK(std::any_of(rep.errors.begin(), rep.errors.end(), [](const std::string& e) {
    return e.find("locator 1 (W2ku)") != std::string::npos;
  }));
}

// The same rule for the blktap batmap: its map declared past the end of the
// file keeps the image read-only.
TEST_CASE("a blktap batmap declared past the end of the file keeps the image read-only") {
  TempDir t;
  std::string img = t / "tap.vhd";
  create(img, "4M", {{"force_size", "on"}});
  // [footer 0][header 512][BAT 1536..2048][tdbatmap header 2048][footer 2560]
  Bytes b = file_bytes(img);
  REQUIRE(b.size() == 2560);
  Bytes foot(b.end() - 512, b.end());
  b.resize(2048);
  Bytes hdr(512, 0);
  std::memcpy(hdr.data(), "tdbatmap", 8);
  strata::store_be64(hdr.data() + 8, 3072);  // the map, past the footer
  strata::store_be32(hdr.data() + 16, 8);    // sectors
  strata::store_be32(hdr.data() + 20, 0x00010002);
  b.insert(b.end(), hdr.begin(), hdr.end());
  b.insert(b.end(), foot.begin(), foot.end());
  write_file(img, b);

  Bytes expect(4u << 20, 0);
  std::string refused = try_writes(img, expect);
  std::shared_ptr<strata::BlockDevice> d;
  REQUIRE_NOTHROW(d = open(img, true));
  CHECK(read_all(*d) == expect);
  INFO("refusal: ", refused);
  CHECK(refused.find("batmap") != std::string::npos);
  CHECK(refused.find("read-only") != std::string::npos);
  CHECK(file_bytes(img) == b);
  strata::CheckReport rep;
  d->check(rep);
  REQUIRE(rep.errors.size() == 1);
  CHECK(rep.errors.front().find("blktap batmap") != std::string::npos);
}
