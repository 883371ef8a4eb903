// Byte-for-byte tests of the transmission rules (protocol/transmission.h):
// each case names the doc/proto.md rule it pins down.
#include <doctest/doctest.h>

#include <span>
#include <vector>

#include "formats/endian.h"
#include "protocol/transmission.h"

using namespace strata;
using namespace strata::nbd;

namespace {

constexpr uint64_t kSize = 1 << 20;
constexpr uint32_t kMax = 32 << 20;

Session writable(bool structured = true) {
  return Session{.size = kSize,
                 .tx_flags = static_cast<uint16_t>(kTxHasFlags | kTxSendFlush | kTxSendFua |
                                                   kTxSendTrim | kTxSendWriteZeroes),
                 .read_only = false,
                 .max_payload = kMax,
                 .structured = structured,
                 .base_allocation = structured,
                 .allocation_depth = false};
}

Request req(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  return Request{kRequestMagic, flags, type, 0x1122334455667788ull, offset, length};
}

// The 20-byte structured chunk header at `at`.
void check_chunk(const Bytes& b, size_t at, uint16_t flags, uint16_t type, uint32_t length) {
  REQUIRE(b.size() >= at + 20);
  CHECK(load_be32(b.data() + at) == kStructuredReplyMagic);
  CHECK(load_be16(b.data() + at + 4) == flags);
  CHECK(load_be16(b.data() + at + 6) == type);
  CHECK(load_be64(b.data() + at + 8) == 0x1122334455667788ull);
  CHECK(load_be32(b.data() + at + 16) == length);
}

}  // namespace

TEST_CASE("a request inside the export with known flags is valid") {
  const Session s = writable();
  CHECK(validate_request(req(kCmdRead, 0, 4096), s) == 0);
  CHECK(validate_request(req(kCmdRead, kSize - 1, 1), s) == 0);
  CHECK(validate_request(req(kCmdWrite, 0, 4096, kCmdFlagFua), s) == 0);
  CHECK(validate_request(req(kCmdWriteZeroes, 0, 4096, kCmdFlagNoHole), s) == 0);
  CHECK(validate_request(req(kCmdTrim, 0, 4096), s) == 0);
  CHECK(validate_request(req(kCmdFlush, 0, 0), s) == 0);
  CHECK(validate_request(req(kCmdBlockStatus, 0, 4096, kCmdFlagReqOne), s) == 0);
}

TEST_CASE("past the end: ENOSPC for writes of data, EINVAL for the rest") {
  const Session s = writable();
  CHECK(validate_request(req(kCmdWrite, kSize, 1), s) == kENOSPC);
  CHECK(validate_request(req(kCmdWriteZeroes, kSize - 1, 2), s) == kENOSPC);
  CHECK(validate_request(req(kCmdRead, kSize, 1), s) == kEINVAL);
  CHECK(validate_request(req(kCmdTrim, kSize - 1, 2), s) == kEINVAL);
  CHECK(validate_request(req(kCmdCache, ~0ull, 2), s) == kEINVAL);
  CHECK(validate_request(req(kCmdBlockStatus, kSize, 1), s) == kEINVAL);
}

TEST_CASE("flags a command does not take, and unknown flags, are EINVAL") {
  const Session s = writable();
  CHECK(validate_request(req(kCmdRead, 0, 1, 1 << 9), s) == kEINVAL);
  CHECK(validate_request(req(kCmdRead, 0, 1, kCmdFlagNoHole), s) == kEINVAL);
  CHECK(validate_request(req(kCmdWrite, 0, 1, kCmdFlagNoHole), s) == kEINVAL);
  CHECK(validate_request(req(kCmdTrim, 0, 1, kCmdFlagFastZero), s) == kEINVAL);
  CHECK(validate_request(req(kCmdFlush, 0, 0, kCmdFlagDf), s) == kEINVAL);
  CHECK(validate_request(req(kCmdBlockStatus, 0, 1, kCmdFlagDf), s) == kEINVAL);
  CHECK(validate_request(req(99, 0, 0), s) == kEINVAL);
}

TEST_CASE("DF needs structured replies and is for READ only") {
  CHECK(validate_request(req(kCmdRead, 0, 1, kCmdFlagDf), writable(true)) == 0);
  CHECK(validate_request(req(kCmdRead, 0, 1, kCmdFlagDf), writable(false)) == kEINVAL);
  CHECK(validate_request(req(kCmdCache, 0, 1, kCmdFlagDf), writable(true)) == kEINVAL);
}

