// VHD I/O paths: reads, writes with crash-safe block allocation, zeroing and
// block status. Opening and validation live in vhd_open.cpp, check/describe in
// vhd_check.cpp, creation in vhd_create.cpp.
#include "formats/vhd/vhd.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "formats/endian.h"

namespace strata::vhd {
namespace {

inline bool bit(const uint8_t* bm, uint64_t i) { return (bm[i >> 3] & (0x80u >> (i & 7))) != 0; }

inline void set_bits(uint8_t* bm, uint64_t from, uint64_t to) {
  for (uint64_t i = from; i < to;) {
    if ((i & 7) == 0 && i + 8 <= to) {
      uint64_t n = (to - i) / 8;
      std::memset(bm + (i >> 3), 0xFF, n);
      i += n * 8;
    } else {
      bm[i >> 3] = static_cast<uint8_t>(bm[i >> 3] | (0x80u >> (i & 7)));
      ++i;
    }
  }
}

// First index in [from, to) whose bit differs from `value`, else `to`.
// Skips whole bytes and 64-bit words of the same value.
uint64_t run_end(const uint8_t* bm, uint64_t from, uint64_t to, bool value) {
  const uint8_t same = value ? 0xFF : 0x00;
  uint64_t i = from;
  while (i < to) {
    if ((i & 63) == 0 && i + 64 <= to) {
      uint64_t w;
      std::memcpy(&w, bm + (i >> 3), 8);
      if (w == (value ? ~0ull : 0ull)) {
        i += 64;
        continue;
      }
    }
    if ((i & 7) == 0 && i + 8 <= to && bm[i >> 3] == same) {
      i += 8;
      continue;
    }
    if (bit(bm, i) != value) return i;
    ++i;
  }
  return to;
}

bool all_set(const uint8_t* bm, uint64_t from, uint64_t to) {
  return run_end(bm, from, to, true) == to;
}

const std::vector<std::byte>& zero_buffer() {
  static const std::vector<std::byte> zeros(1 << 20);
  return zeros;
}

}  // namespace

VhdDevice::VhdDevice(std::unique_ptr<File> file, const Footer& footer, uint64_t size)
    : file_(std::move(file)), footer_(footer), size_(size) {}

Capabilities VhdDevice::capabilities() const {
  Capabilities c;
  c.read_only = !file_->writable();
  c.can_flush = true;
  c.can_fua = true;
  // Trim punches the data of allocated blocks out of the file (see trim()).
  c.can_trim = true;
  c.can_zero = true;
  c.can_fast_zero = false;
  c.can_multi_conn = true;
  c.has_extents = true;
  return c;
}

BlockSizes VhdDevice::block_sizes() const {
  BlockSizes b;
  b.minimum = 1;
  b.preferred = 4096;
  return b;
}

void VhdDevice::footer_bytes(uint8_t* buf) const { serialize_footer(footer_, buf); }

uint32_t VhdDevice::bat_entry(uint64_t block) const {
  MutexLock lock(meta_mutex_);
  return block < bat_.size() ? bat_[block] : kUnallocated;
}

uint64_t VhdDevice::unallocated_run(uint64_t block, uint64_t max_blocks) const {
  MutexLock lock(meta_mutex_);
  uint64_t n = 0;
  while (n < max_blocks && (block + n >= bat_.size() || bat_[block + n] == kUnallocated)) ++n;
  return n;
}

int VhdDevice::get_bitmap(uint64_t block, uint32_t entry, Bitmap& out) {
  {
    MutexLock lock(meta_mutex_);
    auto it = bitmaps_.find(block);
    if (it != bitmaps_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.second);
      out = it->second.first;
      bitmap_hits_.fetch_add(1, std::memory_order_relaxed);
      return 0;
    }
  }
  bitmap_misses_.fetch_add(1, std::memory_order_relaxed);
  auto bm = std::make_shared<std::vector<uint8_t>>(bitmap_bytes_);
  if (int r = read_bytes(*file_, uint64_t{entry} * kSector, bm->data(), bm->size())) return r;
  MutexLock lock(meta_mutex_);
  auto it = bitmaps_.find(block);
  if (it != bitmaps_.end()) {  // someone else loaded or updated it meanwhile
    out = it->second.first;
    return 0;
  }
  out = bm;
  lru_.push_front(block);
  bitmaps_.emplace(block, std::make_pair(out, lru_.begin()));
  evict_bitmaps();
  return 0;
}

