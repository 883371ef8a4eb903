#include "protocol/nbd.h"

#include <cerrno>

#include "formats/endian.h"

namespace strata::nbd {

uint32_t errno_to_nbd(int e) {
  switch (e) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
    case EACCES:
      return kEPERM;
    case ENOMEM:
      return kENOMEM;
    case EINVAL:
      return kEINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kENOSPC;
    case EOVERFLOW:
      return kEOVERFLOW;
    case ENOTSUP:
      return kENOTSUP;
    case ESHUTDOWN:
      return kESHUTDOWN;
    default:
      return kEIO;
  }
}

uint32_t out_of_range_error(uint16_t command) {
  return command == kCmdWrite || command == kCmdWriteZeroes ? kENOSPC : kEINVAL;
}

Writer& Writer::u8(uint8_t v) {
  out_.push_back(v);
  return *this;
}
Writer& Writer::u16(uint16_t v) {
  size_t n = out_.size();
  out_.resize(n + 2);
  store_be16(out_.data() + n, v);
  return *this;
}
Writer& Writer::u32(uint32_t v) {
  size_t n = out_.size();
  out_.resize(n + 4);
  store_be32(out_.data() + n, v);
  return *this;
}
Writer& Writer::u64(uint64_t v) {
  size_t n = out_.size();
  out_.resize(n + 8);
  store_be64(out_.data() + n, v);
  return *this;
}
Writer& Writer::bytes(std::string_view s) {
  out_.insert(out_.end(), s.begin(), s.end());
  return *this;
}
Writer& Writer::bytes(std::span<const uint8_t> s) {
  out_.insert(out_.end(), s.begin(), s.end());
  return *this;
}
Writer& Writer::zeros(size_t n) {
  out_.insert(out_.end(), n, 0);
  return *this;
}

std::optional<uint16_t> Reader::u16() {
  if (remaining() < 2) return std::nullopt;
  uint16_t v = load_be16(in_.data() + pos_);
  pos_ += 2;
  return v;
}
std::optional<uint32_t> Reader::u32() {
  if (remaining() < 4) return std::nullopt;
  uint32_t v = load_be32(in_.data() + pos_);
  pos_ += 4;
  return v;
}
std::optional<uint64_t> Reader::u64() {
  if (remaining() < 8) return std::nullopt;
  uint64_t v = load_be64(in_.data() + pos_);
  pos_ += 8;
  return v;
}
std::optional<std::string> Reader::string(size_t len) {
  if (remaining() < len) return std::nullopt;
  std::string s(reinterpret_cast<const char*>(in_.data() + pos_), len);
  pos_ += len;
  return s;
}

Bytes encode_greeting(uint16_t handshake_flags) {
  Bytes out;
  Writer(out).u64(kInitMagic).u64(kOptMagic).u16(handshake_flags);
  return out;
}

OptionHeader decode_option_header(std::span<const uint8_t, kOptionHeaderSize> in) {
  return {load_be64(in.data()), load_be32(in.data() + 8), load_be32(in.data() + 12)};
}

