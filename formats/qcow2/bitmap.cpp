#include "formats/qcow2/bitmap.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <unordered_set>

#include "formats/endian.h"

namespace strata::qcow2 {
namespace {

constexpr uint64_t kEntryHeaderSize = 24;

uint64_t padded_entry_size(uint64_t extra, uint64_t name) {
  return (kEntryHeaderSize + extra + name + 7) & ~uint64_t{7};
}

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF.
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned c = *p;
    size_t n = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80) {
      ++p;
      continue;
    }
    if ((c & 0xe0) == 0xc0) {
      n = 1, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, cp = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, cp = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (static_cast<size_t>(end - p) <= n) return false;
    for (size_t i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

}  // namespace

uint64_t bitmap_bytes(uint64_t disk_size, uint32_t granularity_bits) {
  if (granularity_bits >= 64) return disk_size ? 1 : 0;  // a hostile value: one granule
  const uint64_t granules = (disk_size >> granularity_bits) +
                            ((disk_size & ((uint64_t{1} << granularity_bits) - 1)) != 0);
  return (granules + 7) / 8;
}

uint64_t bitmap_entry_size(const BitmapEntry& e) {
  return padded_entry_size(e.extra_data.size(), e.name.size());
}

std::string parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t count,
                                   std::vector<BitmapEntry>& out) {
  out.clear();
  std::vector<BitmapEntry> entries;
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (dir.size() - pos < kEntryHeaderSize)
      return "entry " + std::to_string(i) + " runs past the end of the directory";
    const uint8_t* p = dir.data() + pos;
    BitmapEntry e;
    e.table_offset = load_be64(p);
    e.table_size = load_be32(p + 8);
    e.flags = load_be32(p + 12);
    e.type = p[16];
    e.granularity_bits = p[17];
    const uint16_t name_size = load_be16(p + 18);
    const uint32_t extra_size = load_be32(p + 20);
    const uint64_t size = padded_entry_size(extra_size, name_size);
    if (size > dir.size() - pos)
      return "entry " + std::to_string(i) + " runs past the end of the directory";
    e.extra_data.assign(p + kEntryHeaderSize, p + kEntryHeaderSize + extra_size);
    e.name.assign(reinterpret_cast<const char*>(p + kEntryHeaderSize + extra_size), name_size);
    entries.push_back(std::move(e));
    pos += size;
  }
  if (pos != dir.size()) {
    return "its " + std::to_string(count) + " entries take " + std::to_string(pos) +
           " bytes, the header says " + std::to_string(dir.size());
  }
  out = std::move(entries);
  return {};
}

std::vector<uint8_t> encode_bitmap_directory(const std::vector<BitmapEntry>& entries) {
  std::vector<uint8_t> out;
  for (const BitmapEntry& e : entries) {
    const size_t at = out.size();
    out.resize(at + bitmap_entry_size(e), 0);
    uint8_t* p = out.data() + at;
    store_be64(p, e.table_offset);
    store_be32(p + 8, e.table_size);
    store_be32(p + 12, e.flags);
    p[16] = e.type;
    p[17] = e.granularity_bits;
    store_be16(p + 18, static_cast<uint16_t>(e.name.size()));
    store_be32(p + 20, static_cast<uint32_t>(e.extra_data.size()));
    std::copy(e.extra_data.begin(), e.extra_data.end(), p + kEntryHeaderSize);
    std::copy(e.name.begin(), e.name.end(), p + kEntryHeaderSize + e.extra_data.size());
  }
  return out;
}

uint64_t bitmap_flags_position(const std::vector<BitmapEntry>& entries, size_t index) {
  uint64_t pos = 0;
  for (size_t i = 0; i < index; ++i) pos += bitmap_entry_size(entries[i]);
  return pos + 12;
}

uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits,
                              uint32_t cluster_bits) {
  const uint64_t per_cluster = uint64_t{1} << cluster_bits;  // bytes of bits per data cluster
  return (bitmap_bytes(disk_size, granularity_bits) + per_cluster - 1) / per_cluster;
}

std::string bitmap_name_problem(const std::string& name) {
  if (name.empty()) return "the name is empty";
  if (name.size() > kMaxBitmapNameSize)
    return "the name is longer than " + std::to_string(kMaxBitmapNameSize) + " bytes";
  if (!valid_utf8(name)) return "the name is not UTF-8";
  return {};
}

std::string bitmap_entry_problem(const BitmapEntry& e, uint64_t disk_size, uint32_t cluster_bits,
                                 uint64_t file_size) {
  if (std::string why = bitmap_name_problem(e.name); !why.empty()) return why;
  if (e.type != kBitmapTypeDirtyTracking) return "type " + std::to_string(e.type) + " is unknown";
  if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits) {
    return "granularity bits " + std::to_string(e.granularity_bits) + " are outside [" +
           std::to_string(kMinGranularityBits) + ", " + std::to_string(kMaxGranularityBits) + "]";
  }
  if (e.flags & ~kBitmapFlagsKnown) return "unknown flags " + std::to_string(e.flags);
  if (!e.extra_data.empty() && !(e.flags & kBitmapExtraDataCompatible))
    return "it has extra data that is not marked compatible";
  if (bitmap_bytes(disk_size, e.granularity_bits) > kMaxBitmapBytes)
    return "its bits would take more than " + std::to_string(kMaxBitmapBytes >> 20) + " MiB";
  const uint64_t need = bitmap_table_entries(disk_size, e.granularity_bits, cluster_bits);
  if (e.table_size != need) {
    return "table size " + std::to_string(e.table_size) + " does not match the disk (" +
           std::to_string(need) + " entries)";
  }
  if (e.table_size > kMaxBitmapTableEntries) return "its table is too large";
  const uint64_t cluster_mask = (uint64_t{1} << cluster_bits) - 1;
  if (e.table_offset == 0 || (e.table_offset & cluster_mask))
    return "table offset " + std::to_string(e.table_offset) + " is not cluster aligned";
  const uint64_t bytes = uint64_t{e.table_size} * 8;
  if (e.table_offset > file_size || bytes > file_size - e.table_offset)
    return "its table lies past the end of the file";
  return {};
}