void VhdDevice::evict_bitmaps() {
  // Dirty bitmaps (bits not yet on disk) stay until flush() writes them.
  auto it = lru_.end();
  while (bitmaps_.size() > bitmap_cache_max_ && it != lru_.begin()) {
    --it;
    if (dirty_bitmaps_.count(*it)) continue;
    bitmaps_.erase(*it);
    it = lru_.erase(it);
    bitmap_evictions_.fetch_add(1, std::memory_order_relaxed);
  }
}

void VhdDevice::put_bitmap(uint64_t block, Bitmap bm, bool dirty) {
  MutexLock lock(meta_mutex_);
  if (dirty) dirty_bitmaps_.insert(block);
  auto it = bitmaps_.find(block);
  if (it != bitmaps_.end()) {
    it->second.first = std::move(bm);
    lru_.splice(lru_.begin(), lru_, it->second.second);
    return;
  }
  lru_.push_front(block);
  bitmaps_.emplace(block, std::make_pair(std::move(bm), lru_.begin()));
  evict_bitmaps();
}

// ---- reads ------------------------------------------------------------------

uint64_t VhdDevice::parent_part(uint64_t offset, uint64_t length) const {
  if (!differencing() || !parent_) return 0;
  const uint64_t psize = parent_->size();
  return offset >= psize ? 0 : std::min(length, psize - offset);
}

int VhdDevice::read_below(uint64_t offset, std::span<std::byte> buf) {
  const uint64_t n = parent_part(offset, buf.size());
  if (n > 0) {
    if (int r = parent_->read(offset, buf.first(n))) return r;
  }
  if (n < buf.size()) std::memset(buf.data() + n, 0, buf.size() - n);
  return 0;
}

int VhdDevice::map_below(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
  const uint64_t n = parent_part(offset, length);
  if (n > 0) {
    if (int r = parent_->map_host(offset, n, out)) return r;
  }
  append_zeros(out, length - n);
  return 0;
}

template <class Here, class Below>
int VhdDevice::walk_block(uint64_t block, uint64_t off_in, uint64_t length, uint64_t pos,
                          Here& here, Below& below) {
  const uint64_t base = block * block_size_;
  uint32_t entry = bat_entry(block);
  if (entry == kUnallocated) return below(base + off_in, pos, length);
  Bitmap bm;
  if (int r = get_bitmap(block, entry, bm)) return r;
  const uint64_t data = uint64_t{entry} * kSector + bitmap_bytes_;
  const uint64_t end = off_in + length;
  uint64_t s = off_in / kSector;
  const uint64_t s_end = (end + kSector - 1) / kSector;
  while (s < s_end) {
    bool present = bit(bm->data(), s);
    uint64_t t = run_end(bm->data(), s, s_end, present);
    uint64_t lo = std::max(s * kSector, off_in);
    uint64_t hi = std::min(t * kSector, end);
    const uint64_t at = pos + (lo - off_in);
    int r = present ? here(data + lo, at, hi - lo) : below(base + lo, at, hi - lo);
    if (r) return r;
    s = t;
  }
  return 0;
}

template <class Here, class Below>
int VhdDevice::walk(uint64_t offset, uint64_t length, Here&& here, Below&& below) {
  uint64_t done = 0;
  while (done < length) {
    uint64_t pos = offset + done;
    uint64_t block = pos / block_size_;
    uint64_t off_in = pos % block_size_;
    uint64_t n = std::min<uint64_t>(length - done, block_size_ - off_in);
    // A run of unallocated blocks is one read of the layer below.
    uint64_t blocks = (off_in + (length - done) + block_size_ - 1) / block_size_;
    uint64_t run = unallocated_run(block, blocks);
    if (run > 0) {
      n = std::min<uint64_t>(length - done, run * block_size_ - off_in);
      if (int r = below(pos, done, n)) return r;
    } else if (int r = walk_block(block, off_in, n, done, here, below)) {
      return r;
    }
    done += n;
  }
  return 0;
}

