// fuzz_handshake: the handshake logic and the wire decoders (protocol/
// handshake.*, protocol/nbd.*), without sockets.
//
// The input is what a client sends: 4 bytes of client flags, then options
// (IHAVEOPT, option, length, payload) until one ends the handshake, then
// 28-byte transmission requests (a WRITE followed by its payload). Each piece
// goes where the server would send it: flags to accept_client_flags(), each
// option to on_option(), each request to decode_request().
//
// Invariants beyond "no crash" (NBD protocol, doc/proto.md):
//  - every option is answered by well-formed option replies (reply magic,
//    the option echoed, the announced length) of the types that option may
//    get, ending with exactly one final reply (ACK or an error);
//  - strings in replies (names, descriptions, error messages) are at most
//    4096 bytes;
//  - INFO/GO: NBD_INFO_EXPORT names the export's size and flags (with
//    HAS_FLAGS), block sizes are powers of two with min <= preferred <= max;
//    GO enters transmission exactly when it is acknowledged, with the export
//    asked for; EXPORT_NAME enters it with a reply of the right length;
//  - SET_META_CONTEXT: the contexts the handshake reports selected are the
//    ones it replied with, and none after it failed (the option replaces
//    them "including when this command fails"); each is a context of the
//    export named, with its id (base:allocation 1, qemu:allocation-depth 2,
//    qemu:dirty-bitmap:NAME 3 + the bitmap's index), asked for by its exact
//    name, replied once, in id order;
//  - LIST_META_CONTEXT: contexts of the export named, with id 0, each once,
//    in id order; the selection is left alone;
//  - GO and EXPORT_NAME keep a selection only for the export it was made
//    for, so every context id that reaches transmission is one of the
//    entered export's;
//  - the decoders are lossless: a decoded request or option payload, encoded
//    again, gives the same bytes;
//  - TLS and authorization (the policy is picked from the input's length):
//    no export is entered before STARTTLS under TlsPolicy::kRequired, and
//    every option but STARTTLS and ABORT gets ERR_TLS_REQD there; STARTTLS is
//    acknowledged only once and never without TLS configured; the export
//    with an allow list is never entered by a client whose identity does not
//    match it.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "protocol/handshake.h"
#include "protocol/nbd.h"
#include "tests/fuzz/fuzz_check.h"

namespace strata::fuzz {
namespace {

using namespace strata::nbd;

constexpr size_t kMaxString = 4096;

class Catalog final : public ExportCatalog {
 public:
  Catalog() {
    disk_.name = "disk";
    disk_.description = "a read-write disk";
    disk_.size = 1 << 20;
    disk_.tx_flags = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes;
    ro_.name = "ro";
    ro_.size = 64 * 1024 + 512;
    ro_.tx_flags = kTxHasFlags | kTxReadOnly;
    ro_.min_block = 512;
    ro_.pref_block = 64 * 1024;
    ro_.allow = {"CN=ok*"};
    // Bitmaps: names with the context separator in them, one at the longest
    // length a qcow2 name may have, ones that only another export has, and
    // one that two exports have at different indexes. "backup" is open to
    // every client, so a selection made for it can be carried to "disk".
    disk_.bitmaps = {"backup-0", "a:b", std::string(1023, 'n'), "qemu:"};
    ro_.bitmaps = {"ro-only"};
    backup_.name = "backup";
    backup_.size = 1 << 20;
    backup_.tx_flags = kTxHasFlags | kTxReadOnly;
    backup_.bitmaps = {"weekly", "backup-0"};
  }
  const ExportView* find(std::string_view name) const override {
    if (name.empty() || name == disk_.name) return &disk_;
    if (name == ro_.name) return &ro_;
    if (name == backup_.name) return &backup_;
    return nullptr;
  }
  std::vector<const ExportView*> all() const override { return {&disk_, &ro_, &backup_}; }

