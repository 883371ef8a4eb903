// qcow2 L2 entries (docs/FORMATS.md B6, B7): the bit masks, the one
// classifier of an entry (QEMU's qcow2_get_cluster_type and
// qcow2_get_subcluster_type), the one parser of a compressed-cluster
// descriptor and the one subcluster-mask helper. No other code of the driver
// looks at the bits of an L2 entry.
//
// Invariants the callers rely on:
// - An entry with bit 62 set is compressed whatever its other bits say; its
//   extended-L2 bitmap is ignored (it is reserved and zero). Compressed
//   clusters have no host cluster of their own (has_host is false) and are
//   never valid with an external data file (each caller decides how to fail).
// - Otherwise `host` is the offset field (bits 9-55) even when the entry is
//   invalid, so that code replacing an entry (zeroing, trimming) can still
//   free what it named, as it always did.
// - A host offset of 0 names a cluster only with an external data file and
//   COPIED set (guest data at offset 0 of that file).
// - Everything here is inline and allocation-free: the read path classifies
//   every cluster and subcluster it maps.
#pragma once

#include <cstdint>

#include "formats/qcow2/header.h"

namespace strata::qcow2 {

// Bits of the first (standard) word of an L2 entry. kCopied (bit 63) is
// shared with L1 entries and lives in header.h.
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;       // bits 9-55
inline constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;  // bits 1-8, 56-61
inline constexpr uint64_t kCompressed = 1ull << 62;
inline constexpr uint64_t kZeroFlag = 1ull;  // standard L2 only (v3)
// With extended L2, bit 0 has no meaning and must be 0.
inline constexpr uint64_t kL2ExtendedReservedBit = 1ull;

// The second word of an extended L2 entry: bit i says subcluster i is
// allocated, bit 32 + i that it reads as zeros.
inline constexpr unsigned kSubclusters = 32;
inline constexpr uint64_t kAllocBits = 0x00000000ffffffffull;
inline constexpr uint64_t kZeroBits = 0xffffffff00000000ull;

enum class ClusterType : uint8_t {
  unallocated,  // backing file, or zeros (data_file_raw: the data file)
  zero_plain,   // zero flag, no host cluster
  zero_alloc,   // zero flag, host cluster kept (preallocated)
  normal,       // data at `host`
  compressed,   // compressed descriptor
  invalid,      // reserved bits set or unaligned offset: EIO
};

enum class SubclusterType : uint8_t {
  unallocated_plain,  // no host cluster: backing file or zeros
  unallocated_alloc,  // host cluster reserved, subcluster not written yet
  zero_plain,
  zero_alloc,
  normal,
  compressed,
  invalid,  // allocated and zero at once, or allocated without a host cluster
};

inline bool is_zero(ClusterType t) {
  return t == ClusterType::zero_plain || t == ClusterType::zero_alloc;
}
inline bool is_zero(SubclusterType t) {
  return t == SubclusterType::zero_plain || t == SubclusterType::zero_alloc;
}

// What the entry's fields say; `type` is the verdict.
struct L2Entry {
  ClusterType type = ClusterType::unallocated;
  uint64_t host = 0;       // offset field; 0 for compressed entries
  bool has_host = false;   // names a host cluster (see the header paragraph)
  bool copied = false;     // bit 63: refcount exactly 1 (or a data-file cluster)
  bool zero_flag = false;  // bit 0 of a standard entry; always false with extended L2

