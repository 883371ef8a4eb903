// Persistent dirty bitmaps: the on-disk rules (bitmap.h) on bytes, and the
// driver against qemu-img, the oracle: bitmaps it created are tracked,
// stored consistent at close, IN_USE while open and after a failed store,
// skipped with a reason when corrupt, and edited by the tool's verbs.
#include "formats/errors.h"
#include "formats/qcow2/bitmap.h"
#include "formats/qcow2/qcow2.h"
#include "qcow2_helpers.h"
#include "tests/support/fault_file_system.h"

using namespace qtest;
using strata::DirtyRun;
using namespace strata::qcow2;

namespace {

std::vector<DirtyRun> all_runs(const DirtyBitmap& b) {
  std::vector<DirtyRun> out;
  b.runs(0, b.disk_size(), out);
  return out;
}

// qemu-img's view of an image's bitmaps: name -> {granularity, flags}.
nlohmann::json qemu_bitmaps(const std::string& img) {
  auto j = nlohmann::json::parse(capture("qemu-img info -U --output=json '" + img + "'"));
  auto& data = j["format-specific"]["data"];
  return data.contains("bitmaps") ? data["bitmaps"] : nlohmann::json::array();
}

bool qemu_flag(const std::string& img, const std::string& name, const std::string& flag) {
  for (auto& b : qemu_bitmaps(img)) {
    if (b["name"] != name) continue;
    for (auto& f : b["flags"])
      if (f == flag) return true;
  }
  return false;
}

// The dirty runs of bitmap `name` through our reader (qemu-nbd -B and nbdinfo
// are the oracle in the integration tests; here qemu-img check vouches for
// the structures and qemu-img bitmap --merge for the bits).
std::vector<DirtyRun> our_dirty(const std::string& img, const std::string& name) {
  auto dev = open_ro(img);
  std::vector<DirtyRun> out;
  REQUIRE(dev->dirty_extents(name, 0, dev->size(), out) == 0);
  return out;
}

std::string make_image(const TempDir& d, const std::string& opts = "") {
  const std::string img = d / "a.qcow2";
  sh("qemu-img create -q -f qcow2 " + opts + " '" + img + "' 64M");
  return img;
}

std::vector<std::byte> pattern(size_t n, uint8_t v) {
  return std::vector<std::byte>(n, std::byte{v});
}

}  // namespace

TEST_CASE("DirtyBitmap: marks every granule a range touches, runs describe them") {
  DirtyBitmap b(uint64_t{1} << 20, 16);  // 16 granules of 64 KiB
  CHECK(b.granules() == 16);
  b.mark(65535, 2);  // granules 0 and 1
  b.mark(5 * 65536 + 100, 1);
  b.mark(15 * 65536, 1 << 20);  // clipped at the end
  CHECK(b.test(0));
  CHECK(b.test(1));
  CHECK(!b.test(2));
  CHECK(b.test(5));
  CHECK(b.test(15));
  CHECK(b.count(0, 16) == 4);
  auto r = all_runs(b);
  REQUIRE(r.size() == 5);
  CHECK(r[0].length == 2 * 65536);
  CHECK(r[0].dirty);
  CHECK(r[1].length == 3 * 65536);
  CHECK(!r[1].dirty);
  CHECK(r[2].length == 65536);
  CHECK(r[3].length == 9 * 65536);
  CHECK(r[4].length == 65536);
  CHECK(r[4].dirty);
  // An unaligned window starts where it is asked to; max_runs bounds it.
  std::vector<DirtyRun> w;
  b.runs(100, 3 * 65536, w, 1);
  REQUIRE(w.size() == 1);
  CHECK(w[0].length == 2 * 65536 - 100);
  b.mark(0, 0);
  b.clear();
  CHECK(b.count(0, 16) == 0);
}

