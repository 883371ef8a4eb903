// The newstyle handshake as pure logic: the server feeds it the client's
// flags and each option; it returns the bytes to send and what to do next.
// No sockets here, so every branch is unit-tested byte for byte.
//
// The server always offers fixed newstyle. A client that does not take it up
// (NBD_FLAG_C_FIXED_NEWSTYLE is only a SHOULD) speaks plain newstyle: its one
// option is NBD_OPT_EXPORT_NAME, and any other option closes the connection,
// since plain newstyle has no option replies to refuse it with.
//
// TLS (doc/proto.md, "TLS support"): the listener's policy is off, optional
// (SELECTIVETLS: exports marked tls_required refuse plain clients with
// ERR_TLS_REQD and are left out of LIST) or required (FORCEDTLS: before
// STARTTLS every option but STARTTLS and ABORT gets ERR_TLS_REQD, and
// EXPORT_NAME closes). STARTTLS answers ACK and Action::kStartTls; the server
// then throws away every byte it holds from the client, runs the TLS
// handshake and calls tls_established(). What was negotiated in plain text
// (structured replies, meta contexts) is forgotten then, so nothing a
// man in the middle injected before TLS survives it.
//
// Authorization: an export with an allow list is only for clients whose TLS
// identity (X.509 subject DN or PSK username) matches one of its entries
// (exact, or an fnmatch(3) glob); others get ERR_POLICY and do not see it in
// LIST.
//
// Meta contexts (doc/proto.md, "Metadata querying"): base:allocation,
// qemu:allocation-depth and qemu:dirty-bitmap:NAME for each of the export's
// bitmaps, with the ids of nbd.h. LIST answers exact names and, as qemu-nbd
// does, the queries "base:", "qemu:" (allocation depth and every bitmap) and
// "qemu:dirty-bitmap:" (every bitmap); no query at all lists every context.
// SET selects exact names only and replaces the selection even when it fails.
// A selection is for the export it named: GO or EXPORT_NAME to another export
// forgets it, so a bitmap id never reaches an export it was not given by.
//
// Bounds: a connection may send kMaxOptions options with kMaxOptionBytes of
// payload in all before it is closed, so a client cannot keep a handshake
// going (and the server busy) for ever.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/nbd.h"
#include "protocol/transmission.h"

namespace strata::nbd {

// What the handshake needs to know about one export.
struct ExportView {
  std::string name;
  std::string description;
  uint64_t size = 0;
  // Transmission flags without SEND_DF (added when structured replies are on).
  uint16_t tx_flags = kTxHasFlags;
  uint32_t min_block = 1;
  uint32_t pref_block = 4096;
  uint32_t max_block = 32 * 1024 * 1024;
  // Only for clients that started TLS (under TlsPolicy::kOptional; under
  // kRequired every client has).
  bool tls_required = false;
  // Identities allowed to see and use the export; empty: everyone.
  std::vector<std::string> allow;
  // Persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME; bitmaps[i]
  // has the context id kMetaIdDirtyBitmapBase + i. Names are unique.
  std::vector<std::string> bitmaps;
};

// The name of meta context `id` of `e`; empty when `e` has no such context.
std::string meta_context_name(const ExportView& e, uint32_t id);

enum class TlsPolicy { kOff, kOptional, kRequired };

class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // Looks an export up by name; "" names the default export.
  virtual const ExportView* find(std::string_view name) const = 0;
  virtual std::vector<const ExportView*> all() const = 0;
};

class Handshake {
 public:
  // Options up to this length are read and handled; longer ones go to
  // on_oversized_option, which never needs their payload.
  static constexpr uint32_t kMaxOptionLength = 64 * 1024;
  // Longer option payloads than this are not even skipped: the connection is
  // closed (the limit qemu-nbd applies, NBD_MAX_BUFFER_SIZE).
  static constexpr uint32_t kMaxSkippedOptionLength = 32 * 1024 * 1024;
  // Per connection: more options, or more payload bytes in all, close it.
  // nbdinfo --list asks about three options per export; this leaves room for
  // a thousand exports.
  static constexpr uint32_t kMaxOptions = 4096;
  static constexpr uint64_t kMaxOptionBytes = uint64_t{64} * 1024 * 1024;

