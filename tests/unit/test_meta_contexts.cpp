// Meta contexts in the handshake (protocol/handshake.h): which contexts
// LIST_META_CONTEXT and SET_META_CONTEXT answer for which queries, with
// which ids, byte for byte, and when a selection is kept or forgotten.
// Export "disk" has the bitmaps backup-0 (id 3) and daily (id 4), export
// "other" has other-bm (id 3).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "protocol/handshake.h"
#include "protocol/nbd.h"
#include "tests/unit/handshake_fixture.h"

using namespace strata::nbd;
using namespace strata::nbd::testing;

namespace {

// One NBD_REP_META_CONTEXT, written field by field.
Bytes context_reply(uint32_t option, uint32_t id, std::string_view name) {
  Bytes b;
  Writer(b)
      .u64(kOptReplyMagic)
      .u32(option)
      .u32(kRepMetaContext)
      .u32(static_cast<uint32_t>(4 + name.size()))
      .u32(id)
      .bytes(name);
  return b;
}

Bytes ack(uint32_t option) {
  Bytes b;
  Writer(b).u64(kOptReplyMagic).u32(option).u32(kRepAck).u32(0);
  return b;
}

// The expected reply: the contexts, in this order, then ACK.
struct Context {
  uint32_t id;
  std::string_view name;
};
Bytes replies(uint32_t option, std::initializer_list<Context> contexts) {
  Bytes b;
  for (const auto& c : contexts) {
    auto r = context_reply(option, option == kOptListMetaContext ? 0 : c.id, c.name);
    b.insert(b.end(), r.begin(), r.end());
  }
  auto a = ack(option);
  b.insert(b.end(), a.begin(), a.end());
  return b;
}

constexpr Context kBase{kMetaIdBaseAllocation, "base:allocation"};
constexpr Context kDepth{kMetaIdAllocationDepth, "qemu:allocation-depth"};
constexpr Context kBackup{3, "qemu:dirty-bitmap:backup-0"};
constexpr Context kDaily{4, "qemu:dirty-bitmap:daily"};
constexpr Context kOtherBm{3, "qemu:dirty-bitmap:other-bm"};

struct Fixture {
  Fixture() {
    cat.a.bitmaps = {"backup-0", "daily"};
    cat.b.bitmaps = {"other-bm"};
    REQUIRE(load32(hs.on_option(kOptStructuredReply, {}).reply, 12) == kRepAck);
  }
  Bytes list(std::string_view export_name, std::initializer_list<std::string_view> queries) {
    return hs.on_option(kOptListMetaContext, meta_payload(export_name, queries)).reply;
  }
  Bytes set(std::string_view export_name, std::initializer_list<std::string_view> queries) {
    return hs.on_option(kOptSetMetaContext, meta_payload(export_name, queries)).reply;
  }
  FakeCatalog cat;
  Handshake hs{cat};
};

}  // namespace

TEST_CASE("a bitmap's context reply, byte for byte") {
  Fixture f;
  CHECK(f.set("disk", {"qemu:dirty-bitmap:daily"}) ==
        hex({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,  // reply magic
             0, 0, 0, 10,                                     // SET_META_CONTEXT
             0, 0, 0, 4,                                      // NBD_REP_META_CONTEXT
             0, 0, 0, 27,                                     // length: id + 23 bytes of name
             0, 0, 0, 4,                                      // id 3 + 1: the second bitmap
             'q', 'e', 'm', 'u', ':', 'd', 'i', 'r', 't', 'y', '-', 'b', 'i', 't', 'm', 'a', 'p',
             ':', 'd', 'a', 'i', 'l', 'y',
             // ACK
             0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 0}));
  CHECK(kMetaIdDirtyBitmapBase == 3);
}

TEST_CASE("LIST without a query lists every context, the bitmaps last, with id 0") {
  Fixture f;
  CHECK(f.list("disk", {}) == replies(kOptListMetaContext, {kBase, kDepth, kBackup, kDaily}));
  CHECK(f.list("other", {}) == replies(kOptListMetaContext, {kBase, kDepth, kOtherBm}));
  f.cat.b.bitmaps.clear();
  CHECK(f.list("other", {}) == replies(kOptListMetaContext, {kBase, kDepth}));
}