TEST_CASE("DirtyBitmap: on-disk bytes are granule i = bit i % 8 of byte i / 8") {
  DirtyBitmap b(uint64_t{1000} * 4096, 12);
  b.mark(uint64_t{9} * 4096, 1);
  b.mark(uint64_t{999} * 4096, 1);
  std::vector<uint8_t> bytes(128);
  b.store(0, bytes);
  CHECK(bytes[1] == 0x02);
  CHECK(bytes[124] == 0x80);
  DirtyBitmap c(uint64_t{1000} * 4096, 12);
  bytes[127] = 0xff;  // past granule 999: ignored
  c.load(0, bytes);
  CHECK(c.count(0, 1000) == 2);
  CHECK(c.test(9));
  CHECK(c.test(999));
}

TEST_CASE("bitmap directory: round trip, and every bad field named") {
  BitmapEntry a;
  a.name = "b0";
  a.flags = kBitmapAuto;
  a.table_offset = 0x30000;
  a.table_size = 1;
  BitmapEntry b = a;
  b.name = "second";
  b.granularity_bits = 12;
  b.extra_data = {1, 2, 3};
  b.flags |= kBitmapExtraDataCompatible;
  auto bytes = encode_bitmap_directory({a, b});
  CHECK(bytes.size() == bitmap_entry_size(a) + bitmap_entry_size(b));
  CHECK(bytes.size() % 8 == 0);
  std::vector<BitmapEntry> got;
  CHECK(parse_bitmap_directory(bytes, 2, got).empty());
  REQUIRE(got.size() == 2);
  CHECK(got[1].name == "second");
  CHECK(got[1].extra_data.size() == 3);
  CHECK(bitmap_flags_position(got, 1) == bitmap_entry_size(a) + 12);
  CHECK(!parse_bitmap_directory(bytes, 3, got).empty());
  CHECK(got.empty());
  CHECK(!parse_bitmap_directory(std::span(bytes).first(bytes.size() - 8), 2, got).empty());
  CHECK(!parse_bitmap_directory(bytes, 1, got).empty());  // size does not match

  const uint64_t disk = 64 << 20, file = 1 << 20;
  CHECK(bitmap_entry_problem(a, disk, 16, file).empty());
  auto bad = [&](auto change) {
    BitmapEntry e = a;
    change(e);
    return bitmap_entry_problem(e, disk, 16, file);
  };
  CHECK(bad([](BitmapEntry& e) { e.granularity_bits = 8; }).find("granularity") == 0);
  CHECK(bad([](BitmapEntry& e) { e.granularity_bits = 32; }).find("granularity") == 0);
  CHECK(bad([](BitmapEntry& e) { e.type = 2; }).find("type") == 0);
  CHECK(bad([](BitmapEntry& e) { e.flags = 8; }).find("unknown flags") == 0);
  CHECK(bad([](BitmapEntry& e) { e.name = "\xff"; }).find("not UTF-8") != std::string::npos);
  CHECK(bad([](BitmapEntry& e) { e.name = "\xc0\x80"; }).find("not UTF-8") != std::string::npos);
  CHECK(bad([](BitmapEntry& e) { e.name = ""; }).find("empty") != std::string::npos);
  CHECK(bad([](BitmapEntry& e) { e.name.assign(1024, 'x'); }).find("longer") != std::string::npos);
  CHECK(bad([](BitmapEntry& e) { e.table_size = 2; }).find("table size") == 0);
  CHECK(bad([](BitmapEntry& e) { e.table_offset = 0x30001; }).find("table offset") == 0);
  CHECK(bad([](BitmapEntry& e) { e.table_offset = file; }).find("past the end") !=
        std::string::npos);
  CHECK(bad([](BitmapEntry& e) { e.extra_data = {1}; }).find("extra data") != std::string::npos);
  CHECK(bitmap_name_problem("b\xc3\xa9").empty());

  CHECK(decode_bitmap_table_entry(0, 16).valid);
  CHECK(decode_bitmap_table_entry(1, 16).all_set);
  CHECK(!decode_bitmap_table_entry(2, 16).valid);
  CHECK(!decode_bitmap_table_entry(0x10200, 16).valid);  // not cluster aligned
  CHECK(decode_bitmap_table_entry(0x20000, 16).host == 0x20000);
  CHECK(!decode_bitmap_table_entry(0x20000 | (uint64_t{1} << 60), 16).valid);
  CHECK(bitmap_table_entries(disk, 16, 16) == 1);
  CHECK(bitmap_table_entries(uint64_t{16} << 40, 16, 16) == 512);
}

