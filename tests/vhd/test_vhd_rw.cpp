// Fixed and dynamic VHDs against qemu-img/qemu-io as the oracle: images made by
// qemu-img read byte-identical to `qemu-img convert -f vpc -O raw`; images made
// or written by Strata read back correctly in qemu-img.
#include <nlohmann/json.hpp>

#include "vhd_test_util.h"

using namespace vhdtest;

namespace {

void qemu_write(const std::string& img, const std::string& cmds) {
  REQUIRE(sh_status("qemu-io -f vpc " + cmds + " " + img) == 0);
}

Bytes qemu_raw(const TempDir& t, const std::string& img) {
  std::string raw = t / "ref.raw";
  REQUIRE(sh_status("qemu-img convert -f vpc -O raw " + img + " " + raw) == 0);
  return file_bytes(raw);
}

}  // namespace

TEST_CASE("qemu-img dynamic VHD reads byte-identical to qemu-img convert") {
  TempDir t;
  std::string img = t / "dyn.vhd";
  REQUIRE(sh_status("qemu-img create -f vpc -o subformat=dynamic " + img + " 24M") == 0);
  qemu_write(img,
             "-c 'write -P 0xab 0 4k' -c 'write -P 0x11 2M 512' -c 'write -P 0x22 5000k 3M' "
             "-c 'write -P 0x33 20M 1M'");
  Bytes ref = qemu_raw(t, img);
  auto d = open(img, true);
  CHECK(d->format() == "vhd");
  CHECK(d->size() == ref.size());
  CHECK(read_all(*d) == ref);
  // Unaligned read across a block boundary.
  Bytes part(3000);
  REQUIRE(d->read(2 * 1024 * 1024 - 1234,
                  {reinterpret_cast<std::byte*>(part.data()), part.size()}) == 0);
  CHECK(std::equal(part.begin(), part.end(), ref.begin() + 2 * 1024 * 1024 - 1234));
}

TEST_CASE("qemu-img fixed and force_size VHDs read byte-identical") {
  TempDir t;
  for (std::string sub :
       {"subformat=fixed", "subformat=dynamic,force_size=on", "subformat=fixed,force_size=on"}) {
    std::string img = t / "x.vhd";
    REQUIRE(sh_status("qemu-img create -f vpc -o " + sub + " " + img + " 9M") == 0);
    qemu_write(img, "-c 'write -P 0x5a 1M 64k' -c 'write -P 0x6b 8M 512'");
    Bytes ref = qemu_raw(t, img);
    // Fixed VHDs are found by their footer, not taken for raw.
    auto d = open(img, true);
    INFO(sub);
    CHECK(d->format() == "vhd");
    CHECK(d->size() == ref.size());
    CHECK(read_all(*d) == ref);
  }
}

TEST_CASE("strata create sizes VHDs the way qemu-img does") {
  TempDir t;
  for (std::string size : {"1M", "9M", "100M", "1G", "3000M"}) {
    for (std::string type : {"fixed", "dynamic"}) {
      std::string ours = t / "ours.vhd", theirs = t / "theirs.vhd";
      create(ours, size, {{"type", type}});
      REQUIRE(sh_status("qemu-img create -f vpc -o subformat=" + type + " " + theirs + " " +
                        size) == 0);
      auto a = open(ours, true);
      auto b = open(theirs, true);
      INFO(size, " ", type);
      CHECK(a->size() == b->size());
      // qemu-img opens ours and agrees on the size.
      std::string js = capture("qemu-img info -f vpc --output=json " + ours);
      CHECK(js.find("\"virtual-size\": " + std::to_string(a->size())) != std::string::npos);
      fs::remove(ours);
      fs::remove(theirs);
    }
  }
  std::string exact = t / "exact.vhd";
  create(exact, "10000k", {{"force_size", "on"}});
  CHECK(open(exact, true)->size() == 10000 * 1024);
}

