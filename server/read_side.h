// When a connection thread keeps the read side (the read mutex) while it
// executes the batch it read, instead of handing it to another thread first.
//
// Keeping it saves a wake-up per batch and lets requests that arrive meanwhile
// make the next batch larger; it is right while batches run without sleeping
// (data in the page cache). A batch that slept (disk I/O, a lock) means later
// requests could be waiting behind it, so the next kMemory batches hand the
// read side over before they execute. Requests that may take long however
// fast the last batches were always hand it over.
#pragma once

#include <atomic>
#include <cstdint>

#include "protocol/nbd.h"

namespace strata {

class ReadSidePolicy {
 public:
  static constexpr uint32_t kMemory = 64;

  // A request that may wait for the disk even when recent batches did not.
  static bool may_block_long(const nbd::Request& h) {
    return !(h.type == nbd::kCmdRead || h.type == nbd::kCmdWrite ||
             h.type == nbd::kCmdBlockStatus) ||
           (h.flags & nbd::kCmdFlagFua);
  }

  // Whether the next batch may execute with the read side kept, before
  // looking at its requests.
  bool keep() const { return handoffs_.load(std::memory_order_relaxed) == 0; }

  // After a batch executed: `slept` if its thread made a voluntary context
  // switch meanwhile. Threads race on the count; an off-by-one is harmless.
  void batch_done(bool slept) {
    if (slept) {
      handoffs_.store(kMemory, std::memory_order_relaxed);
    } else if (uint32_t n = handoffs_.load(std::memory_order_relaxed); n > 0) {
      handoffs_.store(n - 1, std::memory_order_relaxed);
    }
  }

 private:
  std::atomic<uint32_t> handoffs_{0};  // batches still to hand over
};

}  // namespace strata