TEST_CASE("bitmaps: writes are tracked, stored at close, consistent for qemu-img") {
  TempDir d("bitmaps");
  const std::string img = make_image(d);
  sh("qemu-img bitmap --add '" + img + "' b0");
  sh("qemu-img bitmap --add -g 4096 '" + img + "' b1");
  sh("qemu-img bitmap --add --disable '" + img + "' off");
  {
    auto dev = open_rw(img);
    auto names = dev->dirty_bitmaps();
    CHECK(names == std::vector<std::string>{"b0", "b1", "off"});
    CHECK(!qemu_flag(img, "b0", "in-use"));
    REQUIRE(dev->write(70000, pattern(5000, 1), false) == 0);  // granule 1 of b0
    CHECK(qemu_flag(img, "b0", "in-use"));                     // before the write was acknowledged
    CHECK(qemu_flag(img, "b1", "in-use"));
    CHECK(!qemu_flag(img, "off", "in-use"));
    REQUIRE(dev->write_zeroes(uint64_t{10} << 20, 1 << 20, {}) == 0);
    REQUIRE(dev->trim(uint64_t{40} << 20, 4096, false) == 0);
    std::vector<DirtyRun> live;
    REQUIRE(dev->dirty_extents("b0", 0, dev->size(), live) == 0);
    CHECK(live.size() == 7);
  }
  CHECK(!qemu_flag(img, "b0", "in-use"));
  CHECK(qemu_flag(img, "b0", "auto"));
  CHECK(!qemu_flag(img, "off", "auto"));
  sh("qemu-img check -q '" + img + "'");
  auto b0 = our_dirty(img, "b0");
  REQUIRE(b0.size() == 7);  // clean, dirty, clean, zeroed, clean, trimmed, clean
  CHECK(b0[0].length == 65536);
  CHECK(!b0[0].dirty);
  CHECK(b0[1].length == 65536);
  CHECK(b0[1].dirty);
  CHECK(b0[3].length == (1 << 20));
  CHECK(b0[5].length == 65536);
  CHECK(b0[5].dirty);
  CHECK(!b0[6].dirty);
  auto b1 = our_dirty(img, "b1");
  REQUIRE(b1.size() == 7);
  CHECK(b1[1].length == 2 * 4096);  // 70000..75000 touches granules 17 and 18
  auto off = our_dirty(img, "off");
  REQUIRE(off.size() == 1);
  CHECK(!off[0].dirty);
  // QEMU reads the same bits back: merging b0 into a new bitmap keeps them.
  sh("qemu-img bitmap --add '" + img + "' copy");
  sh("qemu-img bitmap --merge b0 '" + img + "' copy");
  auto copy = our_dirty(img, "copy");
  REQUIRE(copy.size() == b0.size());
  for (size_t i = 0; i < copy.size(); ++i) {
    CHECK(copy[i].length == b0[i].length);
    CHECK(copy[i].dirty == b0[i].dirty);
  }
}

TEST_CASE("bitmaps: a failed store leaves them IN_USE, which is reported and repaired") {
  TempDir d("bitmaps-fail");
  const std::string img = make_image(d);
  sh("qemu-img bitmap --add '" + img + "' b0");
  auto files = std::make_shared<strata::test::FaultFileSystem>();
  {
    strata::OpenOptions o;
    o.file_system = files;
    auto dev = open_rw(img, o);
    REQUIRE(dev->write(0, pattern(4096, 7), false) == 0);
    REQUIRE(dev->flush() == 0);
    files->file("a.qcow2")->write_error = EIO;  // the store at close fails
  }
  CHECK(qemu_flag(img, "b0", "in-use"));
  {
    auto dev = open_ro(img);
    CHECK(dev->dirty_bitmaps().empty());  // inconsistent: not exported
    nlohmann::json info;
    dev->describe(info);
    CHECK(info["bitmaps"][0]["consistent"] == false);
  }
  {
    auto dev = open_rw(img);
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    REQUIRE(q != nullptr);
    REQUIRE(dev->write(1 << 20, pattern(4096, 7), false) == 0);  // not tracked
    CHECK(q->bitmap_clear("b0").empty());
    CHECK(dev->dirty_bitmaps() == std::vector<std::string>{"b0"});
  }
  CHECK(!qemu_flag(img, "b0", "in-use"));
  sh("qemu-img check -q '" + img + "'");
}