int VhdDevice::read(uint64_t offset, std::span<std::byte> buf) {
  if (!dynamic()) return file_->read_at(offset, buf);
  return walk(
      offset, buf.size(),
      [&](uint64_t host, uint64_t at, uint64_t n) {
        return file_->read_at(host, buf.subspan(at, n));
      },
      [&](uint64_t guest, uint64_t at, uint64_t n) {
        return read_below(guest, buf.subspan(at, n));
      });
}

// Blocks are never freed (trim punches their data out, which then reads as
// zeros through the same mapping) and a parent is read-only, so every piece
// keeps this range's bytes.
int VhdDevice::map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
  if (!dynamic()) return map_file(*file_, offset, length, out);
  return walk(
      offset, length,
      [&](uint64_t host, uint64_t, uint64_t n) { return map_file(*file_, host, n, out); },
      [&](uint64_t guest, uint64_t, uint64_t n) { return map_below(guest, n, out); });
}

// ---- writes -----------------------------------------------------------------

int VhdDevice::write_bat_entry(uint64_t block) {
  // Rewrite only the entries of the 512-byte BAT sector holding this one, and
  // never past the table (a batmap or locator may follow it directly).
  MutexLock wlock(bat_write_mutex_);
  const uint64_t first = block / 128 * 128;
  std::array<uint8_t, 512> sec{};
  uint64_t count;
  {
    MutexLock lock(meta_mutex_);
    count = std::min<uint64_t>(128, bat_.size() - first);
    for (uint64_t i = 0; i < count; ++i) store_be32(sec.data() + 4 * i, bat_[first + i]);
  }
  return write_bytes(*file_, header_.table_offset + first * 4, sec.data(), count * 4);
}

int VhdDevice::allocate_block(uint64_t block, uint64_t s0, uint64_t s1,
                              std::span<const std::byte> sectors) {
  auto bm = std::make_shared<std::vector<uint8_t>>(bitmap_bytes_, 0);
  if (differencing()) {
    // Only sectors now wholly in this layer; the rest still shows the parent.
    set_bits(bm->data(), s0, s1);
  } else {
    // Unwritten sectors of a fresh block are zero (file extension), so all
    // ones is truthful and spares later writes a bitmap update.
    set_bits(bm->data(), 0, sectors_per_block_);
  }
  uint64_t pos;
  {
    MutexLock lock(alloc_mutex_);
    // Data area 4 KiB aligned, like blktap.
    pos = (next_free_ + bitmap_bytes_ + 4095) / 4096 * 4096 - bitmap_bytes_;
    const uint64_t end = pos + block_bytes();
    if (pos / kSector >= kUnallocated || end / kSector >= kUnallocated) return ENOSPC;
    // Extend the file with a footer past the new block first, so that the file
    // ends in a valid footer while the block overwrites the old one.
    std::array<uint8_t, 512> foot;
    footer_bytes(foot.data());
    if (int r = write_bytes(*file_, end, foot.data(), foot.size())) return r;
    next_free_ = end;
  }
  if (s0 == 0) {
    std::vector<std::byte> whole(bitmap_bytes_ + sectors.size());
    std::memcpy(whole.data(), bm->data(), bitmap_bytes_);
    std::memcpy(whole.data() + bitmap_bytes_, sectors.data(), sectors.size());
    if (int r = file_->write_at(pos, whole)) return r;
  } else {
    if (int r = write_bytes(*file_, pos, bm->data(), bitmap_bytes_)) return r;
    if (int r = file_->write_at(pos + bitmap_bytes_ + s0 * kSector, sectors)) return r;
  }
  // Data (and bitmap) durable before the BAT entry that makes them visible.
  if (int r = file_->sync()) return r;
  {
    MutexLock lock(meta_mutex_);
    bat_[block] = static_cast<uint32_t>(pos / kSector);
  }
  put_bitmap(block, std::move(bm));
  allocations_.fetch_add(1, std::memory_order_relaxed);
  return write_bat_entry(block);
}