TEST_CASE("payloads over the maximum are EINVAL; a read-only export refuses writes with EPERM") {
  Session s = writable();
  CHECK(validate_request(req(kCmdRead, 0, kMax + 1), s) == kEINVAL);
  CHECK(validate_request(req(kCmdWrite, 0, kMax + 1), s) == kEINVAL);
  s.read_only = true;
  CHECK(validate_request(req(kCmdWrite, 0, 1), s) == kEPERM);
  CHECK(validate_request(req(kCmdTrim, 0, 1), s) == kEPERM);
  CHECK(validate_request(req(kCmdWriteZeroes, 0, 1), s) == kEPERM);
  CHECK(validate_request(req(kCmdRead, 0, 1), s) == 0);
}

TEST_CASE("commands the export did not offer are EINVAL") {
  Session s = writable();
  s.tx_flags = kTxHasFlags;
  CHECK(validate_request(req(kCmdTrim, 0, 1), s) == kEINVAL);
  CHECK(validate_request(req(kCmdWriteZeroes, 0, 1), s) == kEINVAL);
  s = writable();
  CHECK(validate_request(req(kCmdWriteZeroes, 0, 1, kCmdFlagFastZero), s) == kEINVAL);
  s.tx_flags |= kTxSendFastZero;
  CHECK(validate_request(req(kCmdWriteZeroes, 0, 1, kCmdFlagFastZero), s) == 0);
}

TEST_CASE("block status needs a selected context and a length") {
  Session s = writable();
  CHECK(validate_request(req(kCmdBlockStatus, 0, 0), s) == kEINVAL);
  s.base_allocation = false;
  CHECK(validate_request(req(kCmdBlockStatus, 0, 1), s) == kEINVAL);
  s.allocation_depth = true;
  CHECK(validate_request(req(kCmdBlockStatus, 0, 1), s) == 0);
  s.allocation_depth = false;
  s.bitmaps = {{.id = kMetaIdDirtyBitmapBase, .name = "backup-0"}};
  CHECK(validate_request(req(kCmdBlockStatus, 0, 1), s) == 0);
}

TEST_CASE("the verdict: bad magic closes, DISC disconnects, stopping answers ESHUTDOWN") {
  const Session s = writable();
  Request bad = req(kCmdRead, 0, 1);
  bad.magic = 0x12345678;
  CHECK(judge_request(bad, s, false).next == Next::kClose);
  CHECK(judge_request(req(kCmdDisc, 0, 0), s, false).next == Next::kDisconnect);
  CHECK(judge_request(req(kCmdRead, 0, 1), s, false).next == Next::kExecute);
  Verdict v = judge_request(req(kCmdRead, 0, 1), s, true);
  CHECK(v.next == Next::kRefuse);
  CHECK(v.error == kESHUTDOWN);
  v = judge_request(req(kCmdWrite, kSize, 4096), s, false);
  CHECK(v.next == Next::kRefuse);
  CHECK(v.error == kENOSPC);
  // A refused payload longer than twice the maximum cannot be skipped.
  Request huge = req(kCmdWrite, 0, 0xffffffffu);
  v = judge_request(huge, s, false);
  CHECK(v.next == Next::kRefuseLast);
  CHECK(v.error == kEINVAL);
  CHECK(payload_length(huge) == 0xffffffffu);
  CHECK(payload_length(req(kCmdRead, 0, 4096)) == 0);
  CHECK(buffer_length(req(kCmdRead, 0, 4096)) == 4096);
  CHECK(buffer_length(req(kCmdTrim, 0, 4096)) == 0);
}

TEST_CASE("simple replies: 16 bytes, error and cookie") {
  const Session s = writable(false);
  Bytes b;
  append_error(b, 0x1122334455667788ull, s, kEPERM, "ignored");
  REQUIRE(b.size() == 16);
  CHECK(load_be32(b.data()) == kSimpleReplyMagic);
  CHECK(load_be32(b.data() + 4) == kEPERM);
  CHECK(load_be64(b.data() + 8) == 0x1122334455667788ull);
  append_ok(b, 1, s);
  REQUIRE(b.size() == 32);
  CHECK(load_be32(b.data() + 20) == 0);
}

