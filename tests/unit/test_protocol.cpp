// Byte-for-byte tests of the NBD codec and the handshake state machine.
#include <doctest/doctest.h>

#include <cstring>

#include "formats/endian.h"
#include "protocol/handshake.h"
#include "protocol/nbd.h"
#include "tests/unit/handshake_fixture.h"

using namespace strata::nbd;

using namespace strata::nbd::testing;

TEST_CASE("greeting is NBDMAGIC, IHAVEOPT and the handshake flags") {
  CHECK(
      encode_greeting(kFlagFixedNewstyle | kFlagNoZeroes) ==
      hex({'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C', 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 3}));
}

TEST_CASE("option header decodes big-endian fields") {
  auto b = hex({0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 1, 2});
  auto h = decode_option_header(std::span<const uint8_t, 16>(b.data(), 16));
  CHECK(h.magic == kOptMagic);
  CHECK(h.option == kOptGo);
  CHECK(h.length == 0x102);
}

TEST_CASE("option reply encoding") {
  auto r = encode_option_reply(kOptStructuredReply, kRepAck);
  CHECK(r ==
        hex({0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0}));
  auto e = encode_option_error(kOptStartTls, kRepErrUnsup, "no");
  CHECK(e == hex({0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0,   0,
                  5, 0x80, 0,    0,    1,    0,    0,    0,    2, 'n', 'o'}));
}

TEST_CASE("request decode and encode round trip") {
  auto b = hex({0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1,    2, 3, 4, 5,    6,
                7,    8,    0,    0,    0, 0, 0, 0, 0x10, 0, 0, 0, 0x02, 0});
  auto r = decode_request(std::span<const uint8_t, kRequestSize>(b.data(), kRequestSize));
  CHECK(r.magic == kRequestMagic);
  CHECK(r.flags == kCmdFlagFua);
  CHECK(r.type == kCmdWrite);
  CHECK(r.cookie == 0x0102030405060708ull);
  CHECK(r.offset == 0x1000);
  CHECK(r.length == 0x200);
  uint8_t out[kRequestSize];
  encode_request(r, out);
  CHECK(std::memcmp(out, b.data(), kRequestSize) == 0);
}

TEST_CASE("simple and structured reply headers") {
  uint8_t s[16];
  encode_simple_reply(s, kEIO, 0xAABBCCDDEEFF0011ull);
  CHECK(Bytes(s, s + 16) ==
        hex({0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF, 0x00, 0x11}));
  Bytes c;
  append_chunk_hole(c, 7, 0x2000, 0x1000, true);
  CHECK(c == hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0,    0, 0, 0, 0,    7,
                  0,    0,    0,    12,   0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0}));
  Bytes e;
  append_chunk_error(e, 9, kEINVAL, "x");
  CHECK(e == hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0,  0, 0, 0,  0,
                  0,    9,    0,    0,    0, 7, 0,    0, 0, 22, 0, 1, 'x'}));
  Bytes bs;
  BlockStatusDescriptor d[2] = {{0x1000, kStateHole | kStateZero}, {0x200, 0}};
  append_chunk_block_status(bs, 3, kMetaIdBaseAllocation, d, true);
  CHECK(bs == hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0,    5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 20,
                   0,    0,    0,    1,    0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0}));
  Bytes eo;
  append_chunk_error_offset(eo, 9, kEIO, "", 0x1234);
  CHECK(eo == hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 2, 0, 0, 0, 0, 0, 0, 0, 9,    0,
                   0,    0,    14,   0,    0, 0, 5,    0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34}));
  Bytes dh;
  append_chunk_data_header(dh, 1, 0x10, 4, false);
  CHECK(dh == hex({0x66, 0x8e, 0x33, 0xef, 0, 0,  0, 1, 0, 0, 0, 0, 0, 0,
                   0,    1,    0,    0,    0, 12, 0, 0, 0, 0, 0, 0, 0, 0x10}));
}

TEST_CASE("export name reply: size, flags and 124 zeros unless NO_ZEROES") {
  auto r = encode_export_name_reply(0x1000, 0x0003, false);
  CHECK(r.size() == 8 + 2 + 124);
  CHECK(r[6] == 0x10);
  CHECK(r[9] == 3);
  CHECK(encode_export_name_reply(1, 1, true).size() == 10);
}

