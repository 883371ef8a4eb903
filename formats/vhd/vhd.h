// The VHD driver: fixed, dynamic and differencing images (docs/FORMATS.md Part A).
//
// Layout: fixed = [data][footer]; dynamic/differencing = [footer copy][header]
// [BAT][locators, batmap][blocks...][footer]. A block is a sector bitmap
// (MSB first, padded to 512 bytes) followed by block_size bytes of data.
//
// Invariants:
//  - The last 512 bytes of a writable image are a valid footer at every instant:
//    a new block first extends the file with a footer past its end, then its
//    bitmap and data overwrite the previous footer.
//  - A BAT entry is written only after the block's data is durable. Bits of an
//    allocated block are set in the cached bitmap when the write completes and
//    reach the disk at the next flush(), after a sync of the data (or with the
//    block, for a new one): a bit on disk never precedes its data.
//  - The BAT lives in memory (bat_, guarded by meta_mutex_); sector bitmaps are
//    cached in a bounded cache (also under meta_mutex_). meta_mutex_ is never held
//    across I/O on the read path.
//  - Writes into one block are serialized by a striped per-block mutex; reads take
//    no lock beyond short metadata look-ups.
//  - A differencing image's parent is read-only and never written.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "formats/block_device.h"
#include "formats/file.h"
#include "formats/mutex.h"
#include "formats/vhd/vhd_format.h"

namespace strata::vhd {

struct ParentInfo {
  std::string name;                   // header parent unicode name (decoded)
  std::string resolved_path;          // canonical path actually opened
  std::string resolved_by;            // locator (W2ru, W2ku, MacX) or "parent name"
  std::vector<std::string> locators;  // "W2ru: .\\parent.vhd" etc.
};

class VhdDevice final : public BlockDevice {
 public:
  // Built by open_vhd() (vhd_open.cpp) after validation.
  VhdDevice(std::unique_ptr<File> file, const Footer& footer, uint64_t size);
  ~VhdDevice() override;  // writes pending sector bitmaps

  std::string_view format() const override { return "vhd"; }
  const std::string& path() const override { return file_->path(); }
  uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  BlockSizes block_sizes() const override;

  int read(uint64_t offset, std::span<std::byte> buf) override;
  int map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) override;
  int write(uint64_t offset, std::span<const std::byte> buf, bool fua) override;
  int write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  int trim(uint64_t offset, uint64_t length, bool fua) override;
  int flush() override;
  int extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

  std::vector<Child> children() const override;
  void describe(nlohmann::json& out) const override;
  void check(CheckReport& report) override;
  std::string stats() const override;
  DeviceCounters counters() const override;

  const Footer& footer() const { return footer_; }
  uint32_t disk_type() const { return footer_.disk_type; }

 private:
  using Bitmap = std::shared_ptr<const std::vector<uint8_t>>;
  friend class Opener;  // vhd_open.cpp fills in the tables after validation

  bool dynamic() const { return footer_.disk_type != kTypeFixed; }
  bool differencing() const { return footer_.disk_type == kTypeDifferencing; }
  uint64_t block_bytes() const { return bitmap_bytes_ + block_size_; }

  // Reads what shows through where this layer has nothing: the parent chain for a
  // differencing image (zeros past the parent's size), zeros otherwise.
  int read_below(uint64_t offset, std::span<std::byte> buf);
  int map_below(uint64_t offset, uint64_t length, std::vector<HostPiece>& out);
  // How much of [offset, offset + length) the parent holds (the rest of what
  // shows through reads as zeros); 0 without a parent.
  uint64_t parent_part(uint64_t offset, uint64_t length) const;
  // The one walk of a guest range of a dynamic image, shared by read() and
  // map_host(): here(host_offset, at, n) for n bytes this layer holds, at `at`
  // bytes into the range; below(guest_offset, at, n) for what shows through.
  template <class Here, class Below>
  int walk(uint64_t offset, uint64_t length, Here&& here, Below&& below);
  template <class Here, class Below>
  int walk_block(uint64_t block, uint64_t off_in_block, uint64_t length, uint64_t at, Here& here,
                 Below& below);
  int write_block(uint64_t block, uint64_t off_in_block, std::span<const std::byte> buf);
  int allocate_block(uint64_t block, uint64_t s0, uint64_t s1, std::span<const std::byte> sectors);
  int write_bat_entry(uint64_t block);
  int fixed_extents(uint64_t offset, uint64_t length, std::vector<Extent>& out);
  int extents_below(uint64_t offset, uint64_t length, std::vector<Extent>& out);
  // Does every layer below read zeros in the range?
  int below_is_zero(uint64_t offset, uint64_t length, bool& zero);

  uint32_t bat_entry(uint64_t block) const;
  // Number of consecutive unallocated blocks from `block`, at most max_blocks.
  uint64_t unallocated_run(uint64_t block, uint64_t max_blocks) const;
  // The sector bitmap of an allocated block (from cache or disk).
  int get_bitmap(uint64_t block, uint32_t entry, Bitmap& out);
  // dirty: the bits are not on disk yet (flush() writes them).
  void put_bitmap(uint64_t block, Bitmap bm, bool dirty = false);
  void evict_bitmaps() REQUIRES(meta_mutex_);
  void footer_bytes(uint8_t* buf) const;

  std::unique_ptr<File> file_;
  Footer footer_;
  uint64_t size_;

  // Dynamic / differencing only.
  DynHeader header_;
  uint32_t block_size_ = 0;
  uint32_t sectors_per_block_ = 0;
  uint32_t bitmap_bytes_ = 0;  // padded to 512
  std::vector<uint32_t> bat_ GUARDED_BY(meta_mutex_);
  uint64_t metadata_end_ = 0;  // end of header, BAT, batmap and locator blobs
  std::vector<std::pair<uint64_t, uint64_t>> metadata_ranges_;  // [start, end) for check
  // Metadata the header declares past the end of the image data (vhd_open.cpp,
  // reserve_declared_area): the image is served read-only and check reports each.
  std::vector<std::string> areas_past_end_;
  std::shared_ptr<BlockDevice> parent_;
  ParentInfo parent_info_;
  bool has_batmap_ = false;
  std::string opened_notes_;  // what open repaired or warned about

  mutable Mutex meta_mutex_;
  // Next free byte for a new block (bitmap start); grows with each allocation.
  uint64_t next_free_ GUARDED_BY(alloc_mutex_) = 0;
  Mutex alloc_mutex_;
  Mutex bat_write_mutex_;
  std::array<Mutex, 64> block_locks_;

  // Bounded bitmap cache: block -> bitmap bytes, LRU. Entries are immutable;
  // an update replaces the pointer, so readers copy only a shared_ptr.
  size_t bitmap_cache_max_ = 4096;
  std::list<uint64_t> lru_ GUARDED_BY(meta_mutex_);
  std::unordered_map<uint64_t, std::pair<Bitmap, std::list<uint64_t>::iterator>> bitmaps_
      GUARDED_BY(meta_mutex_);
  // Blocks whose cached bitmap has bits not yet written to disk; pinned in the cache.
  std::set<uint64_t> dirty_bitmaps_ GUARDED_BY(meta_mutex_);
  Mutex flush_mutex_;
  mutable std::atomic<uint64_t> bitmap_hits_{0}, bitmap_misses_{0}, allocations_{0};
  std::atomic<uint64_t> bitmap_evictions_{0};
};

}  // namespace strata::vhd