 private:
  ExportView disk_, ro_, backup_;
};

uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t be32(const uint8_t* p) { return uint32_t{be16(p)} << 16 | be16(p + 2); }
uint64_t be64(const uint8_t* p) { return uint64_t{be32(p)} << 32 | be32(p + 4); }

bool power_of_two(uint32_t v) { return v && !(v & (v - 1)); }

struct OptionReply {
  uint32_t type;
  std::vector<uint8_t> payload;
};

// Splits a step's bytes into option replies, checking their framing.
std::vector<OptionReply> split_replies(uint32_t option, const Bytes& bytes) {
  std::vector<OptionReply> out;
  size_t pos = 0;
  while (pos < bytes.size()) {
    FUZZ_CHECK(bytes.size() - pos >= 20, "a truncated option reply header");
    const uint8_t* h = bytes.data() + pos;
    FUZZ_CHECK(be64(h) == kOptReplyMagic, "an option reply without the reply magic");
    FUZZ_CHECK(be32(h + 8) == option, "an option reply for another option");
    uint32_t len = be32(h + 16);
    FUZZ_CHECK(len <= bytes.size() - pos - 20, "an option reply longer than what was sent");
    out.push_back({be32(h + 12), {h + 20, h + 20 + len}});
    pos += 20 + len;
  }
  return out;
}

bool is_error(uint32_t type) { return type & 0x80000000u; }

class Harness {
 public:
  void run(const uint8_t* data, size_t size) {
    policy_ = static_cast<TlsPolicy>(size % 3);
    Handshake hs(catalog_, policy_);
    check_greeting(hs.greeting());
    if (size < 4) return;
    uint32_t flags = be32(data);
    std::string why;
    if (!hs.accept_client_flags(flags, &why)) return;
    no_zeroes_ = flags & kClientNoZeroes;
    fixed_newstyle_ = flags & kClientFixedNewstyle;
    size_t pos = 4;
    while (size - pos >= kOptionHeaderSize) {
      auto hdr = decode_option_header(std::span<const uint8_t, kOptionHeaderSize>(data + pos, 16));
      if (hdr.magic != kOptMagic) return;  // the server closes
      if (hdr.length > Handshake::kMaxOptionLength) return;
      if (hdr.length > size - pos - 16) return;
      std::span<const uint8_t> payload(data + pos + 16, hdr.length);
      pos += 16 + hdr.length;
      check_decoders(hdr.option, payload);
      const bool tls_before = hs.tls();
      meta_before_ = hs.meta_contexts();
      auto step = hs.on_option(hdr.option, payload);
      check_tls_rules(tls_before, hdr.option, step);
      check_step(hs, hdr.option, payload, step);
      check_meta_on_entry(hs, step);
      if (step.action == Handshake::Action::kClose) return;
      if (step.action == Handshake::Action::kStartTls) {
        meta_view_ = nullptr;  // the selection is forgotten with TLS
        // The identity alternates between one the allow list takes and one
        // it does not.
        hs.tls_established(hdr.length % 2 ? "CN=ok-client" : "CN=other");
        continue;
      }
      if (step.action == Handshake::Action::kTransmit) return requests(data + pos, size - pos);
    }
  }

 private:
  static void check_greeting(const Bytes& g) {
    FUZZ_CHECK(g.size() == 18 && be64(g.data()) == kInitMagic && be64(g.data() + 8) == kOptMagic,
               "a malformed greeting");
    FUZZ_CHECK(be16(g.data() + 16) & kFlagFixedNewstyle, "the greeting lacks FIXED_NEWSTYLE");
  }

  // The decoders accept exactly their canonical encoding.
  static void check_decoders(uint32_t option, std::span<const uint8_t> payload) {
    if (option == kOptInfo || option == kOptGo) {
      if (auto r = decode_info_request(payload)) {
        Bytes b;
        Writer w(b);
        w.u32(static_cast<uint32_t>(r->name.size())).bytes(r->name);
        w.u16(static_cast<uint16_t>(r->requests.size()));
        for (uint16_t q : r->requests) w.u16(q);
        FUZZ_CHECK(std::equal(b.begin(), b.end(), payload.begin(), payload.end()),
                   "decode_info_request is not lossless");
      }
    }
    if (option == kOptListMetaContext || option == kOptSetMetaContext) {
      if (auto r = decode_meta_context_request(payload)) {
        Bytes b;
        Writer w(b);
        w.u32(static_cast<uint32_t>(r->export_name.size())).bytes(r->export_name);
        w.u32(static_cast<uint32_t>(r->queries.size()));
        for (const auto& q : r->queries) w.u32(static_cast<uint32_t>(q.size())).bytes(q);
        FUZZ_CHECK(std::equal(b.begin(), b.end(), payload.begin(), payload.end()),
                   "decode_meta_context_request is not lossless");
      }
    }
  }

