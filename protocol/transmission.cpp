#include "protocol/transmission.h"

#include <algorithm>

namespace strata::nbd {

namespace {

// A 16-byte simple reply appended to out.
void append_simple_reply(Bytes& out, uint32_t error, uint64_t cookie) {
  const size_t at = out.size();
  out.resize(at + kSimpleReplySize);
  encode_simple_reply(out.data() + at, error, cookie);
}

bool in_range(const Request& r, const Session& s) {
  return r.offset <= s.size && r.length <= s.size - r.offset;
}

// READ and CACHE: no write flags; DF only on a structured READ.
uint32_t validate_read(const Request& r, const Session& s) {
  if (r.flags & (kCmdFlagNoHole | kCmdFlagReqOne | kCmdFlagFastZero)) return kEINVAL;
  if ((r.flags & kCmdFlagDf) && (r.type != kCmdRead || !s.structured)) return kEINVAL;
  if (r.type == kCmdRead && r.length > s.max_payload) return kEINVAL;
  return in_range(r, s) ? 0 : out_of_range_error(r.type);
}

// WRITE, TRIM and WRITE_ZEROES: each only with the flags and on the exports
// that offer it.
uint32_t validate_write(const Request& r, const Session& s) {
  uint16_t allowed = kCmdFlagFua;
  if (r.type == kCmdWriteZeroes) allowed |= kCmdFlagNoHole | kCmdFlagFastZero;
  if (r.flags & ~allowed) return kEINVAL;
  if (r.type == kCmdWrite && r.length > s.max_payload) return kEINVAL;
  if (s.read_only) return kEPERM;
  if (r.type == kCmdTrim && !(s.tx_flags & kTxSendTrim)) return kEINVAL;
  if (r.type == kCmdWriteZeroes && !(s.tx_flags & kTxSendWriteZeroes)) return kEINVAL;
  if ((r.flags & kCmdFlagFastZero) && !(s.tx_flags & kTxSendFastZero)) return kEINVAL;
  return in_range(r, s) ? 0 : out_of_range_error(r.type);
}

// BLOCK_STATUS: only after a meta context was selected, never of 0 bytes.
uint32_t validate_block_status(const Request& r, const Session& s) {
  if (r.flags & ~(kCmdFlagReqOne | kCmdFlagFua)) return kEINVAL;
  if (!s.any_meta_context()) return kEINVAL;
  if (r.length == 0) return kEINVAL;
  return in_range(r, s) ? 0 : out_of_range_error(r.type);
}

}  // namespace

uint32_t validate_request(const Request& r, const Session& s) {
  constexpr uint16_t kKnownFlags =
      kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
  if (r.flags & ~kKnownFlags) return kEINVAL;
  switch (r.type) {
    case kCmdRead:
    case kCmdCache:
      return validate_read(r, s);
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes:
      return validate_write(r, s);
    case kCmdFlush:
      return (r.flags & ~kCmdFlagFua) ? kEINVAL : 0;
    case kCmdBlockStatus:
      return validate_block_status(r, s);
    default:
      return kEINVAL;
  }
}

Verdict judge_request(const Request& r, const Session& s, bool stopping) {
  if (r.magic != kRequestMagic) return {Next::kClose};
  if (r.type == kCmdDisc) return {Next::kDisconnect};
  const uint32_t error = stopping ? kESHUTDOWN : validate_request(r, s);
  if (!error) return {Next::kExecute};
  if (payload_length(r) > max_skipped_payload(s)) return {Next::kRefuseLast, error};
  return {Next::kRefuse, error};
}

bool wants_sparse_read(const Request& r, const Session& s) {
  return s.structured && !(r.flags & kCmdFlagDf) && r.length >= kSparseReadThreshold;
}

std::vector<ReadChunk> plan_sparse_read(std::span<const Extent> extents, uint32_t length) {
  std::vector<ReadChunk> chunks;
  bool any_hole = false;
  uint64_t pos = 0;
  for (const Extent& x : extents) {
    if (pos >= length) break;
    const auto len = static_cast<uint32_t>(std::min<uint64_t>(x.length, length - pos));
    if (len == 0) continue;
    any_hole |= x.zero;
    if (!chunks.empty() && chunks.back().hole == x.zero) {
      chunks.back().length += len;
    } else {
      chunks.push_back({static_cast<uint32_t>(pos), len, x.zero});
    }
    pos += len;
  }
  if (!any_hole || pos != length) chunks.clear();
  return chunks;
}

void append_read_chunk(Bytes& out, const Request& r, const ReadChunk& c, bool last) {
  if (c.hole) {
    append_chunk_hole(out, r.cookie, r.offset + c.pos, c.length, last);
  } else {
    append_chunk_data_header(out, r.cookie, r.offset + c.pos, c.length, last);
  }
}

void append_read_reply(Bytes& out, const Request& r, const Session& s) {
  if (!s.structured) {
    append_ok(out, r.cookie, s);
  } else if (r.length == 0) {
    append_chunk_none(out, r.cookie);  // a data chunk may not be empty
  } else {
    append_chunk_data_header(out, r.cookie, r.offset, r.length, true);
  }
}

void append_read_error(Bytes& out, const Request& r, const Session& s, uint32_t error,
                       std::string_view message, uint64_t offset) {
  if (s.structured) {
    append_chunk_error_offset(out, r.cookie, error, message, offset);
  } else {
    append_error(out, r.cookie, s, error);
  }
}

void append_ok(Bytes& out, uint64_t cookie, const Session& s) {
  if (s.structured) {
    append_chunk_none(out, cookie);
    return;
  }
  append_simple_reply(out, 0, cookie);
}

void append_error(Bytes& out, uint64_t cookie, const Session& s, uint32_t error,
                  std::string_view message) {
  if (s.structured) {
    append_chunk_error(out, cookie, error, message);
    return;
  }
  append_simple_reply(out, error, cookie);
}

namespace {

// The descriptors of one context from runs of any kind (Extent, DirtyRun).
template <class Run, class FlagsOf>
std::vector<BlockStatusDescriptor> describe(std::span<const Run> runs, uint32_t length,
                                            bool req_one, FlagsOf flags_of) {
  std::vector<BlockStatusDescriptor> d;
  uint64_t pos = 0;
  for (const Run& x : runs) {
    if (pos >= length) break;
    const auto len = static_cast<uint32_t>(std::min<uint64_t>(x.length, length - pos));
    if (len == 0) continue;  // a descriptor of 0 bytes is not allowed
    const uint32_t flags = flags_of(x);
    if (!d.empty() && d.back().flags == flags) {
      d.back().length += len;
    } else {
      if (req_one && !d.empty()) break;
      d.push_back({len, flags});
    }
    pos += len;
  }
  return d;
}

uint32_t dirty_flags(const DirtyRun& run) { return run.dirty ? kStateDirty : 0u; }

}  // namespace

std::vector<BlockStatusDescriptor> describe_extents(std::span<const Extent> extents,
                                                    uint32_t length, bool req_one,
                                                    ContextFlags flags_of) {
  return describe(extents, length, req_one, flags_of);
}

std::vector<BlockStatusDescriptor> describe_dirty_runs(std::span<const DirtyRun> runs,
                                                       uint32_t length, bool req_one) {
  return describe(runs, length, req_one, dirty_flags);
}

uint32_t base_allocation_flags(const Extent& e) {
  return (e.hole ? kStateHole : 0u) | (e.zero ? kStateZero : 0u);
}

uint32_t allocation_depth(const Extent& e) { return e.depth; }

bool append_block_status(Bytes& out, const Request& r, const Session& s,
                         std::span<const Extent> extents,
                         std::span<const std::vector<DirtyRun>> bitmap_runs) {
  if (bitmap_runs.size() != s.bitmaps.size() || !s.any_meta_context()) return false;
  const bool req_one = r.flags & kCmdFlagReqOne;
  struct Chunk {
    uint32_t id;
    std::vector<BlockStatusDescriptor> descriptors;
  };
  std::vector<Chunk> chunks;
  chunks.reserve(2 + s.bitmaps.size());
  if (s.base_allocation) {
    chunks.push_back({kMetaIdBaseAllocation,
                      describe_extents(extents, r.length, req_one, base_allocation_flags)});
  }
  if (s.allocation_depth) {
    chunks.push_back(
        {kMetaIdAllocationDepth, describe_extents(extents, r.length, req_one, allocation_depth)});
  }
  for (size_t i = 0; i < s.bitmaps.size(); ++i) {
    chunks.push_back({s.bitmaps[i].id, describe_dirty_runs(bitmap_runs[i], r.length, req_one)});
  }
  for (const Chunk& c : chunks) {
    if (c.descriptors.empty()) return false;
  }
  for (size_t i = 0; i < chunks.size(); ++i) {
    append_chunk_block_status(out, r.cookie, chunks[i].id, chunks[i].descriptors,
                              i + 1 == chunks.size());
  }
  return true;
}

}  // namespace strata::nbd
