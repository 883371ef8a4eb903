// Extent: one run of a device as seen through its whole stack, the unit in
// which drivers answer extents() and the protocol answers block status and
// plans sparse reads. A header of its own so that protocol/ can speak of
// extents without depending on the driver interface.
#pragma once

#include <cstdint>

namespace strata {

struct Extent {
  uint64_t length = 0;
  // Not allocated in any layer of the stack (NBD base:allocation HOLE).
  bool hole = false;
  // Reads as zeros (NBD base:allocation ZERO).
  bool zero = false;
  // qemu:allocation-depth: 0 = unallocated everywhere, 1 = this layer,
  // 2 = its backing/parent, and so on.
  uint32_t depth = 1;

  bool same_kind(const Extent& o) const {
    return hole == o.hole && zero == o.zero && depth == o.depth;
  }
};

// One run of a persistent dirty bitmap (NBD qemu:dirty-bitmap:NAME, flag 1 =
// dirty): written since the bitmap was last cleared, or not.
struct DirtyRun {
  uint64_t length = 0;
  bool dirty = false;
};

}  // namespace strata