TEST_CASE("bitmaps: the tool's verbs agree with qemu-img") {
  TempDir d("bitmaps-verbs");
  sh("qemu-img create -q -f raw '" + d / "base.raw" + "' 64M");
  const std::string img = make_image(d, "-b base.raw -F raw");
  {
    auto dev = open_rw(img);
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    REQUIRE(q != nullptr);
    CHECK(q->bitmap_add("b0", 16, true).empty());
    CHECK(q->bitmap_add("b1", 12, false).empty());
    CHECK(q->bitmap_add("b0", 16, true).find("exists") != std::string::npos);
    CHECK(q->bitmap_add("x", 8, true).find("granularity") != std::string::npos);
    CHECK(q->bitmap_add("\xff", 16, true).find("UTF-8") != std::string::npos);
    CHECK(q->bitmap_remove("nope").find("no bitmap") == 0);
  }
  auto j = qemu_bitmaps(img);
  REQUIRE(j.size() == 2);
  CHECK(j[0]["name"] == "b0");
  CHECK(j[0]["granularity"] == 65536);
  CHECK(j[1]["granularity"] == 4096);
  CHECK(qemu_flag(img, "b0", "auto"));
  CHECK(!qemu_flag(img, "b1", "auto"));
  sh("qemu-img check -q '" + img + "'");
  auto info = nlohmann::json::parse(capture("qemu-img info -U --output=json '" + img + "'"));
  CHECK(info["backing-filename"] == "base.raw");  // the backing name survived the rewrite
  {
    auto dev = open_rw(img);
    REQUIRE(dev->write(0, pattern(65536, 3), false) == 0);
  }
  CHECK(our_dirty(img, "b0").size() == 2);
  {
    auto dev = open_rw(img);
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    CHECK(q->bitmap_enable("b1", true).empty());
    CHECK(q->bitmap_enable("b0", false).empty());
    CHECK(q->bitmap_clear("b0").empty());
    CHECK(q->bitmap_remove("b1").empty());
  }
  j = qemu_bitmaps(img);
  REQUIRE(j.size() == 1);
  CHECK(!qemu_flag(img, "b0", "auto"));
  CHECK(our_dirty(img, "b0").size() == 1);
  sh("qemu-img check -q '" + img + "'");
  {
    auto dev = open_rw(img);
    CHECK(dynamic_cast<Qcow2Device*>(dev.get())->bitmap_remove("b0").empty());
  }
  CHECK(qemu_bitmaps(img).empty());
  sh("qemu-img check -q '" + img + "'");
}

TEST_CASE("bitmaps: a corrupt entry is skipped with its reason and made IN_USE on write") {
  TempDir d("bitmaps-corrupt");
  const std::string img = make_image(d);
  sh("qemu-img bitmap --add '" + img + "' good");
  sh("qemu-img bitmap --add '" + img + "' bad");
  // The directory through our header reader; the second entry's granularity
  // is broken.
  uint64_t dir = 0;
  {
    auto dev = open_ro(img);
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    auto list = q->bitmap_list();
    REQUIRE(list.size() == 2);
    CHECK(list[1].problem.empty());
  }
  {
    std::unique_ptr<strata::File> f = strata::host_file_system()->open(img, false);
    Header hd = read_header(*f);
    dir = hd.bitmap_directory_offset;
  }
  BitmapEntry first;
  first.name = "good";
  const uint64_t second = dir + bitmap_entry_size(first);
  patch(img, second + 17, {40});  // granularity bits 40
  {
    auto dev = open_rw(img);
    CHECK(dev->dirty_bitmaps() == std::vector<std::string>{"good"});
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    CHECK(q->bitmap_list()[1].problem.find("granularity") == 0);
    REQUIRE(dev->write(0, pattern(4096, 1), false) == 0);
  }
  patch(img, second + 17, {16});  // as it was: now IN_USE tells it is stale
  CHECK(qemu_flag(img, "bad", "in-use"));
  CHECK(!qemu_flag(img, "good", "in-use"));
  CHECK(our_dirty(img, "good").size() == 2);
}