BitmapTableEntry decode_bitmap_table_entry(uint64_t raw, uint32_t cluster_bits) {
  BitmapTableEntry d;
  d.host = raw & kBitmapEntryOffsetMask;
  const uint64_t reserved = raw & ~kBitmapEntryOffsetMask;
  if (d.host == 0) {
    d.all_set = reserved == kBitmapEntryAllOnes;
    d.valid = reserved == 0 || reserved == kBitmapEntryAllOnes;
  } else {
    d.valid = reserved == 0 && (d.host & ((uint64_t{1} << cluster_bits) - 1)) == 0;
  }
  return d;
}

DirtyBitmap::DirtyBitmap(uint64_t disk_size, uint32_t granularity_bits)
    : disk_size_(disk_size),
      granularity_bits_(granularity_bits),
      granules_((disk_size + (uint64_t{1} << granularity_bits) - 1) >> granularity_bits),
      word_count_((granules_ + 63) / 64),
      words_(std::make_unique<std::atomic<uint64_t>[]>(word_count_)) {
  for (uint64_t i = 0; i < word_count_; ++i) words_[i].store(0, std::memory_order_relaxed);
}

void DirtyBitmap::set_granules(uint64_t first, uint64_t count) {
  const uint64_t end = std::min(granules_, first + count);
  for (uint64_t g = first; g < end;) {
    const uint64_t w = g / 64, bit = g % 64;
    const uint64_t n = std::min<uint64_t>(64 - bit, end - g);
    const uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
    // Skip the atomic read-modify-write when the bits are set already: a
    // rewrite of dirty data (the common case) then only reads the word.
    if ((word(w) & mask) != mask) words_[w].fetch_or(mask, std::memory_order_relaxed);
    g += n;
  }
}

void DirtyBitmap::mark(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= disk_size_) return;
  const uint64_t last = std::min(offset + length, disk_size_) - 1;
  const uint64_t first_granule = offset >> granularity_bits_;
  set_granules(first_granule, (last >> granularity_bits_) - first_granule + 1);
}

void DirtyBitmap::clear() {
  for (uint64_t i = 0; i < word_count_; ++i) words_[i].store(0, std::memory_order_relaxed);
}

bool DirtyBitmap::test(uint64_t granule) const {
  return granule < granules_ && ((word(granule / 64) >> (granule % 64)) & 1);
}

uint64_t DirtyBitmap::count(uint64_t first, uint64_t n) const {
  uint64_t total = 0;
  const uint64_t end = std::min(granules_, first + n);
  for (uint64_t g = first; g < end;) {
    const uint64_t bit = g % 64;
    const uint64_t k = std::min<uint64_t>(64 - bit, end - g);
    const uint64_t mask = (k == 64 ? ~uint64_t{0} : ((uint64_t{1} << k) - 1)) << bit;
    total += std::popcount(word(g / 64) & mask);
    g += k;
  }
  return total;
}

void DirtyBitmap::runs(uint64_t offset, uint64_t length, std::vector<DirtyRun>& out,
                       size_t max_runs) const {
  const uint64_t end = std::min(disk_size_, offset + length);
  size_t added = 0;
  for (uint64_t pos = offset; pos < end && added < max_runs;) {
    uint64_t g = pos >> granularity_bits_;
    const bool dirty = test(g);
    // The next granule of the other kind: whole words at a time.
    ++g;
    while (g < granules_ && (g << granularity_bits_) < end) {
      const uint64_t w = word(g / 64);
      const uint64_t bits = (dirty ? ~w : w) >> (g % 64);
      if (bits) {
        g += std::countr_zero(bits);
        break;
      }
      g = (g / 64 + 1) * 64;
    }
    const uint64_t stop = std::min(end, g << granularity_bits_);
    if (!out.empty() && added > 0 && out.back().dirty == dirty) {
      out.back().length += stop - pos;
    } else {
      out.push_back({stop - pos, dirty});
      ++added;
    }
    pos = stop;
  }
}

void DirtyBitmap::load(uint64_t first, std::span<const uint8_t> bytes) {
  for (size_t i = 0; i < bytes.size(); i += 8) {
    const uint64_t w = (first / 64) + i / 8;
    if (w >= word_count_) break;
    uint64_t v = 0;
    for (size_t b = 0; b < 8 && i + b < bytes.size(); ++b) v |= uint64_t{bytes[i + b]} << (8 * b);
    if (w == word_count_ - 1 && granules_ % 64) v &= (uint64_t{1} << (granules_ % 64)) - 1;
    words_[w].store(v, std::memory_order_relaxed);
  }
}

void DirtyBitmap::store(uint64_t first, std::span<uint8_t> bytes) const {
  for (size_t i = 0; i < bytes.size(); i += 8) {
    const uint64_t w = (first / 64) + i / 8;
    const uint64_t v = w < word_count_ ? word(w) : 0;
    for (size_t b = 0; b < 8 && i + b < bytes.size(); ++b)
      bytes[i + b] = static_cast<uint8_t>(v >> (8 * b));
  }
}

}  // namespace strata::qcow2
