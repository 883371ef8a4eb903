// The newstyle handshake as pure logic: the server feeds it the client's
// flags and each option; it returns the bytes to send and what to do next.
// No sockets here, so every branch is unit-tested byte for byte.
//
// The server always offers fixed newstyle. A client that does not take it up
// (NBD_FLAG_C_FIXED_NEWSTYLE is only a SHOULD) speaks plain newstyle: its one
// option is NBD_OPT_EXPORT_NAME, and any other option closes the connection,
// since plain newstyle has no option replies to refuse it with.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/nbd.h"

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
};

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

  enum class Action { kContinue, kTransmit, kClose };
  struct Step {
    Bytes reply;
    Action action = Action::kContinue;
    const ExportView* export_view = nullptr;  // set with kTransmit
    std::string note;                         // for logs
  };

  explicit Handshake(const ExportCatalog& exports) : exports_(exports) {}

  Bytes greeting() const { return encode_greeting(kFlagFixedNewstyle | kFlagNoZeroes); }
  // False: the client sent unknown flags; close.
  bool accept_client_flags(uint32_t flags, std::string* why);
  Step on_option(uint32_t option, std::span<const uint8_t> data);
  // An option whose payload is over kMaxOptionLength. kContinue means: read
  // and drop the `length` payload bytes, then send the reply (ERR_UNSUP for
  // an unknown option, ERR_TOO_BIG for a known one). kClose when no reply is
  // possible (EXPORT_NAME, plain newstyle) or the payload is over
  // kMaxSkippedOptionLength.
  Step on_oversized_option(uint32_t option, uint32_t length) const;

  bool structured_replies() const { return structured_; }
  bool meta_base_allocation() const { return meta_base_allocation_; }
  bool meta_allocation_depth() const { return meta_allocation_depth_; }
  // Transmission flags as sent for `e` on this connection.
  uint16_t tx_flags(const ExportView& e) const;

 private:
  Step info_or_go(uint32_t option, std::span<const uint8_t> data);
  Step list(uint32_t option, std::span<const uint8_t> data);
  Step meta_context(uint32_t option, std::span<const uint8_t> data);
  static bool known_option(uint32_t option);

  const ExportCatalog& exports_;
  bool fixed_newstyle_ = true;  // until the client's flags say otherwise
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool meta_base_allocation_ = false;
  bool meta_allocation_depth_ = false;
  std::string meta_export_;
};

}  // namespace strata::nbd