TEST_CASE("errno mapping follows the NBD error set") {
  CHECK(errno_to_nbd(0) == 0);
  CHECK(errno_to_nbd(EROFS) == kEPERM);
  CHECK(errno_to_nbd(EDQUOT) == kENOSPC);
  CHECK(errno_to_nbd(ENOTSUP) == kENOTSUP);
  CHECK(errno_to_nbd(ESHUTDOWN) == kESHUTDOWN);
  CHECK(errno_to_nbd(EBADF) == kEIO);
}

TEST_CASE("handshake refuses clients with unknown flags") {
  FakeCatalog cat;
  Handshake hs(cat);
  std::string why;
  CHECK_FALSE(hs.accept_client_flags(kClientFixedNewstyle | 0x80, &why));
  CHECK(why.find("unknown") != std::string::npos);
  CHECK(hs.accept_client_flags(kClientFixedNewstyle | kClientNoZeroes, &why));
}

TEST_CASE("a client without fixed newstyle gets EXPORT_NAME and nothing else") {
  FakeCatalog cat;
  std::string why;
  Handshake hs(cat);
  REQUIRE(hs.accept_client_flags(0, &why));
  auto s = hs.on_option(kOptExportName, hex({'d', 'i', 's', 'k'}));
  CHECK(s.action == Handshake::Action::kTransmit);
  CHECK(s.export_view == &cat.a);
  CHECK(s.reply == encode_export_name_reply(cat.a.size, hs.tx_flags(cat.a), false));
  // Plain newstyle has no option replies: any other option ends the session.
  for (uint32_t opt : {uint32_t{kOptGo}, uint32_t{kOptList}, uint32_t{0x4242}}) {
    Handshake plain(cat);
    REQUIRE(plain.accept_client_flags(kClientNoZeroes, &why));
    s = plain.on_option(opt, {});
    CHECK(s.action == Handshake::Action::kClose);
    CHECK(s.reply.empty());
  }
  Handshake no_zeroes(cat);
  REQUIRE(no_zeroes.accept_client_flags(kClientNoZeroes, &why));
  CHECK(no_zeroes.on_option(kOptExportName, {}).reply.size() == 10);
}

TEST_CASE("oversized options are skipped with ERR_UNSUP or ERR_TOO_BIG, or close") {
  FakeCatalog cat;
  Handshake hs(cat);
  const uint32_t big = Handshake::kMaxOptionLength + 1;
  auto s = hs.on_oversized_option(0x4242, big);
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(load32(s.reply, 8) == 0x4242);
  CHECK(load32(s.reply, 12) == kRepErrUnsup);
  s = hs.on_oversized_option(kOptSetMetaContext, Handshake::kMaxSkippedOptionLength);
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(load32(s.reply, 12) == kRepErrTooBig);
  // Beyond the cap, for EXPORT_NAME (which has no error reply) and in plain
  // newstyle, the connection is closed.
  CHECK(hs.on_oversized_option(0x4242, Handshake::kMaxSkippedOptionLength + 1).action ==
        Handshake::Action::kClose);
  CHECK(hs.on_oversized_option(kOptExportName, big).action == Handshake::Action::kClose);
  std::string why;
  Handshake plain(cat);
  REQUIRE(plain.accept_client_flags(0, &why));
  CHECK(plain.on_oversized_option(0x4242, big).action == Handshake::Action::kClose);
}

TEST_CASE("requests past the end: ENOSPC for writes, EINVAL for the rest") {
  CHECK(out_of_range_error(kCmdWrite) == kENOSPC);
  CHECK(out_of_range_error(kCmdWriteZeroes) == kENOSPC);
  CHECK(out_of_range_error(kCmdTrim) == kEINVAL);
  CHECK(out_of_range_error(kCmdRead) == kEINVAL);
  CHECK(out_of_range_error(kCmdCache) == kEINVAL);
  CHECK(out_of_range_error(kCmdBlockStatus) == kEINVAL);
}

TEST_CASE("unknown options get ERR_UNSUP and the handshake goes on") {
  FakeCatalog cat;
  Handshake hs(cat);
  auto s = hs.on_option(kOptStartTls, {});
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(load32(s.reply, 12) == kRepErrUnsup);
  s = hs.on_option(0x1234, {});
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(load32(s.reply, 12) == kRepErrUnsup);
}