  // kStartTls: send the reply, drop every buffered client byte, run the TLS
  // handshake, then call tls_established() (or close if it fails).
  enum class Action { kContinue, kTransmit, kStartTls, kClose };
  // Why an option was refused, for the server's counters.
  enum class Refusal : uint8_t { kNone, kTlsRequired, kPolicy, kUnknownExport };
  struct Step {
    Bytes reply;
    Action action = Action::kContinue;
    const ExportView* export_view = nullptr;  // set with kTransmit
    std::string note;                         // for logs
    bool refused = false;  // an export was refused by TLS or authorization policy
    Refusal refusal = Refusal::kNone;
  };

  explicit Handshake(const ExportCatalog& exports, TlsPolicy tls = TlsPolicy::kOff)
      : exports_(exports), tls_policy_(tls) {}

  Bytes greeting() const { return encode_greeting(kFlagFixedNewstyle | kFlagNoZeroes); }
  // False: the client sent unknown flags; close.
  bool accept_client_flags(uint32_t flags, std::string* why);
  Step on_option(uint32_t option, std::span<const uint8_t> data);
  // An option whose payload is over kMaxOptionLength. kContinue means: read
  // and drop the `length` payload bytes, then send the reply (ERR_UNSUP for
  // an unknown option, ERR_TOO_BIG for a known one). kClose when no reply is
  // possible (EXPORT_NAME, plain newstyle) or the payload is over
  // kMaxSkippedOptionLength.
  Step on_oversized_option(uint32_t option, uint32_t length);
  // TLS is up after kStartTls; `identity` is the client's verified X.509
  // subject DN or PSK username, "" when it has none.
  void tls_established(std::string identity);
  bool tls() const { return tls_; }
  const std::string& identity() const { return identity_; }

  bool structured_replies() const { return structured_; }
  // The contexts the last SET_META_CONTEXT selected, as ids in ascending
  // order; none after a failed SET, after STARTTLS, or once GO or EXPORT_NAME
  // entered an export they were not selected for.
  const std::vector<uint32_t>& meta_contexts() const { return meta_ids_; }
  bool meta_selected(uint32_t id) const;
  // Sets the meta context fields of `s` (base_allocation, allocation_depth,
  // bitmaps) to the selection, for the export `e` entered with kTransmit.
  void fill_meta_contexts(const ExportView& e, Session& s) const;
  // Transmission flags as sent for `e` on this connection.
  uint16_t tx_flags(const ExportView& e) const;

 private:
  Step info_or_go(uint32_t option, std::span<const uint8_t> data);
  Step list(uint32_t option, std::span<const uint8_t> data);
  Step meta_context(uint32_t option, std::span<const uint8_t> data);
  Step start_tls(uint32_t option, std::span<const uint8_t> data);
  // Entering `e`: a selection made for another export is dropped.
  void keep_meta_contexts_only_for(const ExportView* e);
  // A close when this option takes the connection past kMaxOptions or
  // kMaxOptionBytes.
  bool over_limits(uint64_t payload_bytes, Step& step);
  // Before STARTTLS under kRequired: the refusal every option but STARTTLS
  // and ABORT gets.
  bool tls_needed_first(uint32_t option, Step& step) const;
  // Why `e` is not for this client: 0 (it is), kRepErrTlsReqd or
  // kRepErrPolicy, with a message for the client and the log.
  uint32_t refusal(const ExportView& e, std::string* why) const;
  // The Refusal of an option error refusal() returned.
  static Refusal refusal_kind(uint32_t error);
  static bool known_option(uint32_t option);

  const ExportCatalog& exports_;
  const TlsPolicy tls_policy_;
  bool tls_ = false;
  std::string identity_;
  uint32_t options_seen_ = 0;
  uint64_t option_bytes_ = 0;
  bool fixed_newstyle_ = true;  // until the client's flags say otherwise
  bool no_zeroes_ = false;
  bool structured_ = false;
  std::vector<uint32_t> meta_ids_;  // ascending
  std::string meta_export_;         // the name the selection was made with
};

}  // namespace strata::nbd