TEST_CASE(
    "LIST: \"qemu:\" is allocation depth and every bitmap, \"qemu:dirty-bitmap:\" every "
    "bitmap") {
  Fixture f;
  CHECK(f.list("disk", {"qemu:"}) == replies(kOptListMetaContext, {kDepth, kBackup, kDaily}));
  CHECK(f.list("disk", {"qemu:dirty-bitmap:"}) == replies(kOptListMetaContext, {kBackup, kDaily}));
  CHECK(f.list("disk", {"base:"}) == replies(kOptListMetaContext, {kBase}));
  // An export without bitmaps: the bitmap namespace is empty.
  f.cat.b.bitmaps.clear();
  CHECK(f.list("other", {"qemu:dirty-bitmap:"}) == replies(kOptListMetaContext, {}));
  CHECK(f.list("other", {"qemu:"}) == replies(kOptListMetaContext, {kDepth}));
}

TEST_CASE("LIST: exact names, each context once and in id order whatever the queries' order") {
  Fixture f;
  CHECK(f.list("disk", {"qemu:dirty-bitmap:daily"}) == replies(kOptListMetaContext, {kDaily}));
  CHECK(f.list("disk", {"qemu:dirty-bitmap:daily", "base:allocation",
                        "qemu:dirty-bitmap:", "qemu:dirty-bitmap:backup-0"}) ==
        replies(kOptListMetaContext, {kBase, kBackup, kDaily}));
  // Not a bitmap of this export (only of the other one), not a bitmap at
  // all, a prefix of a name, a name with the wrong case: nothing.
  CHECK(f.list("disk", {"qemu:dirty-bitmap:other-bm", "qemu:dirty-bitmap:nope",
                        "qemu:dirty-bitmap:back", "qemu:dirty-bitmap:DAILY", "qemu:dirty",
                        "qemu:dirty-bitmap", "x:unknown"}) == replies(kOptListMetaContext, {}));
  CHECK(f.list("other", {"qemu:dirty-bitmap:other-bm"}) ==
        replies(kOptListMetaContext, {kOtherBm}));
}

TEST_CASE("LIST leaves the selection alone") {
  Fixture f;
  f.set("disk", {"qemu:dirty-bitmap:daily"});
  f.list("other", {});
  f.list("disk", {"qemu:"});
  CHECK(f.hs.meta_contexts() == std::vector<uint32_t>{4});
}

TEST_CASE("SET selects exact names only, with their ids, in id order") {
  Fixture f;
  CHECK(f.set("disk", {"qemu:dirty-bitmap:daily", "qemu:", "qemu:dirty-bitmap:", "base:",
                       "qemu:dirty-bitmap:nope", "qemu:dirty-bitmap:other-bm", "base:allocation",
                       "qemu:dirty-bitmap:daily"}) == replies(kOptSetMetaContext, {kBase, kDaily}));
  CHECK(f.hs.meta_contexts() == std::vector<uint32_t>{kMetaIdBaseAllocation, 4});
  CHECK(f.hs.meta_selected(kMetaIdBaseAllocation));
  CHECK_FALSE(f.hs.meta_selected(kMetaIdAllocationDepth));
  CHECK_FALSE(f.hs.meta_selected(3));
  CHECK(f.hs.meta_selected(4));

  CHECK(f.set("disk", {"qemu:dirty-bitmap:backup-0", "qemu:allocation-depth",
                       "qemu:dirty-bitmap:daily", "base:allocation"}) ==
        replies(kOptSetMetaContext, {kBase, kDepth, kBackup, kDaily}));
  CHECK(f.hs.meta_contexts() == std::vector<uint32_t>{1, 2, 3, 4});

  // A bitmap of another export is not selected: SET replaces the selection
  // with nothing.
  CHECK(f.set("disk", {"qemu:dirty-bitmap:other-bm"}) == replies(kOptSetMetaContext, {}));
  CHECK(f.hs.meta_contexts().empty());
  CHECK(f.set("other", {"qemu:dirty-bitmap:other-bm"}) == replies(kOptSetMetaContext, {kOtherBm}));
  CHECK(f.hs.meta_contexts() == std::vector<uint32_t>{3});
}