TEST_CASE("NBD_OPT_LIST lists every export then ACK") {
  FakeCatalog cat;
  Handshake hs(cat);
  auto s = hs.on_option(kOptList, {});
  // SERVER "disk" + description, SERVER "other", ACK
  size_t first = 20 + 4 + 4 + std::strlen("first disk");
  size_t second = 20 + 4 + 5;
  REQUIRE(s.reply.size() == first + second + 20);
  CHECK(load32(s.reply, 12) == kRepServer);
  CHECK(std::string(s.reply.begin() + 24, s.reply.begin() + 28) == "disk");
  CHECK(std::string(s.reply.begin() + 28, s.reply.begin() + first) == "first disk");
  CHECK(load32(s.reply, first + second + 12) == kRepAck);
  CHECK(load32(hs.on_option(kOptList, hex({1})).reply, 12) == kRepErrInvalid);
}

TEST_CASE("NBD_OPT_GO sends INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE, ACK") {
  FakeCatalog cat;
  Handshake hs(cat);
  auto s = hs.on_option(kOptGo, info_payload("disk", {kInfoName, kInfoDescription}));
  CHECK(s.action == Handshake::Action::kTransmit);
  CHECK(s.export_view == &cat.a);
  Bytes expected =
      encode_option_reply(kOptGo, kRepInfo, hex({0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x0d}));
  auto add = [&](const Bytes& b) { expected.insert(expected.end(), b.begin(), b.end()); };
  add(encode_option_reply(kOptGo, kRepInfo, hex({0, 1, 'd', 'i', 's', 'k'})));
  Bytes desc = hex({0, 2});
  desc.insert(desc.end(), cat.a.description.begin(), cat.a.description.end());
  add(encode_option_reply(kOptGo, kRepInfo, desc));
  add(encode_option_reply(kOptGo, kRepInfo, hex({0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0})));
  add(encode_option_reply(kOptGo, kRepAck));
  CHECK(s.reply == expected);
}

TEST_CASE("NBD_OPT_INFO continues; unknown export gets ERR_UNKNOWN; bad payload ERR_INVALID") {
  FakeCatalog cat;
  Handshake hs(cat);
  auto s = hs.on_option(kOptInfo, info_payload("other", {}));
  CHECK(s.action == Handshake::Action::kContinue);
  s = hs.on_option(kOptGo, info_payload("nope", {}));
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(load32(s.reply, 12) == kRepErrUnknown);
  s = hs.on_option(kOptGo, hex({0, 0, 0, 9, 'a'}));
  CHECK(load32(s.reply, 12) == kRepErrInvalid);
}

TEST_CASE("an error naming a long unknown export stays within the 4096-byte string bound") {
  FakeCatalog cat;
  Handshake hs(cat);
  const std::string name(5000, 'x');
  for (uint32_t option : {kOptInfo, kOptGo}) {
    auto s = hs.on_option(option, info_payload(name, {}));
    CHECK(load32(s.reply, 12) == kRepErrUnknown);
    const uint32_t length = load32(s.reply, 16);
    CHECK(length <= kMaxStringBytes);
    CHECK(length == s.reply.size() - 20);
  }
  hs.on_option(kOptStructuredReply, {});
  auto s = hs.on_option(kOptSetMetaContext, meta_payload(name, {"base:allocation"}));
  CHECK(load32(s.reply, 12) == kRepErrUnknown);
  CHECK(load32(s.reply, 16) <= kMaxStringBytes);
  // The encoder bounds every message, whoever builds it.
  CHECK(encode_option_error(kOptGo, kRepErrUnknown, std::string(9000, 'm')).size() ==
        20 + kMaxStringBytes);
}

TEST_CASE("EXPORT_NAME: reply for known export, close for unknown") {
  FakeCatalog cat;
  Handshake hs(cat);
  std::string why;
  hs.accept_client_flags(kClientFixedNewstyle, &why);
  auto s = hs.on_option(kOptExportName, hex({'o', 't', 'h', 'e', 'r'}));
  CHECK(s.action == Handshake::Action::kTransmit);
  CHECK(s.reply.size() == 134);
  Handshake hs2(cat);
  CHECK(hs2.on_option(kOptExportName, hex({'x'})).action == Handshake::Action::kClose);
}