TEST_CASE("structured replies: NONE for success, ERROR with its message") {
  const Session s = writable(true);
  Bytes b;
  append_ok(b, 0x1122334455667788ull, s);
  REQUIRE(b.size() == 20);
  check_chunk(b, 0, kReplyFlagDone, kChunkNone, 0);
  b.clear();
  append_error(b, 0x1122334455667788ull, s, kEIO, "bad");
  REQUIRE(b.size() == 20 + 6 + 3);
  check_chunk(b, 0, kReplyFlagDone, kChunkError, 9);
  CHECK(load_be32(b.data() + 20) == kEIO);
  CHECK(load_be16(b.data() + 24) == 3);
  CHECK(std::string(b.begin() + 26, b.end()) == "bad");
}

TEST_CASE("a failed structured read names the failing offset") {
  const Session s = writable(true);
  Bytes b;
  append_read_error(b, req(kCmdRead, 4096, 8192), s, kEIO, "x", 8192);
  REQUIRE(b.size() == 20 + 6 + 1 + 8);
  check_chunk(b, 0, kReplyFlagDone, kChunkErrorOffset, 15);
  CHECK(load_be64(b.data() + 27) == 8192);
  b.clear();
  append_read_error(b, req(kCmdRead, 4096, 8192), writable(false), kEIO, "x", 8192);
  CHECK(b.size() == 16);
}

TEST_CASE("a whole read: one OFFSET_DATA header, or NONE for 0 bytes") {
  const Session s = writable(true);
  Bytes b;
  append_read_reply(b, req(kCmdRead, 4096, 512), s);
  REQUIRE(b.size() == 28);
  check_chunk(b, 0, kReplyFlagDone, kChunkOffsetData, 8 + 512);
  CHECK(load_be64(b.data() + 20) == 4096);
  b.clear();
  append_read_reply(b, req(kCmdRead, 4096, 0), s);
  REQUIRE(b.size() == 20);
  check_chunk(b, 0, kReplyFlagDone, kChunkNone, 0);
}

TEST_CASE("sparse reads: only structured, without DF, from 64 KiB up") {
  CHECK(wants_sparse_read(req(kCmdRead, 0, kSparseReadThreshold), writable(true)));
  CHECK_FALSE(wants_sparse_read(req(kCmdRead, 0, kSparseReadThreshold - 1), writable(true)));
  CHECK_FALSE(wants_sparse_read(req(kCmdRead, 0, 1 << 20, kCmdFlagDf), writable(true)));
  CHECK_FALSE(wants_sparse_read(req(kCmdRead, 0, 1 << 20), writable(false)));
}

TEST_CASE("a sparse read plan merges runs of a kind and clips to the request") {
  const std::vector<Extent> ext = {{.length = 4096, .zero = false, .depth = 1},
                                   {.length = 4096, .zero = false, .depth = 2},
                                   {.length = 8192, .hole = true, .zero = true, .depth = 0},
                                   {.length = 1 << 20, .zero = false}};
  auto plan = plan_sparse_read(ext, 20480);
  REQUIRE(plan.size() == 3);
  CHECK(plan[0].pos == 0);
  CHECK(plan[0].length == 8192);
  CHECK_FALSE(plan[0].hole);
  CHECK(plan[1].pos == 8192);
  CHECK(plan[1].length == 8192);
  CHECK(plan[1].hole);
  CHECK(plan[2].pos == 16384);
  CHECK(plan[2].length == 4096);
  // No zeros, or extents short of the read: no plan, the read goes whole.
  CHECK(plan_sparse_read(std::span(ext).first(2), 8192).empty());
  CHECK(plan_sparse_read(std::span(ext).first(3), 20480).empty());

  Bytes b;
  const Request r = req(kCmdRead, 65536, 20480);
  append_read_chunk(b, r, plan[1], false);
  REQUIRE(b.size() == 32);
  check_chunk(b, 0, 0, kChunkOffsetHole, 12);
  CHECK(load_be64(b.data() + 20) == 65536 + 8192);
  CHECK(load_be32(b.data() + 28) == 8192);
  b.clear();
  append_read_chunk(b, r, plan[2], true);
  REQUIRE(b.size() == 28);
  check_chunk(b, 0, kReplyFlagDone, kChunkOffsetData, 8 + 4096);
  CHECK(load_be64(b.data() + 20) == 65536 + 16384);
}

