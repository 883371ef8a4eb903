#include "protocol/handshake.h"

#include <fnmatch.h>

#include <algorithm>
#include <optional>
#include <unordered_map>

namespace strata::nbd {
namespace {

// The message naming an export a client asked for. The name is the client's
// (up to the option's length), the spec bounds every string at 4096 bytes, and
// a log line should stay readable: long names are cut.
std::string unknown_export_message(std::string_view name) {
  constexpr size_t kShown = 256;
  if (name.size() <= kShown) return "unknown export '" + std::string(name) + "'";
  return "unknown export '" + std::string(name.substr(0, kShown)) + "...' (" +
         std::to_string(name.size()) + " bytes)";
}

bool identity_matches(const std::string& pattern, const std::string& identity) {
  return pattern == identity || ::fnmatch(pattern.c_str(), identity.c_str(), 0) == 0;
}

// The contexts of `e` that `queries` name, as ascending ids, each once. SET
// (list = false) takes exact names only; LIST also takes the namespace
// queries qemu-nbd answers ("base:", "qemu:", "qemu:dirty-bitmap:"), and no
// query at all lists everything.
std::vector<uint32_t> matching_contexts(const ExportView& e,
                                        const std::vector<std::string>& queries, bool list) {
  std::vector<bool> chosen(kMetaIdDirtyBitmapBase + e.bitmaps.size(), false);
  auto choose_bitmaps = [&] {
    std::fill(chosen.begin() + kMetaIdDirtyBitmapBase, chosen.end(), true);
  };
  // Built on the first bitmap name asked for, so that many queries over
  // many bitmaps cost one pass over the bitmaps, not one per query.
  std::unordered_map<std::string_view, size_t> by_name;
  auto find_bitmap = [&](std::string_view name) -> std::optional<size_t> {
    if (by_name.empty()) {
      for (size_t i = 0; i < e.bitmaps.size(); ++i) by_name.emplace(e.bitmaps[i], i);
    }
    auto it = by_name.find(name);
    if (it == by_name.end()) return std::nullopt;
    return it->second;
  };
  if (list && queries.empty()) {
    std::fill(chosen.begin() + kMetaIdBaseAllocation, chosen.end(), true);
  }
  for (const std::string& query : queries) {
    const std::string_view q = query;
    if (q == kMetaBaseAllocation || (list && q == "base:")) {
      chosen[kMetaIdBaseAllocation] = true;
    } else if (q == kMetaAllocationDepth) {
      chosen[kMetaIdAllocationDepth] = true;
    } else if (list && q == "qemu:") {
      chosen[kMetaIdAllocationDepth] = true;
      choose_bitmaps();
    } else if (q.starts_with(kMetaDirtyBitmapPrefix)) {
      const std::string_view name = q.substr(kMetaDirtyBitmapPrefix.size());
      if (list && name.empty()) {
        choose_bitmaps();
      } else if (auto i = find_bitmap(name)) {
        chosen[kMetaIdDirtyBitmapBase + *i] = true;
      }
    }
  }
  std::vector<uint32_t> ids;
  for (size_t id = kMetaIdBaseAllocation; id < chosen.size(); ++id) {
    if (chosen[id]) ids.push_back(static_cast<uint32_t>(id));
  }
  return ids;
}

}  // namespace

std::string meta_context_name(const ExportView& e, uint32_t id) {
  if (id == kMetaIdBaseAllocation) return std::string(kMetaBaseAllocation);
  if (id == kMetaIdAllocationDepth) return std::string(kMetaAllocationDepth);
  if (id >= kMetaIdDirtyBitmapBase && id - kMetaIdDirtyBitmapBase < e.bitmaps.size()) {
    return std::string(kMetaDirtyBitmapPrefix) + e.bitmaps[id - kMetaIdDirtyBitmapBase];
  }
  return {};
}

bool Handshake::meta_selected(uint32_t id) const {
  return std::binary_search(meta_ids_.begin(), meta_ids_.end(), id);
}

void Handshake::fill_meta_contexts(const ExportView& e, Session& s) const {
  s.base_allocation = meta_selected(kMetaIdBaseAllocation);
  s.allocation_depth = meta_selected(kMetaIdAllocationDepth);
  s.bitmaps.clear();
  for (uint32_t id : meta_ids_) {
    if (id < kMetaIdDirtyBitmapBase || id - kMetaIdDirtyBitmapBase >= e.bitmaps.size()) continue;
    s.bitmaps.push_back({id, e.bitmaps[id - kMetaIdDirtyBitmapBase]});
  }
}

void Handshake::keep_meta_contexts_only_for(const ExportView* e) {
  if (exports_.find(meta_export_) != e) meta_ids_.clear();
}

void Handshake::tls_established(std::string identity) {
  tls_ = true;
  identity_ = std::move(identity);
  structured_ = false;
  meta_ids_.clear();
  meta_export_.clear();
}

bool Handshake::over_limits(uint64_t payload_bytes, Step& step) {
  ++options_seen_;
  option_bytes_ += payload_bytes;
  if (options_seen_ <= kMaxOptions && option_bytes_ <= kMaxOptionBytes) return false;
  step.action = Action::kClose;
  step.note = options_seen_ > kMaxOptions
                  ? "more than " + std::to_string(kMaxOptions) + " options in one handshake"
                  : "more than " + std::to_string(kMaxOptionBytes) +
                        " bytes of option payload in one handshake";
  return true;
}

bool Handshake::tls_needed_first(uint32_t option, Step& step) const {
  if (tls_policy_ != TlsPolicy::kRequired || tls_) return false;
  if (option == kOptStartTls || option == kOptAbort) return false;
  step.refused = true;
  step.refusal = Refusal::kTlsRequired;
  if (option == kOptExportName) {  // the only option a client without fixed newstyle gets here
    step.action = Action::kClose;  // no reply can say why
    step.note = "option " + std::to_string(option) + " before STARTTLS, TLS is required";
    return true;
  }
  step.reply = encode_option_error(option, kRepErrTlsReqd, "TLS is required: start it first");
  step.note = "option " + std::to_string(option) + " refused before STARTTLS";
  return true;
}

Handshake::Refusal Handshake::refusal_kind(uint32_t error) {
  return error == kRepErrTlsReqd ? Refusal::kTlsRequired : Refusal::kPolicy;
}

uint32_t Handshake::refusal(const ExportView& e, std::string* why) const {
  if (e.tls_required && !tls_) {
    *why = "export '" + e.name + "' requires TLS";
    return kRepErrTlsReqd;
  }
  if (e.allow.empty()) return 0;
  if (!identity_.empty() && std::any_of(e.allow.begin(), e.allow.end(), [&](const std::string& p) {
        return identity_matches(p, identity_);
      })) {
    return 0;
  }
  *why =
      "export '" + e.name + "' is not allowed for " +
      (identity_.empty() ? std::string("a client without a TLS identity") : "'" + identity_ + "'");
  return kRepErrPolicy;
}

Handshake::Step Handshake::start_tls(uint32_t option, std::span<const uint8_t> data) {
  Step step;
  if (tls_policy_ == TlsPolicy::kOff) {
    step.reply = encode_option_error(option, kRepErrUnsup, "TLS is not configured");
  } else if (tls_) {
    step.reply = encode_option_error(option, kRepErrInvalid, "TLS is already on");
  } else if (!data.empty()) {
    step.reply = encode_option_error(option, kRepErrInvalid, "payload must be empty");
  } else {
    step.reply = encode_option_reply(option, kRepAck);
    step.action = Action::kStartTls;
  }
  return step;
}

bool Handshake::accept_client_flags(uint32_t flags, std::string* why) {
  if (flags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
    *why = "client sent unknown handshake flags";
    return false;
  }
  fixed_newstyle_ = flags & kClientFixedNewstyle;
  no_zeroes_ = flags & kClientNoZeroes;
  return true;
}

bool Handshake::known_option(uint32_t option) {
  switch (option) {
    case kOptExportName:
    case kOptAbort:
    case kOptList:
    case kOptStartTls:
    case kOptInfo:
    case kOptGo:
    case kOptStructuredReply:
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return true;
    default:
      return false;
  }
}

Handshake::Step Handshake::on_oversized_option(uint32_t option, uint32_t length) {
  Step step;
  if (over_limits(length, step)) return step;
  step.note =
      "option " + std::to_string(option) + " with " + std::to_string(length) + " bytes of payload";
  if (!fixed_newstyle_ || option == kOptExportName || length > kMaxSkippedOptionLength) {
    step.action = Action::kClose;
    return step;
  }
  if (tls_needed_first(option, step)) return step;
  if (option == kOptSetMetaContext) meta_ids_.clear();  // a failed SET leaves none
  step.reply = known_option(option)
                   ? encode_option_error(option, kRepErrTooBig, "option payload too large")
                   : encode_option_error(option, kRepErrUnsup, "option not supported");
  return step;
}

uint16_t Handshake::tx_flags(const ExportView& e) const {
  uint16_t f = e.tx_flags | kTxHasFlags;
  if (structured_) f |= kTxSendDf;
  return f;
}

Handshake::Step Handshake::on_option(uint32_t option, std::span<const uint8_t> data) {
  Step step;
  if (over_limits(data.size(), step)) return step;
  if (!fixed_newstyle_ && option != kOptExportName) {
    step.action = Action::kClose;
    step.note = "option " + std::to_string(option) + " from a client without fixed newstyle";
    return step;
  }
  if (tls_needed_first(option, step)) return step;
  switch (option) {
    case kOptExportName: {
      std::string name(data.begin(), data.end());
      const ExportView* e = exports_.find(name);
      if (!e) {
        step.action = Action::kClose;
        step.note = unknown_export_message(name);
        step.refusal = Refusal::kUnknownExport;
        return step;
      }
      if (uint32_t error = refusal(*e, &step.note)) {
        step.action = Action::kClose;
        step.refused = true;
        step.refusal = refusal_kind(error);
        return step;
      }
      step.reply = encode_export_name_reply(e->size, tx_flags(*e), no_zeroes_);
      keep_meta_contexts_only_for(e);
      step.action = Action::kTransmit;
      step.export_view = e;
      return step;
    }
    case kOptAbort:
      step.reply = encode_option_reply(option, kRepAck);
      step.action = Action::kClose;
      step.note = "client aborted";
      return step;
    case kOptList:
      return list(option, data);
    case kOptStartTls:
      return start_tls(option, data);
    case kOptInfo:
    case kOptGo:
      return info_or_go(option, data);
    case kOptStructuredReply:
      if (!data.empty()) {
        step.reply = encode_option_error(option, kRepErrInvalid, "payload must be empty");
      } else if (structured_) {
        step.reply = encode_option_error(option, kRepErrInvalid, "already negotiated");
      } else {
        structured_ = true;
        step.reply = encode_option_reply(option, kRepAck);
      }
      return step;
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return meta_context(option, data);
    default:
      step.reply = encode_option_error(option, kRepErrUnsup, "option not supported");
      step.note = "unsupported option " + std::to_string(option);
      return step;
  }
}

Handshake::Step Handshake::list(uint32_t option, std::span<const uint8_t> data) {
  Step step;
  if (!data.empty()) {
    step.reply = encode_option_error(option, kRepErrInvalid, "payload must be empty");
    return step;
  }
  for (const ExportView* e : exports_.all()) {
    std::string why;
    if (refusal(*e, &why)) continue;  // hidden from this client
    Bytes payload;
    Writer(payload).u32(static_cast<uint32_t>(e->name.size())).bytes(e->name).bytes(e->description);
    auto r = encode_option_reply(option, kRepServer, payload);
    step.reply.insert(step.reply.end(), r.begin(), r.end());
  }
  auto ack = encode_option_reply(option, kRepAck);
  step.reply.insert(step.reply.end(), ack.begin(), ack.end());
  return step;
}

Handshake::Step Handshake::info_or_go(uint32_t option, std::span<const uint8_t> data) {
  Step step;
  auto req = decode_info_request(data);
  if (!req) {
    step.reply = encode_option_error(option, kRepErrInvalid, "malformed request");
    return step;
  }
  const ExportView* e = exports_.find(req->name);
  if (!e) {
    step.reply = encode_option_error(option, kRepErrUnknown, unknown_export_message(req->name));
    step.note = unknown_export_message(req->name);
    step.refusal = Refusal::kUnknownExport;
    return step;
  }
  if (uint32_t error = refusal(*e, &step.note)) {
    step.reply = encode_option_error(option, error, step.note);
    step.refused = true;
    step.refusal = refusal_kind(error);
    return step;
  }
  auto append = [&](const Bytes& b) { step.reply.insert(step.reply.end(), b.begin(), b.end()); };
  bool want_name = false, want_description = false;
  for (uint16_t r : req->requests) {
    want_name |= r == kInfoName;
    want_description |= r == kInfoDescription;
  }
  Bytes p;
  Writer(p).u16(kInfoExport).u64(e->size).u16(tx_flags(*e));
  append(encode_option_reply(option, kRepInfo, p));
  if (want_name) {
    p.clear();
    Writer(p).u16(kInfoName).bytes(e->name);
    append(encode_option_reply(option, kRepInfo, p));
  }
  if (want_description && !e->description.empty()) {
    p.clear();
    Writer(p).u16(kInfoDescription).bytes(e->description);
    append(encode_option_reply(option, kRepInfo, p));
  }
  p.clear();
  Writer(p).u16(kInfoBlockSize).u32(e->min_block).u32(e->pref_block).u32(e->max_block);
  append(encode_option_reply(option, kRepInfo, p));
  append(encode_option_reply(option, kRepAck));
  if (option == kOptGo) {
    keep_meta_contexts_only_for(e);
    step.action = Action::kTransmit;
    step.export_view = e;
  }
  return step;
}

Handshake::Step Handshake::meta_context(uint32_t option, std::span<const uint8_t> data) {
  Step step;
  const bool set = option == kOptSetMetaContext;
  // SET replaces the selected contexts even when it fails (doc/proto.md), so
  // a failed SET leaves none: block status then gets EINVAL.
  if (set) meta_ids_.clear();
  if (set && !structured_) {
    step.reply =
        encode_option_error(option, kRepErrInvalid, "structured replies must be negotiated first");
    return step;
  }
  auto req = decode_meta_context_request(data);
  if (!req) {
    step.reply = encode_option_error(option, kRepErrInvalid, "malformed request");
    return step;
  }
  const ExportView* e = exports_.find(req->export_name);
  if (!e) {
    step.reply =
        encode_option_error(option, kRepErrUnknown, unknown_export_message(req->export_name));
    step.refusal = Refusal::kUnknownExport;
    return step;
  }
  if (uint32_t error = refusal(*e, &step.note)) {
    step.reply = encode_option_error(option, error, step.note);
    step.refused = true;
    step.refusal = refusal_kind(error);
    return step;
  }
  std::vector<uint32_t> ids = matching_contexts(*e, req->queries, !set);
  for (uint32_t id : ids) {
    // LIST answers id 0 (as qemu-nbd does): only SET gives contexts ids.
    Bytes p;
    Writer(p).u32(set ? id : 0).bytes(meta_context_name(*e, id));
    auto r = encode_option_reply(option, kRepMetaContext, p);
    step.reply.insert(step.reply.end(), r.begin(), r.end());
  }
  auto ack = encode_option_reply(option, kRepAck);
  step.reply.insert(step.reply.end(), ack.begin(), ack.end());
  if (set) {
    meta_ids_ = std::move(ids);
    meta_export_ = req->export_name;
  }
  return step;
}

}  // namespace strata::nbd
