// The rule for when a connection thread keeps the read side while it
// executes a batch (server/read_side.h).
#include <doctest/doctest.h>

#include "server/read_side.h"

using strata::ReadSidePolicy;
namespace nbd = strata::nbd;

namespace {

nbd::Request req(uint16_t type, uint16_t flags = 0) {
  nbd::Request r{};
  r.magic = nbd::kRequestMagic;
  r.type = type;
  r.flags = flags;
  r.length = 4096;
  return r;
}

}  // namespace

TEST_CASE("reads, writes and block status may run with the read side kept") {
  CHECK_FALSE(ReadSidePolicy::may_block_long(req(nbd::kCmdRead)));
  CHECK_FALSE(ReadSidePolicy::may_block_long(req(nbd::kCmdWrite)));
  CHECK_FALSE(ReadSidePolicy::may_block_long(req(nbd::kCmdBlockStatus)));
}

TEST_CASE("flush, trim, zero-writes, cache and FUA always hand the read side over") {
  CHECK(ReadSidePolicy::may_block_long(req(nbd::kCmdFlush)));
  CHECK(ReadSidePolicy::may_block_long(req(nbd::kCmdTrim)));
  CHECK(ReadSidePolicy::may_block_long(req(nbd::kCmdWriteZeroes)));
  CHECK(ReadSidePolicy::may_block_long(req(nbd::kCmdCache)));
  CHECK(ReadSidePolicy::may_block_long(req(nbd::kCmdWrite, nbd::kCmdFlagFua)));
}

TEST_CASE("a batch that slept hands the read side over for the next 64 batches") {
  ReadSidePolicy p;
  CHECK(p.keep());
  p.batch_done(false);
  CHECK(p.keep());
  p.batch_done(true);
  for (uint32_t i = 0; i < ReadSidePolicy::kMemory; ++i) {
    CHECK_FALSE(p.keep());
    p.batch_done(false);
  }
  CHECK(p.keep());
  // Another sleep in the countdown starts it again.
  p.batch_done(true);
  for (int i = 0; i < 10; ++i) p.batch_done(false);
  p.batch_done(true);
  for (uint32_t i = 0; i < ReadSidePolicy::kMemory; ++i) {
    CHECK_FALSE(p.keep());
    p.batch_done(false);
  }
  CHECK(p.keep());
}