Bytes encode_option_reply(uint32_t option, uint32_t type, std::span<const uint8_t> payload) {
  Bytes out;
  out.reserve(20 + payload.size());
  Writer(out).u64(kOptReplyMagic).u32(option).u32(type).u32(static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Bytes encode_option_error(uint32_t option, uint32_t type, std::string_view message) {
  if (message.size() > kMaxStringBytes) message = message.substr(0, kMaxStringBytes);
  return encode_option_reply(option, type,
                             {reinterpret_cast<const uint8_t*>(message.data()), message.size()});
}

std::optional<InfoRequest> decode_info_request(std::span<const uint8_t> payload) {
  Reader r(payload);
  InfoRequest req;
  auto name_len = r.u32();
  if (!name_len) return std::nullopt;
  auto name = r.string(*name_len);
  if (!name) return std::nullopt;
  req.name = std::move(*name);
  auto count = r.u16();
  if (!count) return std::nullopt;
  if (r.remaining() != size_t{*count} * 2) return std::nullopt;
  for (uint16_t i = 0; i < *count; ++i) req.requests.push_back(*r.u16());
  return req;
}

std::optional<MetaContextRequest> decode_meta_context_request(std::span<const uint8_t> payload) {
  Reader r(payload);
  MetaContextRequest req;
  auto name_len = r.u32();
  if (!name_len) return std::nullopt;
  auto name = r.string(*name_len);
  if (!name) return std::nullopt;
  req.export_name = std::move(*name);
  auto count = r.u32();
  if (!count) return std::nullopt;
  for (uint32_t i = 0; i < *count; ++i) {
    auto len = r.u32();
    if (!len) return std::nullopt;
    auto q = r.string(*len);
    if (!q) return std::nullopt;
    req.queries.push_back(std::move(*q));
  }
  if (r.remaining() != 0) return std::nullopt;
  return req;
}

Bytes encode_export_name_reply(uint64_t size, uint16_t tx_flags, bool no_zeroes) {
  Bytes out;
  Writer w(out);
  w.u64(size).u16(tx_flags);
  if (!no_zeroes) w.zeros(124);
  return out;
}

Request decode_request(std::span<const uint8_t, kRequestSize> in) {
  const uint8_t* p = in.data();
  return {load_be32(p),     load_be16(p + 4),  load_be16(p + 6),
          load_be64(p + 8), load_be64(p + 16), load_be32(p + 24)};
}

void encode_request(const Request& r, uint8_t* p) {
  store_be32(p, r.magic);
  store_be16(p + 4, r.flags);
  store_be16(p + 6, r.type);
  store_be64(p + 8, r.cookie);
  store_be64(p + 16, r.offset);
  store_be32(p + 24, r.length);
}

void encode_simple_reply(uint8_t* out, uint32_t error, uint64_t cookie) {
  store_be32(out, kSimpleReplyMagic);
  store_be32(out + 4, error);
  store_be64(out + 8, cookie);
}

void encode_chunk_header(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                         uint32_t length) {
  store_be32(out, kStructuredReplyMagic);
  store_be16(out + 4, flags);
  store_be16(out + 6, type);
  store_be64(out + 8, cookie);
  store_be32(out + 16, length);
}

namespace {
void append_header(Bytes& out, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
  size_t n = out.size();
  out.resize(n + kStructuredReplySize);
  encode_chunk_header(out.data() + n, flags, type, cookie, length);
}
uint16_t done_flag(bool done) { return done ? kReplyFlagDone : 0; }
}  // namespace

void append_chunk_error(Bytes& out, uint64_t cookie, uint32_t error, std::string_view message,
                        bool done) {
  if (message.size() > kMaxStringBytes) message = message.substr(0, kMaxStringBytes);
  append_header(out, done_flag(done), kChunkError, cookie,
                static_cast<uint32_t>(6 + message.size()));
  Writer(out).u32(error).u16(static_cast<uint16_t>(message.size())).bytes(message);
}

void append_chunk_error_offset(Bytes& out, uint64_t cookie, uint32_t error,
                               std::string_view message, uint64_t offset) {
  if (message.size() > kMaxStringBytes) message = message.substr(0, kMaxStringBytes);
  append_header(out, kReplyFlagDone, kChunkErrorOffset, cookie,
                static_cast<uint32_t>(14 + message.size()));
  Writer(out).u32(error).u16(static_cast<uint16_t>(message.size())).bytes(message).u64(offset);
}

void append_chunk_hole(Bytes& out, uint64_t cookie, uint64_t offset, uint32_t length, bool done) {
  append_header(out, done_flag(done), kChunkOffsetHole, cookie, 12);
  Writer(out).u64(offset).u32(length);
}

void append_chunk_data_header(Bytes& out, uint64_t cookie, uint64_t offset, uint32_t data_length,
                              bool done) {
  append_header(out, done_flag(done), kChunkOffsetData, cookie, 8 + data_length);
  Writer(out).u64(offset);
}

void append_chunk_none(Bytes& out, uint64_t cookie) {
  append_header(out, kReplyFlagDone, kChunkNone, cookie, 0);
}

void append_chunk_block_status(Bytes& out, uint64_t cookie, uint32_t context_id,
                               std::span<const BlockStatusDescriptor> descriptors, bool done) {
  append_header(out, done_flag(done), kChunkBlockStatus, cookie,
                static_cast<uint32_t>(4 + 8 * descriptors.size()));
  Writer w(out);
  w.u32(context_id);
  for (const auto& d : descriptors) w.u32(d.length).u32(d.flags);
}

}  // namespace strata::nbd
