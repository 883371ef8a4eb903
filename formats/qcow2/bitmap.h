// qcow2 persistent dirty bitmaps: the on-disk rules (qcow2 spec, "Bitmaps
// extension"; docs/FORMATS.md) and DirtyBitmap, the bits in memory.
//
// On disk the bitmaps header extension points at the bitmap directory, a list
// of entries each padded to 8 bytes:
//    0 u64 bitmap table offset     8 u32 table size (entries)   12 u32 flags
//   16 u8  type (1: dirty track)  17 u8  granularity bits       18 u16 name size
//   20 u32 extra data size        24 extra data, then the name (no NUL)
// A bitmap table entry holds the offset of a data cluster in bits 9-55, or 0
// with bit 0 telling "all clear" (0) or "all set" (1). A data cluster holds
// cluster_size * 8 granules: granule i is bit i % 8 of byte i / 8.
//
// The consistency rule that makes a bitmap safe across crashes: IN_USE is
// set on disk (and synced) before the first write the bitmap on disk does not
// show, and cleared only after its tables are durable. A bitmap found IN_USE
// at open is inconsistent: nobody may trust or update it until it is cleared.
//
// Everything here is pure (no I/O), so the rules are unit-tested and fuzzed
// on bytes alone; formats/qcow2/bitmaps.cpp applies them to an image.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/extent.h"

namespace strata::qcow2 {

inline constexpr uint32_t kBitmapInUse = 1u << 0;
inline constexpr uint32_t kBitmapAuto = 1u << 1;  // enabled: writes mark it
inline constexpr uint32_t kBitmapExtraDataCompatible = 1u << 2;
inline constexpr uint32_t kBitmapFlagsKnown = 0x7;
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;

// QEMU's limits, so that what one accepts the other does too.
inline constexpr uint32_t kMinGranularityBits = 9;
inline constexpr uint32_t kMaxGranularityBits = 31;
inline constexpr uint32_t kMaxBitmapNameSize = 1023;
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectorySize = uint64_t{64} << 20;
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kDefaultGranularityBits = 16;  // 64 KiB, qemu-img's default
// Memory: one bitmap's bits (QEMU's BME_MAX_PHYS_SIZE), and all of an image's
// together, so a hostile image cannot make an open allocate without bound.
inline constexpr uint64_t kMaxBitmapBytes = uint64_t{512} << 20;
inline constexpr uint64_t kMaxImageBitmapBytes = uint64_t{1} << 30;

inline constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapEntryAllOnes = 1;

struct BitmapEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
  uint32_t flags = 0;
  uint8_t type = kBitmapTypeDirtyTracking;
  uint8_t granularity_bits = kDefaultGranularityBits;
  std::string name;
  std::vector<uint8_t> extra_data;

  uint64_t granularity() const { return uint64_t{1} << granularity_bits; }
  bool in_use() const { return flags & kBitmapInUse; }
  bool enabled() const { return flags & kBitmapAuto; }
};

// Bytes of memory (and of data clusters, at most) the bits of a bitmap of
// `granularity_bits` take for a disk of `disk_size` bytes.
uint64_t bitmap_bytes(uint64_t disk_size, uint32_t granularity_bits);

// Bytes of the directory entry for `e`, padding included.
uint64_t bitmap_entry_size(const BitmapEntry& e);

// Splits a directory of `count` entries into `out`. Returns "" or why the
// directory as a whole cannot be read (an entry running past its end, a
// size or count that does not match); then `out` is empty. The entries'
// own fields are not judged here: see bitmap_entry_problem().
std::string parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t count,
                                   std::vector<BitmapEntry>& out);
// The directory bytes for `entries` (their sizes must be valid).
std::vector<uint8_t> encode_bitmap_directory(const std::vector<BitmapEntry>& entries);
// Byte offset of entry `index`'s flags field in the encoded directory.
uint64_t bitmap_flags_position(const std::vector<BitmapEntry>& entries, size_t index);

// Table entries a bitmap of `granularity_bits` needs for a disk of `size`
// bytes with clusters of 1 << cluster_bits.
uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits, uint32_t cluster_bits);

// Why `e` cannot be used as a dirty bitmap of this image, or "": type,
// granularity, flags, extra data, name (1-1023 bytes of UTF-8), size in
// memory, table size and table offset (aligned, inside the file).
std::string bitmap_entry_problem(const BitmapEntry& e, uint64_t disk_size, uint32_t cluster_bits,
                                 uint64_t file_size);
// A name the image tool may give a new bitmap: "" or why not.
std::string bitmap_name_problem(const std::string& name);

// One decoded table entry.
struct BitmapTableEntry {
  uint64_t host = 0;     // data cluster, or 0
  bool all_set = false;  // host == 0: every granule of the chunk is dirty
  bool valid = true;     // reserved bits clear, offset aligned
};
BitmapTableEntry decode_bitmap_table_entry(uint64_t raw, uint32_t cluster_bits);

// The bits of one bitmap in memory, one per granule of the disk. mark() may be
// called from any number of threads at once without a lock (relaxed atomic
// ORs: a bit once set stays set until clear()); everything else must not run
// concurrently with clear() or load().
class DirtyBitmap {
 public:
  DirtyBitmap(uint64_t disk_size, uint32_t granularity_bits);

  uint64_t disk_size() const { return disk_size_; }
  uint32_t granularity_bits() const { return granularity_bits_; }
  uint64_t granules() const { return granules_; }

  // Marks every granule [offset, offset + length) touches.
  void mark(uint64_t offset, uint64_t length);
  void clear();
  bool test(uint64_t granule) const;
  // Granules set in [first, first + count).
  uint64_t count(uint64_t first, uint64_t count) const;

  // Appends runs covering [offset, offset + length) clipped to the disk, at
  // most `max_runs` of them (the last one then ends early).
  void runs(uint64_t offset, uint64_t length, std::vector<DirtyRun>& out,
            size_t max_runs = SIZE_MAX) const;

  // The on-disk bytes of granules [first, first + 8 * bytes.size()): `first`
  // is a multiple of 64. Granules past the disk end read as clear and are
  // ignored on load.
  void load(uint64_t first, std::span<const uint8_t> bytes);
  void store(uint64_t first, std::span<uint8_t> bytes) const;
  // Sets granules [first, first + count) (an all-set table entry).
  void set_granules(uint64_t first, uint64_t count);

 private:
  uint64_t word(uint64_t i) const { return words_[i].load(std::memory_order_relaxed); }

  uint64_t disk_size_;
  uint32_t granularity_bits_;
  uint64_t granules_;
  uint64_t word_count_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace strata::qcow2