  void check_tls_rules(bool tls_before, uint32_t option, const Handshake::Step& step) const {
    if (step.action == Handshake::Action::kStartTls) {
      FUZZ_CHECK(option == kOptStartTls && policy_ != TlsPolicy::kOff && !tls_before,
                 "TLS started without TLS configured, twice, or by another option");
    }
    if (policy_ != TlsPolicy::kRequired || tls_before) return;
    FUZZ_CHECK(step.action != Handshake::Action::kTransmit, "an export entered before STARTTLS");
    if (option == kOptStartTls || option == kOptAbort || !fixed_newstyle_ ||
        option == kOptExportName) {
      return;
    }
    auto replies = split_replies(option, step.reply);
    FUZZ_CHECK(replies.size() == 1 && replies[0].type == kRepErrTlsReqd,
               "an option before STARTTLS got more than ERR_TLS_REQD");
  }

  void check_step(const Handshake& hs, uint32_t option, std::span<const uint8_t> payload,
                  const Handshake::Step& step) {
    if (option == kOptExportName) return check_export_name(hs, payload, step);
    // Without fixed newstyle a server cannot answer other options: it closes.
    if (!fixed_newstyle_) {
      FUZZ_CHECK(step.action == Handshake::Action::kClose && step.reply.empty(),
                 "a client without fixed newstyle got an option reply");
      return;
    }
    auto replies = split_replies(option, step.reply);
    FUZZ_CHECK(!replies.empty(), "an option got no reply");
    for (size_t i = 0; i + 1 < replies.size(); ++i) {
      FUZZ_CHECK(replies[i].type != kRepAck && !is_error(replies[i].type),
                 "a final option reply before the last one");
    }
    const OptionReply& last = replies.back();
    FUZZ_CHECK(last.type == kRepAck || is_error(last.type), "the last option reply is not final");
    if (is_error(last.type)) {
      FUZZ_CHECK(last.payload.size() <= kMaxString, "an error message over 4096 bytes");
    }
    FUZZ_CHECK(
        step.action != Handshake::Action::kTransmit || (option == kOptGo && last.type == kRepAck),
        "transmission entered by an option other than an acknowledged GO");
    for (const auto& r : replies) check_reply_type(option, r);
    switch (option) {
      case kOptAbort:
        FUZZ_CHECK(step.action == Handshake::Action::kClose, "ABORT did not end the handshake");
        break;
      case kOptInfo:
      case kOptGo:
        check_info(hs, option, payload, replies, step);
        break;
      case kOptSetMetaContext:
      case kOptListMetaContext:
        check_meta(hs, option, payload, replies);
        break;
      default:
        break;
    }
  }

  // Which reply types an option may get besides ACK and errors.
  static void check_reply_type(uint32_t option, const OptionReply& r) {
    if (r.type == kRepAck || is_error(r.type)) return;
    bool ok = (r.type == kRepServer && option == kOptList) ||
              (r.type == kRepInfo && (option == kOptInfo || option == kOptGo)) ||
              (r.type == kRepMetaContext &&
               (option == kOptListMetaContext || option == kOptSetMetaContext));
    FUZZ_CHECK(ok, "an option reply type that option never gets");
    if (r.type == kRepServer) {
      FUZZ_CHECK(r.payload.size() >= 4, "a short NBD_REP_SERVER");
      uint32_t n = be32(r.payload.data());
      FUZZ_CHECK(
          n <= r.payload.size() - 4 && n <= kMaxString && r.payload.size() - 4 - n <= kMaxString,
          "NBD_REP_SERVER: bad name length");
    }
    if (r.type == kRepMetaContext) {
      FUZZ_CHECK(r.payload.size() > 4 && r.payload.size() - 4 <= kMaxString,
                 "NBD_REP_META_CONTEXT: bad context name");
    }
  }