int VhdDevice::write_block(uint64_t block, uint64_t off_in, std::span<const std::byte> buf) {
  MutexLock block_lock(block_locks_[block % block_locks_.size()]);
  const uint64_t base = block * block_size_;
  const uint64_t end = off_in + buf.size();
  const uint64_t s0 = off_in / kSector;
  const uint64_t s1 = (end + kSector - 1) / kSector;
  const bool head_partial = off_in % kSector != 0;
  const bool tail_partial = end % kSector != 0;
  uint32_t entry = bat_entry(block);

  // Sector-aligned copy of the write with its partial head/tail sectors filled
  // from `fill(sector, dest)`.
  auto aligned = [&](auto&& fill, std::vector<std::byte>& out) -> int {
    out.resize((s1 - s0) * kSector);
    if (head_partial) {
      if (int r = fill(s0, std::span<std::byte>(out.data(), kSector))) return r;
    }
    if (tail_partial && (s1 - 1 != s0 || !head_partial)) {
      if (int r = fill(s1 - 1, std::span<std::byte>(out.data() + out.size() - kSector, kSector)))
        return r;
    }
    std::memcpy(out.data() + (off_in - s0 * kSector), buf.data(), buf.size());
    return 0;
  };

  if (entry == kUnallocated) {
    std::vector<std::byte> sectors;
    auto from_below = [&](uint64_t s, std::span<std::byte> dst) {
      return read_below(base + s * kSector, dst);
    };
    if (int r = aligned(from_below, sectors)) return r;
    return allocate_block(block, s0, s1, sectors);
  }

  Bitmap bm;
  if (int r = get_bitmap(block, entry, bm)) return r;
  const uint64_t data = uint64_t{entry} * kSector + bitmap_bytes_;
  const bool need_merge =
      (head_partial && !bit(bm->data(), s0)) || (tail_partial && !bit(bm->data(), s1 - 1));
  if (need_merge) {
    // A partial sector not yet in this layer: copy the rest of it up from below.
    std::vector<std::byte> sectors;
    auto fill = [&](uint64_t s, std::span<std::byte> dst) {
      return bit(bm->data(), s) ? file_->read_at(data + s * kSector, dst)
                                : read_below(base + s * kSector, dst);
    };
    if (int r = aligned(fill, sectors)) return r;
    if (int r = file_->write_at(data + s0 * kSector, sectors)) return r;
  } else {
    if (int r = file_->write_at(data + off_in, buf)) return r;
  }
  if (all_set(bm->data(), s0, s1)) return 0;
  // The new bits take effect in memory now; on disk they are written by the
  // next flush(), after the data is durable (never a bit before its data).
  auto nbm = std::make_shared<std::vector<uint8_t>>(*bm);
  set_bits(nbm->data(), s0, s1);
  put_bitmap(block, std::move(nbm), true);
  return 0;
}

int VhdDevice::write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (!file_->writable()) return EPERM;
  if (!dynamic()) {
    if (int r = file_->write_at(offset, buf)) return r;
    return fua ? file_->sync() : 0;
  }
  size_t done = 0;
  while (done < buf.size()) {
    uint64_t pos = offset + done;
    uint64_t block = pos / block_size_;
    uint64_t off_in = pos % block_size_;
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size() - done, block_size_ - off_in));
    if (int r = write_block(block, off_in, buf.subspan(done, n))) return r;
    done += n;
  }
  return fua ? flush() : 0;
}

int VhdDevice::below_is_zero(uint64_t offset, uint64_t length, bool& zero) {
  std::vector<Extent> ex;
  if (int r = extents_below(offset, length, ex)) return r;
  zero = std::all_of(ex.begin(), ex.end(), [](const Extent& e) { return e.zero; });
  return 0;
}

