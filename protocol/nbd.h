// NBD wire format: constants, big-endian encoders and decoders for the
// fixed-newstyle handshake and the transmission phase. Pure code: no sockets,
// no threads, no files. Numbers follow the NBD protocol document (doc/proto.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace strata::nbd {

using Bytes = std::vector<uint8_t>;

// Handshake magics.
inline constexpr uint64_t kInitMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
inline constexpr uint64_t kOptMagic = 0x49484156454F5054ull;   // "IHAVEOPT"
inline constexpr uint64_t kOldstyleMagic = 0x00420281861253ull;
// Every string the protocol carries (names, descriptions, messages) is at most
// this long (doc/proto.md).
inline constexpr size_t kMaxStringBytes = 4096;
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;

// Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;
inline constexpr uint32_t kClientFixedNewstyle = 1 << 0;
inline constexpr uint32_t kClientNoZeroes = 1 << 1;

// Options.
enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

// Option reply types.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrUnsup = 0x80000001;
inline constexpr uint32_t kRepErrPolicy = 0x80000002;
inline constexpr uint32_t kRepErrInvalid = 0x80000003;
inline constexpr uint32_t kRepErrPlatform = 0x80000004;
inline constexpr uint32_t kRepErrTlsReqd = 0x80000005;
inline constexpr uint32_t kRepErrUnknown = 0x80000006;
inline constexpr uint32_t kRepErrShutdown = 0x80000007;
inline constexpr uint32_t kRepErrBlockSizeReqd = 0x80000008;
inline constexpr uint32_t kRepErrTooBig = 0x80000009;

// NBD_INFO_* types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kTxHasFlags = 1 << 0;
inline constexpr uint16_t kTxReadOnly = 1 << 1;
inline constexpr uint16_t kTxSendFlush = 1 << 2;
inline constexpr uint16_t kTxSendFua = 1 << 3;
inline constexpr uint16_t kTxRotational = 1 << 4;
inline constexpr uint16_t kTxSendTrim = 1 << 5;
inline constexpr uint16_t kTxSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kTxSendDf = 1 << 7;
inline constexpr uint16_t kTxCanMultiConn = 1 << 8;
inline constexpr uint16_t kTxSendResize = 1 << 9;
inline constexpr uint16_t kTxSendCache = 1 << 10;
inline constexpr uint16_t kTxSendFastZero = 1 << 11;

// Transmission.
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr size_t kRequestSize = 28;
inline constexpr size_t kSimpleReplySize = 16;
inline constexpr size_t kStructuredReplySize = 20;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};

inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured reply chunk types and flags.
inline constexpr uint16_t kReplyFlagDone = 1 << 0;
inline constexpr uint16_t kChunkNone = 0;
inline constexpr uint16_t kChunkOffsetData = 1;
inline constexpr uint16_t kChunkOffsetHole = 2;
inline constexpr uint16_t kChunkBlockStatus = 5;
inline constexpr uint16_t kChunkError = 0x8001;
inline constexpr uint16_t kChunkErrorOffset = 0x8002;

// base:allocation descriptor flags.
inline constexpr uint32_t kStateHole = 1 << 0;
inline constexpr uint32_t kStateZero = 1 << 1;

// Error values on the wire.
inline constexpr uint32_t kEPERM = 1;
inline constexpr uint32_t kEIO = 5;
inline constexpr uint32_t kENOMEM = 12;
inline constexpr uint32_t kEINVAL = 22;
inline constexpr uint32_t kENOSPC = 28;
inline constexpr uint32_t kEOVERFLOW = 75;
inline constexpr uint32_t kENOTSUP = 95;
inline constexpr uint32_t kESHUTDOWN = 108;

// Maps a host errno value to the NBD error set (anything unknown is EIO).
uint32_t errno_to_nbd(int host_errno);

// The error for a request that reaches past the end of the export: ENOSPC for
// the commands that write data (WRITE, WRITE_ZEROES), EINVAL for the others
// (READ, TRIM, CACHE, BLOCK_STATUS), as doc/proto.md "Error values" asks.
uint32_t out_of_range_error(uint16_t command);

