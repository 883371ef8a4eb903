// Differencing VHD chains made by strata create, checked against an expected
// buffer computed in the test (QEMU cannot read type-4 images; pyvhdi is used
// in tests/vhd/test_pyvhdi.py).
#include <sys/stat.h>
#include <utime.h>

#include <nlohmann/json.hpp>

#include "vhd_test_util.h"

using namespace vhdtest;

namespace {

// Writes `len` bytes of a fresh pattern at `off` into the device and the model.
void put(strata::BlockDevice& d, Bytes& model, uint64_t off, size_t len, uint32_t seed) {
  Bytes p = pattern(len, seed);
  REQUIRE(write(d, off, p) == 0);
  std::copy(p.begin(), p.end(), model.begin() + static_cast<long>(off));
}

constexpr uint64_t MiB = 1024 * 1024;

}  // namespace

TEST_CASE("depth-3 chain over a fixed base with mixed block sizes reads the expected buffer") {
  TempDir t;
  std::string base = t / "base.vhd", mid = t / "mid.vhd", top = t / "top.vhd";
  create(base, "8M", {{"type", "fixed"}});
  Bytes model;
  {
    auto d = open(base);
    model.assign(d->size(), 0);
    put(*d, model, 0, 3 * MiB, 1);
    put(*d, model, 6 * MiB + 5, 100000, 2);
  }
  create(mid, "", {}, std::string("base.vhd"));
  {
    auto d = open(mid);
    CHECK(d->size() == model.size());
    put(*d, model, 2 * MiB + 100, 50, 3);   // partial sectors, new block
    put(*d, model, 5 * MiB - 7, 1000, 4);   // across a block boundary
    put(*d, model, 1 * MiB, 64 * 1024, 5);  // aligned
    put(*d, model, 2 * MiB + 700, 3, 6);    // partial, allocated block, clear bit
    put(*d, model, 2 * MiB + 120, 10, 7);   // inside a sector already in the child
  }
  create(top, "", {{"block_size", "512K"}}, std::string("mid.vhd"));
  Bytes base_before = file_bytes(base), mid_before = file_bytes(mid);
  {
    auto d = open(top);
    CHECK(read_all(*d) == model);
    put(*d, model, 1 * MiB + 1000, 5000, 8);
    put(*d, model, 7 * MiB + 511, 2, 9);
    put(*d, model, 3 * MiB - 300, 600, 10);
    // Zeroes where the parent shows data must read as zeros.
    REQUIRE(d->write_zeroes(100, 8000, {}) == 0);
    std::fill(model.begin() + 100, model.begin() + 8100, 0);
    REQUIRE(d->flush() == 0);
    CHECK(read_all(*d) == model);

    // Block status: which layer holds what.
    std::vector<strata::Extent> ex;
    REQUIRE(d->extents(7 * MiB, 512, ex) == 0);
    REQUIRE(!ex.empty());
    CHECK(ex[0].depth == 1);
    ex.clear();
    REQUIRE(d->extents(2 * MiB + 1024, 512, ex) == 0);
    REQUIRE(!ex.empty());
    CHECK(ex[0].depth == 3);  // never written in top or mid: the base's data
    ex.clear();
    REQUIRE(d->extents(2 * MiB + 100, 10, ex) == 0);
    CHECK(ex[0].depth == 2);
    ex.clear();
    REQUIRE(d->extents(4 * MiB, 4096, ex) == 0);
    CHECK(ex[0].depth == 0);
    CHECK(ex[0].hole);
    CHECK(ex[0].zero);
  }
  CHECK(read_all(*open(top, true)) == model);
  // Parents are never written.
  CHECK(file_bytes(base) == base_before);
  CHECK(file_bytes(mid) == mid_before);
  // The chain is reported layer by layer.
  nlohmann::json j;
  open(top, true)->describe(j);
  CHECK(j["subformat"] == "differencing");
  CHECK(j["block-size"] == 512 * 1024);
  CHECK(j["parent-filename"] == fs::canonical(mid).string());
  strata::CheckReport rep;
  open(top, true)->check(rep);
  CHECK(rep.errors.empty());
  CHECK(rep.leaks.empty());
}

TEST_CASE("each locator kind finds a parent in another directory") {
  for (std::string locs : {"w2ru", "w2ku", "macx", "w2ru+w2ku+macx"}) {
    for (std::string space : {"bytes", "sectors"}) {
      INFO(locs, " ", space);
      TempDir t;
      fs::create_directories(t / "p q");
      fs::create_directories(t / "c");
      std::string base = t / "p q/base image.vhd", child = t / "c/child.vhd";
      create(base, "4M");
      Bytes model;
      {
        auto d = open(base);
        model.assign(d->size(), 0);
        put(*d, model, 12345, 3 * MiB, 11);
      }
      create(child, "", {{"locators", locs}, {"data_space", space}},
             std::string("../p q/base image.vhd"));
      // Confined to the child's own directory: refused.
      expect_refused(child, "outside the allowed directories");
      auto d = open(child, false, {t.path});
      put(*d, model, 2 * MiB - 3, 9, 12);
      CHECK(read_all(*d) == model);
      nlohmann::json j;
      d->describe(j);
      std::string by = j["parent-resolved-by"];
      std::string first = locs.substr(0, 4);
      CHECK(by == (first == "w2ru" ? "W2ru" : first == "w2ku" ? "W2ku" : "MacX"));
    }
  }
}