TEST_CASE("writes through Strata read back in qemu-img (dynamic, fixed, qemu-made)") {
  TempDir t;
  struct Case {
    std::string name, make;
  };
  std::vector<Case> cases = {{"ours-dynamic", ""},
                             {"ours-fixed", ""},
                             {"ours-dyn-512k", ""},
                             {"qemu-dynamic", "dynamic"},
                             {"qemu-fixed", "fixed"}};
  for (const auto& c : cases) {
    INFO(c.name);
    std::string img = t / (c.name + ".vhd");
    if (c.make.empty()) {
      std::map<std::string, std::string> o = {
          {"type", c.name == "ours-fixed" ? "fixed" : "dynamic"}};
      if (c.name == "ours-dyn-512k") o["block_size"] = "512K";
      create(img, "12M", o);
    } else {
      REQUIRE(sh_status("qemu-img create -f vpc -o subformat=" + c.make + " " + img + " 12M") == 0);
      qemu_write(img, "-c 'write -P 0x77 3M 8k'");
    }
    Bytes expect = qemu_raw(t, img);
    {
      auto d = open(img);
      CHECK_FALSE(d->capabilities().read_only);
      std::mt19937 rng(42);
      for (int i = 0; i < 60; ++i) {
        uint64_t len = 1 + rng() % 70000;
        uint64_t off = rng() % (d->size() - len);
        Bytes p = pattern(len, rng());
        REQUIRE(write(*d, off, p) == 0);
        std::copy(p.begin(), p.end(), expect.begin() + static_cast<long>(off));
      }
      // Zeroes over written data, and over never-written space.
      REQUIRE(d->write_zeroes(1000, 300000, {}) == 0);
      std::fill(expect.begin() + 1000, expect.begin() + 301000, 0);
      REQUIRE(d->flush() == 0);
      CHECK(read_all(*d) == expect);
    }
    write_file(t / "expect.raw", expect);
    CHECK(sh_status("qemu-img compare -f vpc -F raw " + img + " " + (t / "expect.raw")) == 0);
    CHECK(read_all(*open(img, true)) == expect);
    // The file ends in a valid footer.
    Bytes b = file_bytes(img);
    strata::vhd::Footer f;
    CHECK(strata::vhd::parse_footer(b.data() + b.size() - 512, f) == "");
    strata::CheckReport rep;
    open(img, true)->check(rep);
    CHECK(rep.errors.empty());
    CHECK(rep.leaks.empty());
  }
}

TEST_CASE("dynamic VHD extents follow the BAT") {
  TempDir t;
  std::string img = t / "d.vhd";
  create(img, "8M", {{"block_size", "1M"}});
  auto d = open(img);
  REQUIRE(write(*d, 3 * 1024 * 1024 + 100, Bytes(10, 1)) == 0);
  std::vector<strata::Extent> ex;
  REQUIRE(d->extents(0, d->size(), ex) == 0);
  REQUIRE(ex.size() == 3);
  CHECK(ex[0].length == 3u << 20);
  CHECK(ex[0].hole);
  CHECK(ex[0].depth == 0);
  CHECK(ex[1].length == 1u << 20);
  CHECK_FALSE(ex[1].hole);
  CHECK(ex[1].depth == 1);
  CHECK(ex[2].hole);
}

TEST_CASE("a damaged trailing footer falls back to the copy at offset 0 and is repaired") {
  TempDir t;
  std::string img = t / "d.vhd";
  create(img, "4M");
  {
    auto d = open(img);
    REQUIRE(write(*d, 0, pattern(70000, 3)) == 0);
  }
  Bytes good = file_bytes(img);
  const uint64_t vsize = open(img, true)->size();
  patch(img, good.size() - 512, Bytes(512, 0xC7));  // what blktap leaves while open
  CHECK(read_all(*open(img, true)).size() == vsize);
  CHECK(file_bytes(img) != good);  // read-only open does not repair
  { auto d = open(img); }
  CHECK(file_bytes(img) == good);  // read-write open rewrote the trailing footer
  // Both footers damaged: refused.
  patch(img, 0, Bytes(4, 0));
  patch(img, good.size() - 512, Bytes(4, 0));
  expect_refused(img, "footer");
}