int VhdDevice::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (!file_->writable()) return EPERM;
  if (flags.fast_only) return ENOTSUP;
  const auto& zeros = zero_buffer();
  if (!dynamic()) {
    int r = file_->zero_range(offset, length);
    if (r == ENOTSUP || r == EOPNOTSUPP) {
      r = 0;
      for (uint64_t done = 0; done < length && r == 0;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(length - done, zeros.size()));
        r = file_->write_at(offset + done, {zeros.data(), n});
        done += n;
      }
    }
    if (r) return r;
    return flags.fua ? file_->sync() : 0;
  }
  uint64_t done = 0;
  while (done < length) {
    uint64_t pos = offset + done;
    uint64_t block = pos / block_size_;
    uint64_t off_in = pos % block_size_;
    uint64_t n = std::min<uint64_t>(length - done, block_size_ - off_in);
    bool skip = false;
    if (bat_entry(block) == kUnallocated) {
      // Unallocated reads as zero in a dynamic disk, but as the parent in a
      // differencing one: write real zeros unless the parent reads zero there.
      skip = true;
      if (differencing()) {
        if (int r = below_is_zero(pos, n, skip)) return r;
      }
    }
    for (uint64_t k = 0; !skip && k < n;) {
      size_t m = static_cast<size_t>(std::min<uint64_t>(n - k, zeros.size()));
      if (int r = write_block(block, off_in + k, {zeros.data(), m})) return r;
      k += m;
    }
    done += n;
  }
  return flags.fua ? flush() : 0;
}

int VhdDevice::trim(uint64_t offset, uint64_t length, bool fua) {
  if (!file_->writable()) return EPERM;
  // A trim gives host space back without touching metadata: the range's data
  // in allocated blocks is punched out of the file and reads as zeros. The
  // BAT and the sector bitmaps stay as they are, so a parent never shows
  // through where the child had data, blocks are never freed (VHD has no
  // online way to) and the file keeps its footer. Unallocated blocks hold
  // nothing to give back.
  int r = 0;
  if (!dynamic()) {
    r = file_->punch_hole(offset, length);
  } else {
    for (uint64_t pos = offset, end = offset + length; pos < end && r == 0;) {
      uint64_t block = pos / block_size_;
      uint64_t off_in = pos % block_size_;
      uint64_t n = std::min<uint64_t>(end - pos, block_size_ - off_in);
      uint32_t entry = bat_entry(block);
      if (entry != kUnallocated) {
        r = file_->punch_hole(uint64_t{entry} * kSector + bitmap_bytes_ + off_in, n);
      }
      pos += n;
    }
  }
  if (r == ENOTSUP || r == EOPNOTSUPP) r = 0;  // trim is advisory: nothing given back
  if (r) return r;
  return fua ? flush() : 0;
}

int VhdDevice::flush() {
  if (!file_->writable()) return 0;
  MutexLock flush_lock(flush_mutex_);
  // Take the dirty bitmaps first: the data behind every bit in them was
  // written before the bit was set, so the sync below makes it durable
  // before the bitmaps go to disk. Bits set later wait for the next flush.
  struct Pending {
    uint64_t block;
    uint32_t entry;
    Bitmap bitmap;
  };
  std::vector<Pending> dirty;
  {
    MutexLock lock(meta_mutex_);
    for (uint64_t block : dirty_bitmaps_) {
      auto it = bitmaps_.find(block);
      if (it != bitmaps_.end()) dirty.push_back({block, bat_[block], it->second.first});
    }
    dirty_bitmaps_.clear();
  }
  int r = file_->sync();
  for (size_t i = 0; r == 0 && i < dirty.size(); ++i) {
    r = write_bytes(*file_, uint64_t{dirty[i].entry} * kSector, dirty[i].bitmap->data(),
                    bitmap_bytes_);
  }
  if (r == 0 && !dirty.empty()) r = file_->sync();
  if (r != 0 && !dirty.empty()) {
    // Not known to be on disk: keep them dirty for the next attempt.
    MutexLock lock(meta_mutex_);
    for (const auto& p : dirty) dirty_bitmaps_.insert(p.block);
  }
  return r;
}

VhdDevice::~VhdDevice() {
  bool pending;
  {
    MutexLock lock(meta_mutex_);
    pending = !dirty_bitmaps_.empty();
  }
  if (pending && flush() != 0) {
    spdlog::error("{}: could not write sector bitmaps on close", path());
  }
}

// ---- block status -----------------------------------------------------------

