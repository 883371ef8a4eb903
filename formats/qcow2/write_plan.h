// qcow2 allocation as a plan, then its application: what a write or a zero
// write into one guest cluster does is decided from the cluster's L2 entry
// alone (pure functions here, tested without an image), and
// Qcow2Device::write_cluster() / zero_cluster() (write.cpp) carry it out.
//
// A WritePlan is applied in this order, which crash safety depends on
// (docs/FORMATS.md B9, docs/DESIGN.md; tests/qcow2/test_qcow2_crash.py):
//   1. under the metadata lock: a new host cluster is taken if the plan says
//      so (its refcount set in the refcount cache, which writeback puts on
//      disk before any L2 table naming the cluster), then the target is
//      checked against the metadata map;
//   2. without the lock: [copy_from, copy_to) of the cluster is built from
//      the guest data and, around it, the current contents (copy-on-write
//      from the old cluster, compressed data or backing file, or zeros), and
//      written to the host cluster; data_dirty_ makes writeback sync it
//      before any L2 table;
//   3. under the lock again: the L2 entry is set, then the clusters of the
//      old entry are queued for freeing (they are decremented only after the
//      L2 change is durable, so a crash leaks rather than double-allocates).
// A ZeroPlan changes the L2 entry only (and queues the old clusters), or
// sends a partially zeroed compressed cluster through a WritePlan.
#pragma once

#include <cstdint>

#include "formats/qcow2/l2_entry.h"

namespace strata::qcow2 {

struct WritePlan {
  enum class Target : uint8_t {
    in_place,        // the entry's own host cluster (COPIED: ours alone)
    data_file_same,  // external data file: the cluster at the guest offset
    allocate,        // a new host cluster (copy-on-write)
  };
  uint64_t guest_cluster = 0;  // guest offset / cluster size
  uint64_t offset = 0;         // the write, relative to the cluster
  uint64_t length = 0;
  Target target = Target::allocate;
  uint64_t host = 0;       // host cluster written (filled in at step 1 for `allocate`)
  bool fresh = false;      // `allocate` took a never-used cluster: it reads as zeros
  uint64_t copy_from = 0;  // cluster-relative range written to the host cluster
  uint64_t copy_to = 0;
  // Outside the write the cluster reads as zeros: a fresh cluster needs no copy.
  bool old_zero = false;
  // The standard zero flag is set: the copied parts are zeros, not old data.
  bool zero_flag = false;
  // In place and nothing around the write to copy: the data goes out as is.
  bool in_place_as_is = false;
  uint64_t new_bitmap = 0;  // extended L2 bitmap of the new entry (host | COPIED)
  bool free_old = false;    // queue the clusters `old_entry` held
  uint64_t old_entry = 0;
};

// Plans writing [offset, offset + length) of the guest cluster whose L2 entry
// is `entry` (decoded `d`) with bitmap `bitmap`. `backing_visible`: the
// backing file shows through this cluster. Returns 0, or EIO for an entry
// that cannot be written (invalid, or compressed with a data file).
int plan_cluster_write(uint64_t entry, const L2Entry& d, uint64_t bitmap, const L2Format& f,
                       uint64_t guest_cluster, uint64_t offset, uint64_t length,
                       bool backing_visible, WritePlan& plan);

struct ZeroPlan {
  // Partially zeroing a compressed cluster: write zeros over the covered
  // range through write_cluster() (copy-on-write) instead.
  bool copy_on_write = false;
  uint64_t new_entry = 0;
  uint64_t new_bitmap = 0;
  bool drop_old = false;  // queue the clusters of the old entry for freeing
};

// How zeroing or trimming the whole units (subclusters, or the cluster)
// [from, to) of a guest cluster changes its L2 entry. `dealloc`: leave it
// unallocated rather than zero (nothing shows through). `is_trim` and
// `may_trim` as the request says.
ZeroPlan plan_cluster_zero(uint64_t entry, const L2Entry& d, uint64_t bitmap, const L2Format& f,
                           uint64_t from, uint64_t to, bool dealloc, bool is_trim, bool may_trim);

}  // namespace strata::qcow2