TEST_CASE("the parent is found by its UTF-16BE name when there are no locators") {
  TempDir t;
  std::string base = t / "bäse.vhd", child = t / "child.vhd";
  create(base, "2M");
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, Bytes(4096, 0x42)) == 0);
  }
  create(child, "", {{"locators", ""}}, std::string("bäse.vhd"));
  auto d = open(child, true);
  Bytes b = read_all(*d);
  CHECK(b[0] == 0x42);
  CHECK(b[4095] == 0x42);
  CHECK(b[4096] == 0);
  nlohmann::json j;
  d->describe(j);
  CHECK(j["parent-name"] == "bäse.vhd");
  CHECK(j["parent-resolved-by"] == "parent name");
}

TEST_CASE("locator payloads decode to host paths") {
  using strata::vhd::locator_paths;
  CHECK(locator_paths(strata::vhd::kPlatW2ru, ".\\dir\\p.vhd") ==
        std::vector<std::string>{"dir/p.vhd"});
  CHECK(locator_paths(strata::vhd::kPlatW2ku, "C:\\vms\\p.vhd") ==
        std::vector<std::string>{"p.vhd"});
  CHECK(locator_paths(strata::vhd::kPlatW2ku, "\\srv\\p.vhd") ==
        std::vector<std::string>{"/srv/p.vhd", "p.vhd"});
  CHECK(locator_paths(strata::vhd::kPlatMacX, "file://./a%20b.vhd") ==
        std::vector<std::string>{"a b.vhd"});
  CHECK(locator_paths(strata::vhd::kPlatMacX, "file:///abs/p.vhd") ==
        std::vector<std::string>{"/abs/p.vhd"});
  CHECK(strata::vhd::locator_space_bytes(1) == 512u);
  CHECK(strata::vhd::locator_space_bytes(1024) == 1024u);
  CHECK_FALSE(strata::vhd::locator_space_bytes(1000).has_value());
  // Lone surrogates decode leniently.
  uint8_t lone[] = {0xD8, 0x00, 0x00, 'a', 0, 0};
  CHECK(strata::vhd::utf16_to_utf8(lone, sizeof lone, true) ==
        "\xEF\xBF\xBD"
        "a");
}

TEST_CASE("zeroing a differencing disk over a parent hole allocates nothing") {
  TempDir t;
  std::string base = t / "b.vhd", child = t / "c.vhd";
  create(base, "4M");
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, Bytes(512, 9)) == 0);
  }
  create(child, "", {}, std::string("b.vhd"));
  auto size_before = fs::file_size(child);
  {
    auto d = open(child);
    REQUIRE(d->write_zeroes(2 * MiB, 2 * MiB, {}) == 0);  // parent: unallocated there
    CHECK(fs::file_size(child) == size_before);
    REQUIRE(d->write_zeroes(0, 1024, {}) == 0);  // parent has data: real zeros
    CHECK(read_all(*d) == Bytes(d->size(), 0));
    CHECK(d->capabilities().can_trim);
    CHECK(d->trim(0, 4096, false) == 0);  // the parent's data must not show again
    CHECK(read_all(*d) == Bytes(d->size(), 0));
  }
}

TEST_CASE("parent time stamp mismatch warns, strict mode refuses") {
  TempDir t;
  std::string base = t / "b.vhd", child = t / "c.vhd";
  create(base, "2M");
  create(child, "", {}, std::string("b.vhd"));
  struct utimbuf ut {};
  ut.actime = ut.modtime = 1000000000;  // 2001
  REQUIRE(::utime(base.c_str(), &ut) == 0);
  CHECK_NOTHROW(open(child, true));
  strata::OpenOptions o = opts(true);
  o.vhd_strict_parent_timestamp = true;
  std::string msg;
  try {
    strata::open_image(child, o);
  } catch (const strata::ImageError& e) {
    msg = e.what();
  }
  CHECK(msg.find("time stamp") != std::string::npos);
}

TEST_CASE("a child larger than its parent reads zeros past the parent") {
  TempDir t;
  std::string base = t / "b.vhd", child = t / "c.vhd";
  create(base, "1M", {{"force_size", "on"}});
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, Bytes(1 * MiB, 7)) == 0);
  }
  create(child, "3M", {}, std::string("b.vhd"));
  auto d = open(child);
  CHECK(d->size() == 3 * MiB);
  Bytes model(3 * MiB, 0);
  std::fill(model.begin(), model.begin() + MiB, 7);
  CHECK(read_all(*d) == model);
  put(*d, model, MiB - 10, 20, 5);
  CHECK(read_all(*d) == model);
}

TEST_CASE("upper-case locator codes are understood") {
  TempDir t;
  fs::create_directories(t / "p");
  std::string base = t / "p/base.vhd", child = t / "child.vhd";
  create(base, "2M");
  {
    auto d = open(base);
    REQUIRE(write(*d, 512, Bytes(512, 0x33)) == 0);
  }
  create(child, "", {{"locators", "w2ru"}}, std::string("p/base.vhd"));
  // "W2RU" instead of "W2ru"; the parent name alone cannot find p/base.vhd.
  patch(child, 512 + 576, {'W', '2', 'R', 'U'});
  fix_checksums(child, false, true);
  auto d = open(child, true);
  Bytes b = read_all(*d);
  CHECK(b[512] == 0x33);
  CHECK(b[0] == 0);
  nlohmann::json j;
  d->describe(j);
  CHECK(j["parent-resolved-by"] == "W2ru");
}