int VhdDevice::extents_below(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  const Extent none{.length = 0, .hole = true, .zero = true, .depth = 0};
  uint64_t psize = differencing() && parent_ ? parent_->size() : 0;
  uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end && pos < psize) {
    std::vector<Extent> tmp;
    uint64_t want = std::min(end, psize) - pos;
    if (int r = parent_->extents(pos, want, tmp)) return r;
    uint64_t got = 0;
    for (Extent e : tmp) {
      if (got >= want) break;
      e.length = std::min(e.length, want - got);
      if (e.depth > 0) e.depth += 1;
      append_extent(out, e);
      got += e.length;
    }
    if (got == 0) return EIO;
    pos += got;
  }
  if (pos < end) {
    Extent e = none;
    e.length = end - pos;
    append_extent(out, e);
  }
  return 0;
}

int VhdDevice::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  const Extent data{.length = 0, .hole = false, .zero = false, .depth = 1};
  if (!dynamic()) return fixed_extents(offset, length, out);
  const uint64_t end = offset + length;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t block = pos / block_size_;
    uint64_t off_in = pos % block_size_;
    uint64_t n = std::min<uint64_t>(end - pos, block_size_ - off_in);
    uint64_t run = unallocated_run(block, (off_in + (end - pos) + block_size_ - 1) / block_size_);
    uint32_t entry = run > 0 ? kUnallocated : bat_entry(block);
    if (entry == kUnallocated) {
      n = std::min<uint64_t>(end - pos, run * block_size_ - off_in);
      if (int r = extents_below(pos, n, out)) return r;
    } else {
      Bitmap bm;
      if (int r = get_bitmap(block, entry, bm)) return r;
      uint64_t s = off_in / kSector;
      const uint64_t s_end = (off_in + n + kSector - 1) / kSector;
      while (s < s_end) {
        bool present = bit(bm->data(), s);
        uint64_t t = run_end(bm->data(), s, s_end, present);
        uint64_t lo = std::max(s * kSector, off_in);
        uint64_t hi = std::min(t * kSector, off_in + n);
        if (present) {
          Extent e = data;
          e.length = hi - lo;
          append_extent(out, e);
        } else if (int r = extents_below(block * block_size_ + lo, hi - lo, out)) {
          return r;
        }
        s = t;
      }
    }
    pos += n;
  }
  return 0;
}

int VhdDevice::fixed_extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  // A fixed disk is allocated everywhere; file-system holes read as zeros.
  const uint64_t end = offset + length;
  while (offset < end) {
    int64_t d = file_->seek_data(offset);
    uint64_t data_at = d == -ENXIO ? end : d < 0 ? offset : static_cast<uint64_t>(d);
    if (data_at > offset) {
      uint64_t n = std::min(data_at, end) - offset;
      append_extent(out, {.length = n, .hole = true, .zero = true, .depth = 0});
      offset += n;
      continue;
    }
    int64_t h = d < 0 ? -1 : file_->seek_hole(offset);
    uint64_t hole_at = h < 0 ? end : std::max<uint64_t>(static_cast<uint64_t>(h), offset + 1);
    uint64_t n = std::min(hole_at, end) - offset;
    append_extent(out, {.length = n, .hole = false, .zero = false, .depth = 1});
    offset += n;
  }
  return 0;
}

std::vector<Child> VhdDevice::children() const {
  if (parent_) return {Child{ChildRole::backing, parent_, "parent"}};
  return {};
}

DeviceCounters VhdDevice::counters() const {
  DeviceCounters c;
  c.caches.push_back({.cache = "bitmap",
                      .hits = bitmap_hits_.load(std::memory_order_relaxed),
                      .misses = bitmap_misses_.load(std::memory_order_relaxed),
                      .evictions = bitmap_evictions_.load(std::memory_order_relaxed)});
  c.allocation_unit = "block";
  c.allocations = allocations_.load(std::memory_order_relaxed);
  return c;
}

std::string VhdDevice::stats() const {
  return "vhd bitmap cache: " + std::to_string(bitmap_hits_.load()) + " hits, " +
         std::to_string(bitmap_misses_.load()) + " misses; " + std::to_string(allocations_.load()) +
         " blocks allocated";
}

}  // namespace strata::vhd