TEST_CASE("bitmaps: memory is bounded whatever the image claims") {
  TempDir d("bitmaps-huge");
  const std::string img = d / "huge.qcow2";
  sh("qemu-img create -q -f qcow2 '" + img + "' 16T");
  sh("qemu-img bitmap --add '" + img + "' b0");  // 16 TiB / 64 KiB: 32 MiB of bits
  {
    auto dev = open_rw(img);
    auto* q = dynamic_cast<Qcow2Device*>(dev.get());
    REQUIRE(q != nullptr);
    CHECK(dev->dirty_bitmaps() == std::vector<std::string>{"b0"});
    // 16 TiB / 512 B would be 4 GiB of bits.
    CHECK(q->bitmap_add("fine", 9, true).find("too large") == 0);
  }
  uint64_t dir = 0;
  {
    std::unique_ptr<strata::File> f = strata::host_file_system()->open(img, false);
    dir = read_header(*f).bitmap_directory_offset;
  }
  patch(img, dir + 17, {9});  // the same entry now claims 512-byte granules
  auto dev = open_rw(img);
  auto* q = dynamic_cast<Qcow2Device*>(dev.get());
  CHECK(dev->dirty_bitmaps().empty());
  CHECK(q->bitmap_list()[0].problem.find("more than 512 MiB") != std::string::npos);
}

TEST_CASE("bitmaps: a store cut off at any write leaves them IN_USE or exact") {
  // The close of an image with two enabled bitmaps, its n-th write failing
  // (n = 0, 1, ...): each time the reopened image is sound for qemu-img, and
  // each bitmap is IN_USE or holds the granules written.
  TempDir d("bitmaps-cut");
  const std::string img = d / "a.qcow2";
  bool stored = false;
  for (int n = 0; n < 40 && !stored; ++n) {
    sh("rm -f '" + img + "' && qemu-img create -q -f qcow2 -o cluster_size=4k '" + img + "' 64M");
    sh("qemu-img bitmap --add -g 512 '" + img + "' fine");
    sh("qemu-img bitmap --add '" + img + "' coarse");
    auto files = std::make_shared<strata::test::FaultFileSystem>();
    {
      strata::OpenOptions o;
      o.file_system = files;
      auto dev = open_rw(img, o);
      REQUIRE(dev->write(uint64_t{3} << 20, pattern(4096, 9), false) == 0);
      REQUIRE(dev->write(uint64_t{50} << 20, pattern(100, 9), false) == 0);
      REQUIRE(dev->flush() == 0);
      auto* f = files->file("a.qcow2");
      f->writes_before_error = n;
      f->write_error = EIO;
    }
    INFO("store cut at write " << n);
    REQUIRE(sh_status("qemu-img check -q '" + img + "'") != 2);  // leaks at worst
    for (const char* name : {"fine", "coarse"}) {
      if (qemu_flag(img, name, "in-use")) continue;
      stored = true;
      auto runs = our_dirty(img, name);
      uint64_t pos = 0, dirty = 0;
      for (const auto& r : runs) {
        const bool want = (pos <= (uint64_t{3} << 20) && (uint64_t{3} << 20) < pos + r.length) ||
                          (pos <= (uint64_t{50} << 20) && (uint64_t{50} << 20) < pos + r.length);
        if (want) CHECK(r.dirty);
        dirty += r.dirty ? r.length : 0;
        pos += r.length;
      }
      CHECK(dirty == (std::string(name) == "fine" ? 4096 + 512 : 2 * 65536));
    }
  }
  CHECK(stored);  // some n was past the last write of the store
}