TEST_CASE("the session gets the selected bitmaps' names with their ids") {
  Fixture f;
  f.set("", {"qemu:dirty-bitmap:daily", "qemu:allocation-depth", "qemu:dirty-bitmap:backup-0"});
  REQUIRE(f.hs.on_option(kOptGo, info_payload("disk", {})).action == Handshake::Action::kTransmit);
  Session s;
  s.base_allocation = true;  // replaced
  f.hs.fill_meta_contexts(f.cat.a, s);
  CHECK_FALSE(s.base_allocation);
  CHECK(s.allocation_depth);
  REQUIRE(s.bitmaps.size() == 2);
  CHECK(s.bitmaps[0].id == 3);
  CHECK(s.bitmaps[0].name == "backup-0");
  CHECK(s.bitmaps[1].id == 4);
  CHECK(s.bitmaps[1].name == "daily");
}

TEST_CASE("a selection for one export is forgotten by GO or EXPORT_NAME to another") {
  for (const bool export_name : {false, true}) {
    CAPTURE(export_name);
    Fixture f;
    f.set("other", {"qemu:dirty-bitmap:other-bm", "base:allocation"});
    REQUIRE(f.hs.meta_contexts() == std::vector<uint32_t>{1, 3});
    auto step = export_name ? f.hs.on_option(kOptExportName, hex({'d', 'i', 's', 'k'}))
                            : f.hs.on_option(kOptGo, info_payload("disk", {}));
    REQUIRE(step.action == Handshake::Action::kTransmit);
    CHECK(f.hs.meta_contexts().empty());
    Session s;
    f.hs.fill_meta_contexts(f.cat.a, s);
    CHECK_FALSE(s.any_meta_context());
  }
  // The same export under the default name keeps it, EXPORT_NAME as GO.
  Fixture f;
  f.set("", {"qemu:dirty-bitmap:backup-0"});
  REQUIRE(f.hs.on_option(kOptExportName, hex({'d', 'i', 's', 'k'})).action ==
          Handshake::Action::kTransmit);
  CHECK(f.hs.meta_contexts() == std::vector<uint32_t>{3});
}

TEST_CASE("a SET refused for its length leaves no context selected") {
  Fixture f;
  f.set("disk", {"qemu:dirty-bitmap:daily"});
  REQUIRE_FALSE(f.hs.meta_contexts().empty());
  auto step = f.hs.on_oversized_option(kOptSetMetaContext, Handshake::kMaxOptionLength + 1);
  CHECK(step.action == Handshake::Action::kContinue);
  CHECK(load32(step.reply, 12) == kRepErrTooBig);
  CHECK(f.hs.meta_contexts().empty());
}

TEST_CASE("queries longer than a string may be are answered, never matched") {
  Fixture f;
  const std::string long_bitmap = std::string(kMetaDirtyBitmapPrefix) + std::string(5000, 'd');
  CHECK(f.list("disk", {long_bitmap}) == replies(kOptListMetaContext, {}));
  CHECK(f.set("disk", {long_bitmap, "qemu:dirty-bitmap:daily"}) ==
        replies(kOptSetMetaContext, {kDaily}));
  // Over the option length limit the payload is never read.
  auto step = f.hs.on_oversized_option(kOptListMetaContext, 70000);
  CHECK(load32(step.reply, 12) == kRepErrTooBig);
}

TEST_CASE("context names by id") {
  FakeCatalog cat;
  cat.a.bitmaps = {"backup-0", "daily"};
  CHECK(meta_context_name(cat.a, kMetaIdBaseAllocation) == "base:allocation");
  CHECK(meta_context_name(cat.a, kMetaIdAllocationDepth) == "qemu:allocation-depth");
  CHECK(meta_context_name(cat.a, 3) == "qemu:dirty-bitmap:backup-0");
  CHECK(meta_context_name(cat.a, 4) == "qemu:dirty-bitmap:daily");
  CHECK(meta_context_name(cat.a, 5).empty());
  CHECK(meta_context_name(cat.a, 0).empty());
  CHECK(meta_context_name(cat.b, 3).empty());
}