TEST_CASE("block status: each context's flags, merged, clipped, REQ_ONE gives one") {
  const std::vector<Extent> ext = {{.length = 4096, .depth = 1},
                                   {.length = 4096, .depth = 2},
                                   {.length = 8192, .hole = true, .zero = true, .depth = 0}};
  auto d = describe_extents(ext, 12288, false, base_allocation_flags);
  REQUIRE(d.size() == 2);
  CHECK(d[0].length == 8192);
  CHECK(d[0].flags == 0);
  CHECK(d[1].length == 4096);
  CHECK(d[1].flags == (kStateHole | kStateZero));
  d = describe_extents(ext, 12288, false, allocation_depth);
  REQUIRE(d.size() == 3);
  CHECK(d[1].flags == 2);
  d = describe_extents(ext, 12288, true, allocation_depth);
  REQUIRE(d.size() == 1);
  CHECK(d[0].length == 4096);

  Session s = writable();
  s.allocation_depth = true;
  Bytes b;
  REQUIRE(append_block_status(b, req(kCmdBlockStatus, 0, 12288), s, ext, {}));
  // base:allocation: 2 descriptors, not done; then allocation-depth: 3, done.
  REQUIRE(b.size() == (20 + 4 + 2 * 8) + (20 + 4 + 3 * 8));
  check_chunk(b, 0, 0, kChunkBlockStatus, 4 + 16);
  CHECK(load_be32(b.data() + 20) == kMetaIdBaseAllocation);
  check_chunk(b, 40, kReplyFlagDone, kChunkBlockStatus, 4 + 24);
  CHECK(load_be32(b.data() + 60) == kMetaIdAllocationDepth);
  CHECK(load_be32(b.data() + 64 + 8 + 4) == 2);
}

namespace {

struct ParsedChunk {
  uint16_t flags;
  uint32_t id;
  std::vector<BlockStatusDescriptor> descriptors;
};

// Splits a block status reply into its chunks, checking each header.
std::vector<ParsedChunk> parse_block_status(const Bytes& b) {
  std::vector<ParsedChunk> chunks;
  size_t at = 0;
  while (at < b.size()) {
    REQUIRE(b.size() - at >= 24);
    const uint32_t length = load_be32(b.data() + at + 16);
    check_chunk(b, at, load_be16(b.data() + at + 4), kChunkBlockStatus, length);
    REQUIRE((length - 4) % 8 == 0);
    REQUIRE(b.size() - at - 20 >= length);
    ParsedChunk c{load_be16(b.data() + at + 4), load_be32(b.data() + at + 20), {}};
    for (size_t d = at + 24; d < at + 20 + length; d += 8) {
      c.descriptors.push_back({load_be32(b.data() + d), load_be32(b.data() + d + 4)});
    }
    chunks.push_back(std::move(c));
    at += 20 + length;
  }
  return chunks;
}

uint64_t covered(const ParsedChunk& c) {
  uint64_t n = 0;
  for (const auto& d : c.descriptors) n += d.length;
  return n;
}

Session with_bitmaps() {
  Session s = writable();
  s.allocation_depth = true;
  s.bitmaps = {{.id = 3, .name = "backup-0"}, {.id = 4, .name = "daily"}};
  return s;
}

const std::vector<Extent> kExtents = {{.length = 4096, .depth = 1},
                                      {.length = 4096, .depth = 2},
                                      {.length = 8192, .hole = true, .zero = true, .depth = 0}};
const std::vector<std::vector<DirtyRun>> kRuns = {
    {{.length = 4096, .dirty = true}, {.length = 4096, .dirty = true}, {.length = 8192}},
    {{.length = 1 << 20}}};

}  // namespace

TEST_CASE("block status with two bitmaps: a chunk per context in id order, DONE on the last") {
  const Session s = with_bitmaps();
  Bytes b;
  REQUIRE(append_block_status(b, req(kCmdBlockStatus, 0, 12288), s, kExtents, kRuns));
  // base:allocation 2 descriptors, allocation depth 3, backup-0 2, daily 1.
  REQUIRE(b.size() == (24 + 2 * 8) + (24 + 3 * 8) + (24 + 2 * 8) + (24 + 1 * 8));
  auto chunks = parse_block_status(b);
  REQUIRE(chunks.size() == 4);
  CHECK(chunks[0].id == kMetaIdBaseAllocation);
  CHECK(chunks[1].id == kMetaIdAllocationDepth);
  CHECK(chunks[2].id == 3);
  CHECK(chunks[3].id == 4);
  for (size_t i = 0; i < 4; ++i) {
    CHECK(chunks[i].flags == (i == 3 ? kReplyFlagDone : 0));
    CHECK(covered(chunks[i]) == 12288);
  }
  // Dirty runs merge; flag 1 is dirty, 0 clean; the last run is clipped.
  REQUIRE(chunks[2].descriptors.size() == 2);
  CHECK(chunks[2].descriptors[0].length == 8192);
  CHECK(chunks[2].descriptors[0].flags == kStateDirty);
  CHECK(chunks[2].descriptors[1].length == 4096);
  CHECK(chunks[2].descriptors[1].flags == 0);
  REQUIRE(chunks[3].descriptors.size() == 1);
  CHECK(chunks[3].descriptors[0].length == 12288);
  CHECK(chunks[3].descriptors[0].flags == 0);
  // The bitmap chunk's bytes: id 3, then (8192, dirty), (4096, clean).
  const size_t at = (24 + 2 * 8) + (24 + 3 * 8);
  CHECK(Bytes(b.begin() + at + 20, b.begin() + at + 40) ==
        Bytes{0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0});
}