TEST_CASE("virtual size: current size, CHS, QEMU's rule and an override") {
  TempDir t;
  std::string img = t / "s.vhd";
  create(img, "10M", {{"force_size", "on"}});
  // Make it look like a Virtual PC image whose geometry is smaller than current_size.
  const uint64_t size = fs::file_size(img);
  for (uint64_t at : {uint64_t{0}, size - 512}) {
    patch(img, at + 28, {'v', 'p', 'c', ' '});
    patch(img, at + 56, {0, 20, 16, 63});
  }
  fix_checksums(img, true, false);
  const uint64_t chs = 20ull * 16 * 63 * 512;
  auto with_mode = [&](const std::string& mode) {
    strata::OpenOptions o = opts(true);
    o.vhd_size_mode = mode;
    return strata::open_image(img, o)->size();
  };
  CHECK(with_mode("current") == 10u << 20);
  CHECK(with_mode("chs") == chs);
  CHECK(with_mode("qemu") == chs);
  std::string js = capture("qemu-img info -f vpc --output=json " + img);
  CHECK(js.find("\"virtual-size\": " + std::to_string(chs)) != std::string::npos);
  js = capture("qemu-img info --output=json --image-opts driver=vpc,file.filename=" + img +
               ",force_size_calc=current_size");
  CHECK(js.find("\"virtual-size\": " + std::to_string(10u << 20)) != std::string::npos);
  strata::OpenOptions o = opts(true);
  o.vhd_size_override = 4u << 20;
  CHECK(strata::open_image(img, o)->size() == 4u << 20);
  o.vhd_size_mode = "bogus";
  o.vhd_size_override.reset();
  CHECK_THROWS_AS(strata::open_image(img, o), strata::ImageError);
}

TEST_CASE("a blktap batmap after the BAT is never allocated over") {
  TempDir t;
  std::string img = t / "tap.vhd";
  create(img, "4M", {{"force_size", "on"}});
  // [footer 0][header 512][BAT 1536..2048][tdbatmap header 2048][map 2560][footer 3072]
  Bytes b = file_bytes(img);
  REQUIRE(b.size() == 2560);
  Bytes foot(b.end() - 512, b.end());
  b.resize(2048);
  Bytes hdr(512, 0), map(512, 0);
  std::memcpy(hdr.data(), "tdbatmap", 8);
  strata::store_be64(hdr.data() + 8, 2560);
  strata::store_be32(hdr.data() + 16, 1);
  strata::store_be32(hdr.data() + 20, 0x00010002);
  map[0] = 0x00;
  b.insert(b.end(), hdr.begin(), hdr.end());
  b.insert(b.end(), map.begin(), map.end());
  b.insert(b.end(), foot.begin(), foot.end());
  write_file(img, b);
  {
    auto d = open(img);
    nlohmann::json j;
    d->describe(j);
    CHECK(j["batmap"] == true);
    REQUIRE(write(*d, 100, Bytes(5000, 0x44)) == 0);
    REQUIRE(write(*d, 3u << 20, Bytes(512, 0x45)) == 0);
  }
  Bytes after = file_bytes(img);
  CHECK(std::equal(hdr.begin(), hdr.end(), after.begin() + 2048));
  CHECK(std::equal(map.begin(), map.end(), after.begin() + 2560));
  uint32_t e0 = strata::load_be32(after.data() + 1536);
  CHECK(uint64_t{e0} * 512 >= 3072);
  Bytes expect(open(img, true)->size(), 0);
  std::fill(expect.begin() + 100, expect.begin() + 5100, 0x44);
  std::fill(expect.begin() + (3 << 20), expect.begin() + (3 << 20) + 512, 0x45);
  write_file(t / "expect.raw", expect);
  CHECK(sh_status("qemu-img compare -f vpc -F raw " + img + " " + (t / "expect.raw")) == 0);
  strata::CheckReport rep;
  open(img, true)->check(rep);
  CHECK(rep.errors.empty());
  CHECK(rep.leaks.empty());
}