// Meta contexts this server knows; the ids are fixed. Dirty bitmap i of an
// export (ExportView::bitmaps[i]) is the context kMetaDirtyBitmapPrefix + its
// name, with id kMetaIdDirtyBitmapBase + i: ids grow in the order the reply
// chunks of a block status go out.
inline constexpr std::string_view kMetaBaseAllocation = "base:allocation";
inline constexpr std::string_view kMetaAllocationDepth = "qemu:allocation-depth";
inline constexpr std::string_view kMetaDirtyBitmapPrefix = "qemu:dirty-bitmap:";
inline constexpr uint32_t kMetaIdBaseAllocation = 1;
inline constexpr uint32_t kMetaIdAllocationDepth = 2;
inline constexpr uint32_t kMetaIdDirtyBitmapBase = 3;

// qemu:dirty-bitmap descriptor flags.
inline constexpr uint32_t kStateDirty = 1 << 0;

// ---- Byte writer / reader --------------------------------------------------

class Writer {
 public:
  explicit Writer(Bytes& out) : out_(out) {}
  Writer& u8(uint8_t v);
  Writer& u16(uint16_t v);
  Writer& u32(uint32_t v);
  Writer& u64(uint64_t v);
  Writer& bytes(std::string_view s);
  Writer& bytes(std::span<const uint8_t> s);
  Writer& zeros(size_t n);

 private:
  Bytes& out_;
};

// Bounds-checked big-endian reader; every getter returns nullopt when the
// input is too short.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  std::optional<uint16_t> u16();
  std::optional<uint32_t> u32();
  std::optional<uint64_t> u64();
  std::optional<std::string> string(size_t len);
  size_t remaining() const { return in_.size() - pos_; }

 private:
  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

// ---- Handshake --------------------------------------------------------------

// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
Bytes encode_greeting(uint16_t handshake_flags);

struct OptionHeader {
  uint64_t magic;
  uint32_t option;
  uint32_t length;
};
inline constexpr size_t kOptionHeaderSize = 16;
OptionHeader decode_option_header(std::span<const uint8_t, kOptionHeaderSize> in);

// One option reply (magic, option, type, length, payload).
Bytes encode_option_reply(uint32_t option, uint32_t type, std::span<const uint8_t> payload = {});
// An error reply with a human-readable message as payload.
Bytes encode_option_error(uint32_t option, uint32_t type, std::string_view message);

// NBD_OPT_INFO / NBD_OPT_GO request payload.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> requests;
};
std::optional<InfoRequest> decode_info_request(std::span<const uint8_t> payload);

// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT request payload.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
std::optional<MetaContextRequest> decode_meta_context_request(std::span<const uint8_t> payload);

// Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zero bytes
// unless the client set NO_ZEROES.
Bytes encode_export_name_reply(uint64_t size, uint16_t tx_flags, bool no_zeroes);

// ---- Transmission -----------------------------------------------------------

struct Request {
  uint32_t magic;
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
};
Request decode_request(std::span<const uint8_t, kRequestSize> in);
void encode_request(const Request& r, uint8_t* out);  // 28 bytes, for tests and tools

// Simple reply header (16 bytes) into out.
void encode_simple_reply(uint8_t* out, uint32_t error, uint64_t cookie);
// Structured reply chunk header (20 bytes) into out.
void encode_chunk_header(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                         uint32_t length);

// Whole structured chunks appended to out.
void append_chunk_error(Bytes& out, uint64_t cookie, uint32_t error, std::string_view message,
                        bool done = true);
// ERROR_OFFSET: the error applies to the byte at `offset` of a read.
void append_chunk_error_offset(Bytes& out, uint64_t cookie, uint32_t error,
                               std::string_view message, uint64_t offset);
void append_chunk_hole(Bytes& out, uint64_t cookie, uint64_t offset, uint32_t length, bool done);
// OFFSET_DATA header (20 + 8 bytes); the data follows separately.
void append_chunk_data_header(Bytes& out, uint64_t cookie, uint64_t offset, uint32_t data_length,
                              bool done);
void append_chunk_none(Bytes& out, uint64_t cookie);

struct BlockStatusDescriptor {
  uint32_t length;
  uint32_t flags;
};
void append_chunk_block_status(Bytes& out, uint64_t cookie, uint32_t context_id,
                               std::span<const BlockStatusDescriptor> descriptors, bool done);

}  // namespace strata::nbd