TEST_CASE("block status with REQ_ONE: one descriptor per context") {
  const Session s = with_bitmaps();
  Bytes b;
  REQUIRE(
      append_block_status(b, req(kCmdBlockStatus, 0, 12288, kCmdFlagReqOne), s, kExtents, kRuns));
  auto chunks = parse_block_status(b);
  REQUIRE(chunks.size() == 4);
  const uint32_t lengths[] = {8192, 4096, 8192, 12288};
  const uint32_t flags[] = {0, 1, kStateDirty, 0};
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    REQUIRE(chunks[i].descriptors.size() == 1);
    CHECK(chunks[i].descriptors[0].length == lengths[i]);
    CHECK(chunks[i].descriptors[0].flags == flags[i]);
  }
  CHECK(chunks[3].flags == kReplyFlagDone);
}

TEST_CASE("block status never describes past the request, on any context") {
  const Session s = with_bitmaps();
  for (uint32_t length : {1u, 4095u, 4096u, 4097u, 12287u}) {
    CAPTURE(length);
    Bytes b;
    REQUIRE(append_block_status(b, req(kCmdBlockStatus, 0, length), s, kExtents, kRuns));
    auto chunks = parse_block_status(b);
    REQUIRE(chunks.size() == 4);
    for (const auto& c : chunks) {
      CHECK(covered(c) == length);
      for (const auto& d : c.descriptors) CHECK(d.length > 0);
    }
  }
}

TEST_CASE("block status: every context must make progress, or nothing is sent") {
  const Session s = with_bitmaps();
  const Request r = req(kCmdBlockStatus, 0, 4096);
  Bytes b;
  // Runs of 0 bytes are skipped; progress may come after them.
  std::vector<std::vector<DirtyRun>> runs = {{{.length = 0, .dirty = true}, {.length = 512}},
                                             {{.length = 4096, .dirty = true}}};
  REQUIRE(append_block_status(b, r, s, kExtents, runs));
  auto chunks = parse_block_status(b);
  REQUIRE(chunks.size() == 4);
  REQUIRE(chunks[2].descriptors.size() == 1);
  CHECK(chunks[2].descriptors[0].length == 512);
  CHECK(chunks[2].descriptors[0].flags == 0);
  // A bitmap whose runs cover nothing, extents that cover nothing, or runs
  // missing for a bitmap: false, and no byte appended.
  b.clear();
  runs[1] = {{.length = 0, .dirty = true}};
  CHECK_FALSE(append_block_status(b, r, s, kExtents, runs));
  runs[1].clear();
  CHECK_FALSE(append_block_status(b, r, s, kExtents, runs));
  CHECK_FALSE(append_block_status(b, r, s, {}, kRuns));
  CHECK_FALSE(append_block_status(b, r, s, kExtents, std::span(kRuns).first(1)));
  CHECK(b.empty());
}

TEST_CASE("block status of bitmaps alone: no extents needed, the one chunk is DONE") {
  Session s = writable();
  s.base_allocation = false;
  s.bitmaps = {{.id = 4, .name = "daily"}};
  CHECK_FALSE(s.wants_extents());
  CHECK(s.any_meta_context());
  CHECK(validate_request(req(kCmdBlockStatus, 0, 4096), s) == 0);
  Bytes b;
  REQUIRE(
      append_block_status(b, req(kCmdBlockStatus, 0, 4096), s, {}, std::span(kRuns).subspan(1)));
  auto chunks = parse_block_status(b);
  REQUIRE(chunks.size() == 1);
  CHECK(chunks[0].id == 4);
  CHECK(chunks[0].flags == kReplyFlagDone);
  CHECK(covered(chunks[0]) == 4096);
}