TEST_CASE("bitmaps: hostile directories are refused or skipped, never written over metadata") {
  TempDir d("bitmaps-hostile");
  const std::string img = d / "a.qcow2";
  auto fresh = [&] {
    sh("rm -f '" + img + "' && qemu-img create -q -f qcow2 '" + img + "' 64M");
    sh("qemu-io -f qcow2 -c 'write -P 7 0 64k' '" + img + "'");
    sh("qemu-img bitmap --add '" + img + "' b0");
    std::unique_ptr<strata::File> f = strata::host_file_system()->open(img, false);
    return read_header(*f);
  };
  auto ext_offset = [&] {  // the bitmaps extension in cluster 0
    auto bytes = strata::test::file_bytes<uint8_t>(img);
    for (size_t i = 104; i + 4 <= 65536; i += 8)
      if (bytes[i] == 0x23 && bytes[i + 1] == 0x85 && bytes[i + 2] == 0x28 && bytes[i + 3] == 0x75)
        return i;
    return size_t{0};
  };
  // qemu-img check's verdict as a severity: clean, leaks, corrupt.
  auto check_severity = [&] {
    const int rc = sh_status("qemu-img check -q '" + img + "'");
    return rc == 0 ? 0 : rc == 3 ? 1 : 2;
  };
  auto write_and_check = [&](const char* what, const Header& h) {
    INFO(what);
    const int severity = check_severity();
    const auto before = strata::test::file_bytes<uint8_t>(img);
    {
      auto dev = open_rw(img);
      CHECK(dev->dirty_bitmaps().empty());
      REQUIRE(dev->write(uint64_t{1} << 20, pattern(65536, 3), false) == 0);
    }
    CHECK(check_severity() <= severity);  // nothing made worse
    // The L1 table and the data the bitmap pointed at are intact.
    const auto after = strata::test::file_bytes<uint8_t>(img);
    const uint64_t l1 = h.l1_table_offset;
    CHECK(std::equal(before.begin() + l1, before.begin() + l1 + 8 * h.l1_size, after.begin() + l1));
    auto got = read_all(*open_ro(img));
    CHECK(got[0] == std::byte{7});
    CHECK(got[65535] == std::byte{7});
    CHECK(got[1 << 20] == std::byte{3});
  };

  Header h = fresh();
  // The table at the L1 table's offset.
  patch(img, h.bitmap_directory_offset, be64(h.l1_table_offset));
  write_and_check("table over the L1", h);
  CHECK(qemu_flag(img, "b0", "in-use"));

  h = fresh();
  // A table entry pointing at the first L2 table... at cluster 0 (the header).
  {
    std::unique_ptr<strata::File> f = strata::host_file_system()->open(img, false);
    std::vector<uint8_t> dir(h.bitmap_directory_size);
    REQUIRE(strata::read_bytes(*f, h.bitmap_directory_offset, dir.data(), dir.size()) == 0);
    std::vector<BitmapEntry> e;
    REQUIRE(parse_bitmap_directory(dir, 1, e).empty());
    patch(img, e[0].table_offset, be64(h.l1_table_offset));
  }
  write_and_check("data cluster on the L1", h);

  h = fresh();
  // The directory size no longer matches its entries.
  patch(img, ext_offset() + 8 + 8, be64(h.bitmap_directory_size + 8));
  write_and_check("directory size", h);
  CHECK(qemu_bitmaps(img).empty());  // the autoclear bit was cleared: QEMU drops them

  h = fresh();
  patch(img, ext_offset() + 8, be32(70000));  // more bitmaps than the format allows
  CHECK_THROWS_WITH_AS(open_rw(img), doctest::Contains("nb_bitmaps 70000"), strata::ImageError);
}