  bool compressed() const { return type == ClusterType::compressed; }
};

// The geometry the classification depends on.
struct L2Format {
  uint32_t cluster_bits = 16;
  bool extended_l2 = false;
  bool external_data_file = false;
};

inline L2Entry classify_l2_entry(uint64_t entry, const L2Format& f) {
  L2Entry d;
  d.copied = (entry & kCopied) != 0;
  if (entry & kCompressed) {
    d.type = ClusterType::compressed;
    return d;
  }
  d.host = entry & kL2OffsetMask;
  d.has_host = d.host != 0 || (f.external_data_file && d.copied);
  d.zero_flag = !f.extended_l2 && (entry & kZeroFlag) != 0;
  const uint64_t reserved = kL2StdReservedMask | (f.extended_l2 ? kL2ExtendedReservedBit : 0);
  const uint64_t cluster_mask = (uint64_t{1} << f.cluster_bits) - 1;
  if ((entry & reserved) || (d.host & cluster_mask)) {
    d.type = ClusterType::invalid;
  } else if (d.zero_flag) {
    d.type = d.has_host ? ClusterType::zero_alloc : ClusterType::zero_plain;
  } else {
    d.type = d.has_host ? ClusterType::normal : ClusterType::unallocated;
  }
  return d;
}

// Subcluster `sc` of an extended L2 entry with bitmap `bitmap` (docs/FORMATS.md
// B7). Without extended L2 every subcluster is the whole cluster: use
// subcluster_type_of().
inline SubclusterType classify_subcluster(const L2Entry& d, uint64_t bitmap, unsigned sc) {
  switch (d.type) {
    case ClusterType::compressed:
      return SubclusterType::compressed;
    case ClusterType::invalid:
      return SubclusterType::invalid;
    default:
      break;
  }
  const bool alloc = (bitmap >> sc) & 1;
  const bool zero = (bitmap >> (kSubclusters + sc)) & 1;
  if (alloc) return zero || !d.has_host ? SubclusterType::invalid : SubclusterType::normal;
  if (zero) return d.has_host ? SubclusterType::zero_alloc : SubclusterType::zero_plain;
  return d.has_host ? SubclusterType::unallocated_alloc : SubclusterType::unallocated_plain;
}

// A standard entry's cluster type as the type of its one "subcluster".
inline SubclusterType subcluster_type_of(ClusterType t) {
  switch (t) {
    case ClusterType::unallocated:
      return SubclusterType::unallocated_plain;
    case ClusterType::zero_plain:
      return SubclusterType::zero_plain;
    case ClusterType::zero_alloc:
      return SubclusterType::zero_alloc;
    case ClusterType::normal:
      return SubclusterType::normal;
    case ClusterType::compressed:
      return SubclusterType::compressed;
    case ClusterType::invalid:
      break;
  }
  return SubclusterType::invalid;
}

// A compressed-cluster descriptor (docs/FORMATS.md B6): bits 0..x-1 the host
// byte offset, bits x..61 the number of 512-byte sectors beyond the first,
// x = 62 - (cluster_bits - 8).
struct CompressedDescriptor {
  uint64_t offset = 0;   // host byte offset of the compressed data (any alignment)
  uint64_t sectors = 0;  // 512-byte sectors the data touches, counted from offset's sector

  // Bytes to read at `offset`.
  uint64_t length() const { return sectors * 512 - (offset & 511); }
  // The sector-aligned host range the data occupies (what its refcounts count).
  uint64_t first_byte() const { return offset & ~uint64_t{511}; }
  uint64_t span() const { return sectors * 512; }
};

inline CompressedDescriptor parse_compressed_descriptor(uint64_t entry, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  CompressedDescriptor c;
  c.offset = entry & ((uint64_t{1} << x) - 1);
  c.sectors = ((entry >> x) & ((uint64_t{1} << (cluster_bits - 8)) - 1)) + 1;
  return c;
}

// The subclusters (bit i: subcluster i) that the cluster-relative byte range
// [from, to) touches, from < to <= cluster size. For a range aligned to
// subclusters these are exactly the subclusters it covers. Shift by
// kSubclusters for the zero bits of a bitmap.
inline uint32_t subcluster_mask(uint64_t from, uint64_t to, uint32_t cluster_bits) {
  const uint32_t sub_bits = cluster_bits - 5;  // 32 subclusters per cluster
  const uint64_t first = from >> sub_bits, last = (to - 1) >> sub_bits;
  const uint64_t upto = last == kSubclusters - 1 ? kAllocBits : (uint64_t{1} << (last + 1)) - 1;
  return static_cast<uint32_t>(upto & ~((uint64_t{1} << first) - 1));
}

inline uint64_t alloc_bits(uint32_t mask) { return mask; }
inline uint64_t zero_bits(uint32_t mask) { return uint64_t{mask} << kSubclusters; }

}  // namespace strata::qcow2