  void check_export_name(const Handshake& hs, std::span<const uint8_t> payload,
                         const Handshake::Step& step) {
    std::string name(payload.begin(), payload.end());
    const ExportView* e = catalog_.find(name);
    const bool refused = (policy_ == TlsPolicy::kRequired && !hs.tls()) ||
                         (e && !e->allow.empty() && hs.identity() != "CN=ok-client");
    if (!e || refused) {
      FUZZ_CHECK(step.action == Handshake::Action::kClose && step.reply.empty(),
                 "EXPORT_NAME of an unknown or refused export must close without a reply");
      return;
    }
    FUZZ_CHECK(step.action == Handshake::Action::kTransmit && step.export_view == e,
               "EXPORT_NAME of a known export must enter transmission with it");
    FUZZ_CHECK(step.reply.size() == (no_zeroes_ ? 10u : 134u), "EXPORT_NAME reply length");
    FUZZ_CHECK(be64(step.reply.data()) == e->size, "EXPORT_NAME reply: export size");
    uint16_t f = be16(step.reply.data() + 8);
    FUZZ_CHECK(f == hs.tx_flags(*e) && (f & kTxHasFlags), "EXPORT_NAME reply: flags");
  }

  void check_info(const Handshake& hs, uint32_t option, std::span<const uint8_t> payload,
                  const std::vector<OptionReply>& replies, const Handshake::Step& step) {
    auto req = decode_info_request(payload);
    const ExportView* e = req ? catalog_.find(req->name) : nullptr;
    if (replies.back().type != kRepAck) {
      FUZZ_CHECK(step.action == Handshake::Action::kContinue,
                 "a failed INFO/GO ended the handshake");
      return;
    }
    FUZZ_CHECK(e != nullptr, "INFO/GO acknowledged for an unknown export or a malformed request");
    FUZZ_CHECK(e->allow.empty() || hs.identity() == "CN=ok-client",
               "INFO/GO acknowledged for an identity not allowed");
    int exports = 0;
    for (const auto& r : replies) {
      if (r.type != kRepInfo) continue;
      FUZZ_CHECK(r.payload.size() >= 2, "a short NBD_REP_INFO");
      const uint8_t* p = r.payload.data();
      switch (be16(p)) {
        case kInfoExport:
          ++exports;
          FUZZ_CHECK(r.payload.size() == 12, "NBD_INFO_EXPORT length");
          FUZZ_CHECK(be64(p + 2) == e->size, "NBD_INFO_EXPORT: export size");
          FUZZ_CHECK(be16(p + 10) & kTxHasFlags, "NBD_INFO_EXPORT: flags without HAS_FLAGS");
          break;
        case kInfoBlockSize: {
          FUZZ_CHECK(r.payload.size() == 14, "NBD_INFO_BLOCK_SIZE length");
          uint32_t mn = be32(p + 2), pref = be32(p + 6), mx = be32(p + 10);
          FUZZ_CHECK(power_of_two(mn) && power_of_two(pref) && mn <= 65536 && mn <= pref &&
                         pref <= mx && pref >= 512 && mx % mn == 0,
                     "NBD_INFO_BLOCK_SIZE: inconsistent sizes");
          break;
        }
        case kInfoName:
        case kInfoDescription:
          FUZZ_CHECK(r.payload.size() - 2 <= kMaxString, "NBD_INFO name/description too long");
          break;
        default:
          FUZZ_CHECK(false, "an NBD_INFO type the client cannot know");
      }
    }
    FUZZ_CHECK(exports == 1, "an acknowledged INFO/GO without exactly one NBD_INFO_EXPORT");
    if (option == kOptGo) {
      FUZZ_CHECK(step.action == Handshake::Action::kTransmit && step.export_view == e,
                 "an acknowledged GO must enter transmission with the export asked for");
    }
  }

  // The id a context name has on `e`; 0 when `e` has no such context.
  static uint32_t context_id(const ExportView& e, std::string_view name) {
    if (name == kMetaBaseAllocation) return kMetaIdBaseAllocation;
    if (name == kMetaAllocationDepth) return kMetaIdAllocationDepth;
    if (!name.starts_with(kMetaDirtyBitmapPrefix)) return 0;
    name.remove_prefix(kMetaDirtyBitmapPrefix.size());
    for (size_t i = 0; i < e.bitmaps.size(); ++i) {
      if (e.bitmaps[i] == name) return kMetaIdDirtyBitmapBase + static_cast<uint32_t>(i);
    }
    return 0;
  }

