// The handshake's TLS, authorization and bound rules, byte for byte
// (doc/proto.md "TLS support"; protocol/handshake.h).
#include <doctest/doctest.h>

#include "protocol/handshake.h"
#include "tests/unit/handshake_fixture.h"

using namespace strata::nbd;
using namespace strata::nbd::testing;

namespace {

// The reply type of the first option reply in `s`.
uint32_t reply_type(const Handshake::Step& s) { return load32(s.reply, 12); }

// Every option a client may send before TLS under kRequired, but STARTTLS
// and ABORT.
const uint32_t kGatedOptions[] = {
    kOptList,           kOptInfo, kOptGo, kOptStructuredReply, kOptListMetaContext,
    kOptSetMetaContext, 0x1234};

Bytes payload_for(uint32_t option) {
  if (option == kOptInfo || option == kOptGo) return info_payload("disk", {});
  if (option == kOptListMetaContext || option == kOptSetMetaContext) {
    return meta_payload("disk", {"base:allocation"});
  }
  return {};
}

}  // namespace

TEST_CASE("STARTTLS without TLS configured gets ERR_UNSUP and the handshake goes on") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kOff);
  auto s = hs.on_option(kOptStartTls, {});
  CHECK(reply_type(s) == kRepErrUnsup);
  CHECK(s.action == Handshake::Action::kContinue);
  CHECK(hs.on_option(kOptGo, info_payload("disk", {})).action == Handshake::Action::kTransmit);
}

TEST_CASE("STARTTLS: ACK and kStartTls; a payload or a second STARTTLS gets ERR_INVALID") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kOptional);
  CHECK(reply_type(hs.on_option(kOptStartTls, hex({0}))) == kRepErrInvalid);
  auto s = hs.on_option(kOptStartTls, {});
  CHECK(s.reply == encode_option_reply(kOptStartTls, kRepAck));
  CHECK(s.action == Handshake::Action::kStartTls);
  hs.tls_established("CN=client");
  CHECK(hs.tls());
  CHECK(hs.identity() == "CN=client");
  s = hs.on_option(kOptStartTls, {});
  CHECK(reply_type(s) == kRepErrInvalid);
  CHECK(s.action == Handshake::Action::kContinue);
}

TEST_CASE("required TLS: every option but STARTTLS and ABORT gets ERR_TLS_REQD first") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kRequired);
  for (uint32_t option : kGatedOptions) {
    CAPTURE(option);
    auto s = hs.on_option(option, payload_for(option));
    CHECK(reply_type(s) == kRepErrTlsReqd);
    CHECK(load32(s.reply, 8) == option);
    CHECK(s.action == Handshake::Action::kContinue);
    CHECK(s.refused);
  }
  // An oversized option is refused the same way once its payload is skipped.
  auto big = hs.on_oversized_option(kOptGo, Handshake::kMaxOptionLength + 1);
  CHECK(reply_type(big) == kRepErrTlsReqd);
  CHECK(big.action == Handshake::Action::kContinue);
  // EXPORT_NAME has no error reply: the connection closes.
  auto name = hs.on_option(kOptExportName, Bytes{'d', 'i', 's', 'k'});
  CHECK(name.reply.empty());
  CHECK(name.action == Handshake::Action::kClose);
  // After TLS the same options work.
  CHECK(hs.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
  hs.tls_established("");
  CHECK(reply_type(hs.on_option(kOptStructuredReply, {})) == kRepAck);
  CHECK(hs.on_option(kOptGo, info_payload("disk", {})).action == Handshake::Action::kTransmit);
}

TEST_CASE("required TLS: ABORT before STARTTLS is acknowledged") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kRequired);
  REQUIRE(reply_type(hs.on_option(kOptGo, info_payload("disk", {}))) == kRepErrTlsReqd);
  auto s = hs.on_option(kOptAbort, {});
  CHECK(s.reply == encode_option_reply(kOptAbort, kRepAck));
  CHECK(s.action == Handshake::Action::kClose);
}

TEST_CASE("required TLS: a client without fixed newstyle is closed before any export") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kRequired);
  std::string why;
  REQUIRE(hs.accept_client_flags(0, &why));
  auto s = hs.on_option(kOptExportName, {});
  CHECK(s.action == Handshake::Action::kClose);
  CHECK(s.reply.empty());
}

