// qcow2 header: parsing and validation of the first cluster (header fields,
// header extensions, backing file name) and of the snapshot table.
//
// parse_header() checks every field before anything is allocated or shifted
// (cluster_bits first, then 64-bit overflow-safe table sizes and offsets), so a
// hostile header is refused with "PATH: header: FIELD ..." and never read past.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "formats/file.h"

namespace strata::qcow2 {

inline constexpr uint32_t kMagic = 0x514649FB;

// Feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
inline constexpr uint64_t kAutoclearKnown = 0x3;

// Header extension types.
inline constexpr uint32_t kExtBitmaps = 0x23852875;

// Header field offsets used when rewriting single fields.
inline constexpr uint64_t kOffBackingFileOffset = 8;  // u64
inline constexpr uint64_t kOffRefcountTable = 48;     // u64 offset + u32 clusters
inline constexpr uint64_t kOffIncompat = 72;
inline constexpr uint64_t kOffAutoclear = 88;

// Limits (QEMU's, see docs/FORMATS.md B15).
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
inline constexpr uint64_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr uint64_t kMaxHostOffset = 1ull << 56;

// Table entry masks.
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
// COPIED (bit 63) of L1 and L2 entries; the other L2 bits are in l2_entry.h.
inline constexpr uint64_t kCopied = 1ull << 63;
inline constexpr uint64_t kRefTableOffsetMask = 0xfffffffffffffe00ull;

struct FeatureName {
  uint8_t type;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit;
  std::string name;
};

struct SnapshotInfo {
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  std::string id, name;
};

struct Header {
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;  // as stored
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible = 0;
  uint64_t compatible = 0;
  uint64_t autoclear = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 72;
  uint8_t compression_type = 0;  // 0 deflate, 1 zstd

  std::string backing_file;
  std::string backing_format;  // empty: not recorded
  std::string data_file;       // from the extension; empty: none
  bool has_data_file_ext = false;
  bool has_bitmaps_ext = false;
  uint32_t nb_bitmaps = 0;
  uint64_t bitmap_directory_size = 0;
  uint64_t bitmap_directory_offset = 0;
  std::vector<FeatureName> feature_names;

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  bool extended_l2() const { return incompatible & kIncompatExtendedL2; }
  bool has_data_file() const { return incompatible & kIncompatDataFile; }
  bool data_file_raw() const { return autoclear & kAutoclearDataFileRaw; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  // Name of a feature bit from the feature-name table, or "bit N".
  std::string feature_name(uint8_t type, uint8_t bit) const;
};

// Reads and validates the header of `file`. Throws ImageError naming the file
// and the field.
Header read_header(File& file);

// Reads and validates the snapshot table (header must be valid).
std::vector<SnapshotInfo> read_snapshots(File& file, const Header& h,
                                         uint64_t* table_bytes = nullptr);

// Number of L1 entries needed to map `size` bytes.
uint64_t l1_entries_needed(uint64_t size, uint32_t cluster_bits, bool extended_l2);

}  // namespace strata::qcow2