  void check_meta(const Handshake& hs, uint32_t option, std::span<const uint8_t> payload,
                  const std::vector<OptionReply>& replies) {
    const bool set = option == kOptSetMetaContext;
    auto req = decode_meta_context_request(payload);
    const ExportView* e = req ? catalog_.find(req->export_name) : nullptr;
    std::vector<uint32_t> ids;
    for (const auto& r : replies) {
      if (r.type != kRepMetaContext) continue;
      FUZZ_CHECK(e != nullptr, "META_CONTEXT: a context for an unknown export");
      uint32_t wire_id = be32(r.payload.data());
      std::string name(r.payload.begin() + 4, r.payload.end());
      const uint32_t id = context_id(*e, name);
      FUZZ_CHECK(id != 0, "META_CONTEXT: a context the export does not have");
      FUZZ_CHECK(wire_id == (set ? id : 0), "META_CONTEXT: a context with the wrong id");
      FUZZ_CHECK(ids.empty() || ids.back() < id, "META_CONTEXT: contexts twice or out of order");
      if (set) {
        FUZZ_CHECK(std::find(req->queries.begin(), req->queries.end(), name) != req->queries.end(),
                   "SET_META_CONTEXT selected a context no query named exactly");
      }
      ids.push_back(id);
    }
    if (!set) {
      FUZZ_CHECK(hs.meta_contexts() == meta_before_, "LIST_META_CONTEXT changed the selection");
      return;
    }
    const bool acked = replies.back().type == kRepAck;
    FUZZ_CHECK(hs.meta_contexts() == (acked ? ids : std::vector<uint32_t>{}),
               "the contexts selected are not those SET_META_CONTEXT replied with "
               "(after a failure: none)");
    meta_view_ = acked ? e : nullptr;
  }

  // Entering an export: the selection holds only contexts of it, and none
  // when it was made for another export.
  void check_meta_on_entry(const Handshake& hs, const Handshake::Step& step) const {
    if (step.action != Handshake::Action::kTransmit) return;
    const ExportView& e = *step.export_view;
    if (meta_view_ != &e) {
      FUZZ_CHECK(hs.meta_contexts().empty(),
                 "a selection for another export survived GO or EXPORT_NAME");
    }
    Session s;
    hs.fill_meta_contexts(e, s);
    FUZZ_CHECK(s.bitmaps.size() + size_t{s.base_allocation} + size_t{s.allocation_depth} ==
                   hs.meta_contexts().size(),
               "a selected context the entered export does not have");
    for (const auto& b : s.bitmaps) {
      FUZZ_CHECK(meta_context_name(e, b.id) == std::string(kMetaDirtyBitmapPrefix) + b.name,
                 "a session bitmap whose id is not its name's");
    }
  }

  // Transmission: each request decodes, and encodes back to the same bytes.
  static void requests(const uint8_t* data, size_t size) {
    size_t pos = 0;
    while (size - pos >= kRequestSize) {
      auto r = decode_request(std::span<const uint8_t, kRequestSize>(data + pos, kRequestSize));
      uint8_t again[kRequestSize];
      encode_request(r, again);
      FUZZ_CHECK(std::memcmp(again, data + pos, kRequestSize) == 0,
                 "decode_request is not lossless");
      if (r.magic != kRequestMagic || r.type == kCmdDisc) return;
      pos += kRequestSize;
      if (r.type == kCmdWrite) {
        if (r.length > size - pos) return;
        pos += r.length;
      }
    }
  }

  Catalog catalog_;
  std::vector<uint32_t> meta_before_;      // the selection before the option
  const ExportView* meta_view_ = nullptr;  // the export the selection is for
  bool no_zeroes_ = false;
  bool fixed_newstyle_ = true;
  TlsPolicy policy_ = TlsPolicy::kOff;
};

}  // namespace
}  // namespace strata::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  strata::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  strata::fuzz::Harness h;
  h.run(data, size);
  return 0;
}