TEST_CASE("STARTTLS forgets the structured replies and meta contexts negotiated in plain text") {
  FakeCatalog cat;
  Handshake hs(cat, TlsPolicy::kOptional);
  REQUIRE(reply_type(hs.on_option(kOptStructuredReply, {})) == kRepAck);
  REQUIRE(reply_type(hs.on_option(kOptSetMetaContext, meta_payload("disk", {"base:allocation"}))) ==
          kRepMetaContext);
  REQUIRE(hs.meta_selected(kMetaIdBaseAllocation));
  REQUIRE(hs.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
  hs.tls_established("");
  CHECK_FALSE(hs.structured_replies());
  CHECK_FALSE(hs.meta_selected(kMetaIdBaseAllocation));
  CHECK_FALSE(hs.meta_selected(kMetaIdAllocationDepth));
  CHECK((hs.tx_flags(cat.a) & kTxSendDf) == 0);
}

TEST_CASE("optional TLS: a tls_required export is hidden from and refused to plain clients") {
  FakeCatalog cat;
  cat.b.tls_required = true;
  Handshake hs(cat, TlsPolicy::kOptional);
  auto list = hs.on_option(kOptList, {});
  // Only "disk" (20 + 4 + 4 + description) then ACK.
  CHECK(list.reply.size() == 20 + 4 + 4 + cat.a.description.size() + 20);
  auto go = hs.on_option(kOptGo, info_payload("other", {}));
  CHECK(reply_type(go) == kRepErrTlsReqd);
  CHECK(go.action == Handshake::Action::kContinue);
  CHECK(go.refused);
  CHECK(reply_type(hs.on_option(kOptInfo, info_payload("other", {}))) == kRepErrTlsReqd);
  CHECK(reply_type(hs.on_option(kOptListMetaContext, meta_payload("other", {}))) == kRepErrTlsReqd);
  // The plain export still works for the plain client.
  CHECK(hs.on_option(kOptGo, info_payload("disk", {})).action == Handshake::Action::kTransmit);

  Handshake plain_name(cat, TlsPolicy::kOptional);
  CHECK(plain_name.on_option(kOptExportName, Bytes{'o', 't', 'h', 'e', 'r'}).action ==
        Handshake::Action::kClose);

  Handshake secured(cat, TlsPolicy::kOptional);
  REQUIRE(secured.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
  secured.tls_established("");
  CHECK(secured.on_option(kOptList, {}).reply.size() ==
        20 + 4 + 4 + cat.a.description.size() + 20 + 4 + 5 + 20);
  CHECK(secured.on_option(kOptGo, info_payload("other", {})).action ==
        Handshake::Action::kTransmit);
}

TEST_CASE("allow lists: exact and glob identities pass, others get ERR_POLICY and no LIST entry") {
  FakeCatalog cat;
  cat.b.allow = {"CN=backup,O=Example", "CN=ops-*"};
  const auto go_other = [&](const std::string& identity, bool tls) {
    Handshake hs(cat, TlsPolicy::kOptional);
    if (tls) {
      REQUIRE(hs.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
      hs.tls_established(identity);
    }
    return hs.on_option(kOptGo, info_payload("other", {}));
  };
  CHECK(go_other("CN=backup,O=Example", true).action == Handshake::Action::kTransmit);
  CHECK(go_other("CN=ops-7", true).action == Handshake::Action::kTransmit);
  for (auto [identity, tls] : {std::pair<const char*, bool>{"CN=backup", true},
                               {"CN=backup,O=Example,OU=x", true},
                               {"alice", true},
                               {"", true},
                               {"", false}}) {
    CAPTURE(identity);
    auto s = go_other(identity, tls);
    CHECK(reply_type(s) == kRepErrPolicy);
    CHECK(s.action == Handshake::Action::kContinue);
    CHECK(s.refused);
  }

  Handshake hs(cat, TlsPolicy::kOptional);
  REQUIRE(hs.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
  hs.tls_established("alice");
  CHECK(hs.on_option(kOptList, {}).reply.size() == 20 + 4 + 4 + cat.a.description.size() + 20);
  CHECK(reply_type(hs.on_option(kOptInfo, info_payload("other", {}))) == kRepErrPolicy);
  CHECK(reply_type(hs.on_option(kOptListMetaContext, meta_payload("other", {}))) == kRepErrPolicy);
  CHECK(hs.on_option(kOptExportName, Bytes{'o', 't', 'h', 'e', 'r'}).action ==
        Handshake::Action::kClose);
}

TEST_CASE("a PSK username is an identity like a DN") {
  FakeCatalog cat;
  cat.a.allow = {"alice"};
  Handshake hs(cat, TlsPolicy::kRequired);
  REQUIRE(hs.on_option(kOptStartTls, {}).action == Handshake::Action::kStartTls);
  hs.tls_established("alice");
  CHECK(hs.on_option(kOptGo, info_payload("", {})).action == Handshake::Action::kTransmit);
}

TEST_CASE("a handshake is closed past kMaxOptions options") {
  FakeCatalog cat;
  Handshake hs(cat);
  for (uint32_t i = 0; i < Handshake::kMaxOptions; ++i) {
    auto s = hs.on_option(0x1234, {});
    REQUIRE(s.action == Handshake::Action::kContinue);
  }
  auto s = hs.on_option(kOptList, {});
  CHECK(s.action == Handshake::Action::kClose);
  CHECK(s.reply.empty());
}

TEST_CASE("a handshake is closed past kMaxOptionBytes of option payload") {
  FakeCatalog cat;
  Handshake hs(cat);
  const uint32_t big = Handshake::kMaxSkippedOptionLength;
  static_assert(2ull * Handshake::kMaxSkippedOptionLength == Handshake::kMaxOptionBytes);
  CHECK(hs.on_oversized_option(0x1234, big).action == Handshake::Action::kContinue);
  CHECK(hs.on_oversized_option(0x1234, big).action == Handshake::Action::kContinue);
  // Not one more byte: the next option, however small, closes.
  CHECK(hs.on_option(0x1234, hex({0})).action == Handshake::Action::kClose);
}