TEST_CASE("structured replies and meta contexts") {
  FakeCatalog cat;
  Handshake hs(cat);
  // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
  auto s = hs.on_option(kOptSetMetaContext, meta_payload("disk", {"base:allocation"}));
  CHECK(load32(s.reply, 12) == kRepErrInvalid);
  s = hs.on_option(kOptStructuredReply, {});
  CHECK(load32(s.reply, 12) == kRepAck);
  CHECK(hs.structured_replies());
  CHECK((hs.tx_flags(cat.a) & kTxSendDf) != 0);
  // LIST with no query lists both contexts with id 0.
  s = hs.on_option(kOptListMetaContext, meta_payload("disk", {}));
  CHECK(load32(s.reply, 12) == kRepMetaContext);
  CHECK(load32(s.reply, 20) == 0);
  CHECK(std::string(s.reply.begin() + 24, s.reply.begin() + 24 + 15) == "base:allocation");
  // SET picks base:allocation, ignores unknown contexts.
  s = hs.on_option(kOptSetMetaContext, meta_payload("disk", {"base:allocation", "x:unknown"}));
  REQUIRE(s.reply.size() == 20 + 4 + 15 + 20);
  CHECK(load32(s.reply, 20) == kMetaIdBaseAllocation);
  CHECK(load32(s.reply, 20 + 4 + 15 + 12) == kRepAck);
  CHECK(hs.meta_selected(kMetaIdBaseAllocation));
  CHECK_FALSE(hs.meta_selected(kMetaIdAllocationDepth));
  // GO to the same export keeps the contexts.
  s = hs.on_option(kOptGo, info_payload("disk", {}));
  CHECK(s.action == Handshake::Action::kTransmit);
  CHECK(hs.meta_selected(kMetaIdBaseAllocation));
}

TEST_CASE("a failed SET_META_CONTEXT leaves no context selected") {
  FakeCatalog cat;
  const Bytes good = meta_payload("disk", {"base:allocation", "qemu:allocation-depth"});
  Bytes truncated = good;
  truncated.resize(truncated.size() - 3);
  struct Failure {
    const char* what;
    Bytes payload;
    uint32_t error;
  };
  for (const auto& f :
       {Failure{"unknown export", meta_payload("nope", {"base:allocation"}), kRepErrUnknown},
        Failure{"malformed payload", truncated, kRepErrInvalid}}) {
    CAPTURE(f.what);
    Handshake hs(cat);
    REQUIRE(load32(hs.on_option(kOptStructuredReply, {}).reply, 12) == kRepAck);
    hs.on_option(kOptSetMetaContext, good);
    REQUIRE(hs.meta_selected(kMetaIdBaseAllocation));
    REQUIRE(hs.meta_selected(kMetaIdAllocationDepth));
    auto s = hs.on_option(kOptSetMetaContext, f.payload);
    CHECK(load32(s.reply, 12) == f.error);
    CHECK_FALSE(hs.meta_selected(kMetaIdBaseAllocation));
    CHECK_FALSE(hs.meta_selected(kMetaIdAllocationDepth));
    s = hs.on_option(kOptGo, info_payload("disk", {}));
    CHECK(s.action == Handshake::Action::kTransmit);
    CHECK_FALSE(hs.meta_selected(kMetaIdBaseAllocation));
    CHECK_FALSE(hs.meta_selected(kMetaIdAllocationDepth));
  }
  // LIST_META_CONTEXT only lists: it leaves the selection alone.
  Handshake hs(cat);
  hs.on_option(kOptStructuredReply, {});
  hs.on_option(kOptSetMetaContext, good);
  hs.on_option(kOptListMetaContext, meta_payload("nope", {}));
  CHECK(hs.meta_selected(kMetaIdBaseAllocation));
}

TEST_CASE("ABORT acks and closes") {
  FakeCatalog cat;
  Handshake hs(cat);
  auto s = hs.on_option(kOptAbort, {});
  CHECK(s.action == Handshake::Action::kClose);
  CHECK(load32(s.reply, 12) == kRepAck);
}
