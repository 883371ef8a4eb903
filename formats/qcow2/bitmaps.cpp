// qcow2 persistent dirty bitmaps on an open image (the format rules are in
// bitmap.h): loaded and validated at open, marked IN_USE on disk before the
// first write, set by every write, zero write and trim, stored at a clean
// close; and the image tool's verbs (add, remove, clear, enable, disable).
//
// Why IN_USE and not a write of the bitmap before each acknowledgement: the
// bits of an enabled bitmap change with nearly every write, and a metadata
// write plus sync per request would cost what the bitmap is meant to save.
// QEMU does the same: a bitmap on disk is exact when IN_USE is clear, and
// after a crash it is reported inconsistent, never silently short.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "formats/endian.h"
#include "formats/qcow2/qcow2.h"

namespace strata::qcow2 {
namespace {

constexpr uint64_t kBitmapsExtLength = 24;

const char* const kInUseProblem =
    "in use: it was not stored after its last change (the server stopped without closing "
    "the image, or another program has it open); 'strata bitmap clear' or 'strata bitmap "
    "remove' repairs it";

}  // namespace

// ---- open

void Qcow2Device::load_bitmaps() {
  if (!header_.has_bitmaps_ext) return;
  if (header_.version < 3) {
    bitmap_directory_problem_ = "a version 2 image cannot carry bitmaps";
  } else if (!(header_.autoclear & kAutoclearBitmaps)) {
    bitmap_directory_problem_ =
        "stale: a program without bitmap support wrote the image (autoclear bit 0 is clear)";
  } else {
    std::vector<uint8_t> dir(header_.bitmap_directory_size);
    std::vector<BitmapEntry> entries;
    if (read_bytes(*file_, header_.bitmap_directory_offset, dir.data(), dir.size()) != 0) {
      bitmap_directory_problem_ = "cannot read the bitmap directory";
    } else if (std::string why = parse_bitmap_directory(dir, header_.nb_bitmaps, entries);
               !why.empty()) {
      bitmap_directory_problem_ = "bitmap directory: " + why;
    } else {
      bitmaps_usable_ = true;
    }
    std::unordered_set<std::string> names;
    uint64_t memory = 0;
    for (BitmapEntry& e : entries) {
      TrackedBitmap b;
      b.entry = std::move(e);
      const uint64_t bytes = bitmap_bytes(size_, b.entry.granularity_bits);
      if (!names.insert(b.entry.name).second) {
        b.problem = "a bitmap of the same name comes first";
      } else if (bytes <= kMaxBitmapBytes && memory + bytes > kMaxImageBitmapBytes) {
        b.problem = "the bitmaps before it take all the memory an image's bitmaps may (" +
                    std::to_string(kMaxImageBitmapBytes >> 20) + " MiB)";
      } else {
        b.problem = load_bitmap(b);
        if (b.bits) memory += bytes;
      }
      if (!b.problem.empty())
        spdlog::warn("{}: bitmap '{}' cannot be used: {}", path(), b.entry.name, b.problem);
      bitmaps_.push_back(std::move(b));
    }
  }
  if (!bitmap_directory_problem_.empty())
    spdlog::warn("{}: the bitmaps are not used: {}", path(), bitmap_directory_problem_);
}

// What a bitmap structure at [offset, offset + bytes) overlaps, as "overlaps
// the ...", or "" (read-only opens build no metadata map and check nothing).
std::string Qcow2Device::bitmap_overlap_locked(uint64_t offset, uint64_t bytes) const {
  if (read_only_) return {};
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t count = (bytes + cluster_size_ - 1) >> cluster_bits_;
  if (uint16_t k = metadata_map_.kinds(first, count))
    return "overlaps the " + describe_meta_kinds(k);
  return {};
}

// Validates one bitmap and its table; loads its bits when it is consistent.
// Its clusters are recorded as metadata (read-write opens) once they are
// known not to overlap anything else, so guest data never lands on them.
std::string Qcow2Device::load_bitmap(TrackedBitmap& b) {
  const BitmapEntry& e = b.entry;
  const uint64_t file_size = static_cast<uint64_t>(std::max<int64_t>(0, file_->size()));
  if (std::string why = bitmap_entry_problem(e, size_, cluster_bits_, file_size); !why.empty())
    return why;
  std::vector<uint8_t> raw(uint64_t{e.table_size} * 8);
  if (read_bytes(*file_, e.table_offset, raw.data(), raw.size()) != 0)
    return "cannot read its table";
  if (std::string why = bitmap_overlap_locked(e.table_offset, raw.size()); !why.empty())
    return "its table " + why;
  std::vector<uint64_t> table(e.table_size);
  std::unordered_set<uint64_t> clusters;
  for (uint64_t k = 0; k < e.table_size; ++k) {
    table[k] = load_be64(raw.data() + k * 8);
    const BitmapTableEntry d = decode_bitmap_table_entry(table[k], cluster_bits_);
    if (!d.valid) return "table entry " + std::to_string(k) + " is invalid";
    if (!d.host) continue;
    if (d.host >= file_size) return "table entry " + std::to_string(k) + " lies past the end";
    if (std::string why = bitmap_overlap_locked(d.host, cluster_size_); !why.empty())
      return "data cluster " + std::to_string(k) + " " + why;
    if (!clusters.insert(d.host).second)
      return "data cluster " + std::to_string(k) + " is used twice";
  }
  b.table = std::move(table);
  if (!read_only_) {
    for (uint64_t c = 0; c < raw.size(); c += cluster_size_)
      metadata_map_.add_cluster((e.table_offset + c) >> cluster_bits_, kMetaBitmap);
    for (uint64_t host : clusters) metadata_map_.add_cluster(host >> cluster_bits_, kMetaBitmap);
  }
  if (e.in_use()) return kInUseProblem;

  auto bits = std::make_unique<DirtyBitmap>(size_, e.granularity_bits);
  const uint64_t per_cluster = cluster_size_ * 8;
  std::vector<uint8_t> data(cluster_size_);
  for (uint64_t k = 0; k < e.table_size; ++k) {
    const BitmapTableEntry d = decode_bitmap_table_entry(b.table[k], cluster_bits_);
    if (d.all_set) bits->set_granules(k * per_cluster, per_cluster);
    if (!d.host) continue;
    if (read_bytes(*file_, d.host, data.data(), data.size()) != 0)
      return "cannot read data cluster " + std::to_string(k);
    bits->load(k * per_cluster, data);
  }
  b.bits = std::move(bits);
  return {};
}

// ---- writing

int Qcow2Device::begin_writing_once() {
  if (writing_begun_.load()) return 0;
  WriterLock lk(mu_);
  if (writing_begun_) return 0;
  // Unknown autoclear features are cleared, as the spec asks of a program
  // that does not maintain them; the bitmaps bit stays only when we do.
  const uint64_t kept = kAutoclearDataFileRaw | (bitmaps_usable_ ? kAutoclearBitmaps : 0);
  const uint64_t autoclear = header_.autoclear & kept;
  if (bitmaps_usable_) {
    if (int r = set_bitmaps_in_use_locked()) return r;
  }
  if (header_.version >= 3 && autoclear != header_.autoclear) {
    uint8_t b[8];
    store_be64(b, autoclear);
    if (int r = write_metadata_locked(kOffAutoclear, b, 8, kMetaHeader)) return r;
    if (int r = file_->sync()) return r;
    spdlog::info("{}: cleared autoclear features {:#x}", path(), header_.autoclear & ~autoclear);
    header_.autoclear = autoclear;
  }
  writing_begun_ = true;
  return 0;
}

// Every bitmap that writes would make stale gets IN_USE on disk: the enabled
// consistent ones (tracked from now on) and every one that cannot be used
// (so that no reader trusts it). Disabled consistent bitmaps are untouched.
int Qcow2Device::set_bitmaps_in_use_locked() {
  bool changed = false;
  for (TrackedBitmap& b : bitmaps_) {
    const bool consistent = b.problem.empty();
    if (consistent && !b.entry.enabled()) continue;
    if (!b.entry.in_use()) {
      b.entry.flags |= kBitmapInUse;
      changed = true;
    }
  }
  if (changed) {
    if (int r = write_bitmap_directory_locked()) return r;
  }
  for (TrackedBitmap& b : bitmaps_) b.tracking = b.problem.empty() && b.entry.enabled();
  return 0;
}

void Qcow2Device::mark_dirty(uint64_t offset, uint64_t length) {
  for (TrackedBitmap& b : bitmaps_) {
    if (b.tracking) b.bits->mark(offset, length);
  }
}

// ---- close

int Qcow2Device::store_bitmaps_locked() {
  if (!writing_begun_ || read_only_ || corrupt_) return 0;
  std::vector<TrackedBitmap*> tables;  // whose table gained data clusters
  bool any = false;
  for (TrackedBitmap& b : bitmaps_) {
    if (!b.tracking) continue;
    any = true;
    bool table_changed = false;
    if (int r = store_bitmap_data_locked(b, table_changed)) return r;
    if (table_changed) tables.push_back(&b);
  }
  if (!any) return 0;
  // The data, and the refcounts of new data clusters, durable before a
  // table points at them; the tables durable before IN_USE is cleared.
  if (int r = flush_locked()) return r;
  for (TrackedBitmap* b : tables) {
    if (int r = write_bitmap_table_locked(*b)) return r;
  }
  if (!tables.empty()) {
    if (int r = file_->sync()) return r;
  }
  for (TrackedBitmap& b : bitmaps_) {
    if (b.tracking) b.entry.flags &= ~kBitmapInUse;
  }
  return write_bitmap_directory_locked();
}

// Writes each chunk of the bitmap that is not all clear to its data cluster,
// allocating one where the table has none (the table in memory only: its
// caller writes it once the new clusters' refcounts are durable).
int Qcow2Device::store_bitmap_data_locked(TrackedBitmap& b, bool& table_changed) {
  const uint64_t per_cluster = cluster_size_ * 8;
  std::vector<uint8_t> data(cluster_size_);
  for (uint64_t k = 0; k < b.table.size(); ++k) {
    const uint64_t first = k * per_cluster;
    const uint64_t n = std::min(per_cluster, b.bits->granules() - first);
    const uint64_t set = b.bits->count(first, n);
    const BitmapTableEntry d = decode_bitmap_table_entry(b.table[k], cluster_bits_);
    if (!d.host && ((set == 0 && !d.all_set) || (set == n && d.all_set))) continue;
    uint64_t host = d.host;
    if (!host) {
      bool fresh = false;
      if (int r = alloc_cluster_locked(host, fresh)) return r;
      metadata_map_.add_cluster(host >> cluster_bits_, kMetaBitmap);
      b.table[k] = host;
      table_changed = true;
    }
    std::fill(data.begin(), data.end(), 0);
    b.bits->store(first, data);
    if (int r = write_metadata_locked(host, data.data(), data.size(), kMetaBitmap)) return r;
  }
  return 0;
}

int Qcow2Device::write_bitmap_table_locked(const TrackedBitmap& b) {
  std::vector<uint8_t> raw(b.table.size() * 8);
  for (uint64_t k = 0; k < b.table.size(); ++k) store_be64(raw.data() + k * 8, b.table[k]);
  return write_metadata_locked(b.entry.table_offset, raw.data(), raw.size(), kMetaBitmap);
}

// ---- the directory and the header extension

// Writes the directory of bitmaps_: in place when only flags changed, else
// into new clusters, then the header extension pointing at it, then the old
// clusters freed (so a crash leaves either directory whole, and leaks at
// worst).
int Qcow2Device::write_bitmap_directory_locked() {
  std::vector<BitmapEntry> entries;
  for (const TrackedBitmap& b : bitmaps_) entries.push_back(b.entry);
  const std::vector<uint8_t> bytes = encode_bitmap_directory(entries);
  if (header_.has_bitmaps_ext && bytes.size() == header_.bitmap_directory_size &&
      entries.size() == header_.nb_bitmaps) {
    if (int r = write_metadata_locked(header_.bitmap_directory_offset, bytes.data(), bytes.size(),
                                      kMetaBitmapDirectory))
      return r;
    return file_->sync();
  }
  uint64_t offset = 0;
  if (!bytes.empty()) {
    if (int r = alloc_zeroed_clusters_locked(bytes.size(), offset)) return r;
    if (int r = write_metadata_locked(offset, bytes.data(), bytes.size(), kMetaBitmapDirectory))
      return r;
  }
  if (int r = flush_locked()) return r;
  const uint64_t old_offset = header_.has_bitmaps_ext ? header_.bitmap_directory_offset : 0;
  const uint64_t old_size = header_.has_bitmaps_ext ? header_.bitmap_directory_size : 0;
  if (int r = write_bitmaps_extension_locked(offset, bytes.size(),
                                             static_cast<uint32_t>(entries.size())))
    return r;
  update_metadata_ranges();
  for (uint64_t c = 0; old_offset && c < old_size; c += cluster_size_)
    pending_frees_.push_back((old_offset + c) >> cluster_bits_);
  return flush_locked();
}

// Rewrites the header extensions of cluster 0 with the bitmaps extension set
// to (offset, size, count), or without it when count is 0, and the bitmaps
// autoclear bit to match. Every other extension and the backing file name
// are kept byte for byte.
int Qcow2Device::write_bitmaps_extension_locked(uint64_t offset, uint64_t size, uint32_t count) {
  std::vector<uint8_t> c0(cluster_size_);
  if (int r = read_bytes(*file_, 0, c0.data(), c0.size())) return r;
  const uint64_t area_end =
      header_.backing_file_offset ? header_.backing_file_offset : cluster_size_;
  std::vector<uint8_t> out(c0.begin(), c0.begin() + header_.header_length);
  auto append_ext = [&](uint32_t type, const uint8_t* p, uint32_t len) {
    const size_t at = out.size();
    out.resize(at + 8 + ((uint64_t{len} + 7) & ~uint64_t{7}), 0);
    store_be32(out.data() + at, type);
    store_be32(out.data() + at + 4, len);
    if (len) std::memcpy(out.data() + at + 8, p, len);
  };
  for (uint64_t pos = header_.header_length; pos + 8 <= area_end;) {
    const uint32_t type = load_be32(c0.data() + pos);
    const uint32_t len = load_be32(c0.data() + pos + 4);
    if (type == 0 || len > area_end - pos - 8) break;  // the end (validated at open)
    if (type != kExtBitmaps) append_ext(type, c0.data() + pos + 8, len);
    pos += 8 + ((uint64_t{len} + 7) & ~uint64_t{7});
  }
  if (count) {
    uint8_t ext[kBitmapsExtLength] = {};
    store_be32(ext, count);
    store_be64(ext + 8, size);
    store_be64(ext + 16, offset);
    append_ext(kExtBitmaps, ext, kBitmapsExtLength);
  }
  out.resize(out.size() + 8, 0);  // end of the extensions
  uint64_t backing_offset = 0;
  if (header_.backing_file_offset) {
    backing_offset = out.size();
    out.insert(out.end(), c0.begin() + header_.backing_file_offset,
               c0.begin() + header_.backing_file_offset + header_.backing_file_size);
  }
  if (out.size() > cluster_size_) return ENOSPC;  // the header cluster is full
  out.resize(cluster_size_, 0);
  store_be64(out.data() + kOffBackingFileOffset, backing_offset);
  const uint64_t autoclear =
      count ? header_.autoclear | kAutoclearBitmaps : header_.autoclear & ~kAutoclearBitmaps;
  store_be64(out.data() + kOffAutoclear, autoclear);
  if (int r = write_metadata_locked(0, out.data(), out.size(), kMetaHeader)) return r;
  if (int r = file_->sync()) return r;
  header_.backing_file_offset = backing_offset;
  header_.autoclear = autoclear;
  header_.has_bitmaps_ext = count != 0;
  header_.nb_bitmaps = count;
  header_.bitmap_directory_size = count ? size : 0;
  header_.bitmap_directory_offset = count ? offset : 0;
  bitmaps_usable_ = true;
  bitmap_directory_problem_.clear();
  return 0;
}

// `bytes` rounded up to clusters, contiguous, zeroed, refcounted; new
// clusters at the end of the file (a table or directory must be one run).
int Qcow2Device::alloc_zeroed_clusters_locked(uint64_t bytes, uint64_t& offset) {
  if (corrupt_) return EIO;
  const uint64_t count = (bytes + cluster_size_ - 1) >> cluster_bits_;
  const uint64_t first = first_unused_cluster_;
  if ((first + count) << cluster_bits_ >= kMaxHostOffset) return ENOSPC;
  if (int r = check_new_clusters_locked(first, count, "a bitmap structure")) return r;
  first_unused_cluster_ = first + count;
  for (uint64_t c = first; c < first + count; ++c) {
    if (int r = set_refcount_locked(c, 1)) return r;
  }
  offset = first << cluster_bits_;
  const std::vector<uint8_t> zeros(cluster_size_, 0);
  for (uint64_t c = 0; c < count; ++c) {
    if (int r = write_bytes(*file_, offset + (c << cluster_bits_), zeros.data(), zeros.size()))
      return r;
  }
  return 0;
}

// Queues the data clusters of `table` (validated table entries) to be freed
// and takes them out of the metadata map.
void Qcow2Device::free_bitmap_data_locked(const std::vector<uint64_t>& table) {
  for (uint64_t raw : table) {
    const BitmapTableEntry d = decode_bitmap_table_entry(raw, cluster_bits_);
    if (!d.host) continue;
    metadata_map_.remove_cluster(d.host >> cluster_bits_, kMetaBitmap);
    pending_frees_.push_back(d.host >> cluster_bits_);
  }
}

// The same for every cluster of the bitmap: its data and its table. Only
// for a bitmap whose table was validated.
void Qcow2Device::free_bitmap_clusters_locked(const TrackedBitmap& b) {
  free_bitmap_data_locked(b.table);
  const uint64_t bytes = uint64_t{b.entry.table_size} * 8;
  for (uint64_t c = 0; c < bytes; c += cluster_size_) {
    metadata_map_.remove_cluster((b.entry.table_offset + c) >> cluster_bits_, kMetaBitmap);
    pending_frees_.push_back((b.entry.table_offset + c) >> cluster_bits_);
  }
}

// The bitmap a verb edits, or nullptr with `error` saying why not.
Qcow2Device::TrackedBitmap* Qcow2Device::bitmap_to_edit_locked(const std::string& name,
                                                               std::string& error) {
  if (read_only_) {
    error = "the image is open read-only";
    return nullptr;
  }
  TrackedBitmap* b = find_bitmap(name);
  if (!b) error = "no bitmap named '" + name + "'";
  return b;
}

Qcow2Device::TrackedBitmap* Qcow2Device::find_bitmap(const std::string& name) {
  for (TrackedBitmap& b : bitmaps_) {
    if (b.entry.name == name) return &b;
  }
  return nullptr;
}

// ---- export

std::vector<std::string> Qcow2Device::dirty_bitmaps() const {
  std::vector<std::string> names;
  for (const TrackedBitmap& b : bitmaps_) {
    if (b.bits) names.push_back(b.entry.name);
  }
  return names;
}

int Qcow2Device::dirty_extents(std::string_view name, uint64_t offset, uint64_t length,
                               std::vector<DirtyRun>& out) {
  for (const TrackedBitmap& b : bitmaps_) {
    if (b.bits && b.entry.name == name) {
      // Replies stay bounded whatever the request length: at most this many
      // runs (qemu-nbd's limit), the client asks again for the rest.
      constexpr size_t kMaxRuns = size_t{128} * 1024;
      b.bits->runs(offset, length, out, kMaxRuns);
      return 0;
    }
  }
  return ENOENT;
}

// ---- the image tool's verbs

std::vector<Qcow2Device::BitmapStatus> Qcow2Device::bitmap_list() const {
  std::vector<BitmapStatus> out;
  for (const TrackedBitmap& b : bitmaps_) out.push_back({b.entry, b.problem});
  return out;
}

std::string Qcow2Device::bitmap_add(const std::string& name, uint32_t granularity_bits,
                                    bool enabled) {
  WriterLock lk(mu_);
  if (read_only_) return "the image is open read-only";
  if (header_.version < 3)
    return "bitmaps need a version 3 image (qemu-img amend -o compat=1.1 upgrades it)";
  if (!bitmap_directory_problem_.empty() && header_.has_bitmaps_ext)
    return "the bitmaps of this image cannot be used: " + bitmap_directory_problem_;
  if (std::string why = bitmap_name_problem(name); !why.empty()) return why;
  if (find_bitmap(name)) return "a bitmap named '" + name + "' exists already";
  if (granularity_bits < kMinGranularityBits || granularity_bits > kMaxGranularityBits) {
    return "the granularity must be a power of two from " +
           std::to_string(uint64_t{1} << kMinGranularityBits) + " to " +
           std::to_string(uint64_t{1} << kMaxGranularityBits) + " bytes";
  }
  if (bitmaps_.size() >= kMaxBitmaps) return "the image has the most bitmaps it can have";
  TrackedBitmap b;
  b.entry.flags = enabled ? kBitmapAuto : 0;
  b.entry.granularity_bits = static_cast<uint8_t>(granularity_bits);
  b.entry.name = name;
  const uint64_t entries = bitmap_table_entries(size_, granularity_bits, cluster_bits_);
  if (entries > kMaxBitmapTableEntries || bitmap_bytes(size_, granularity_bits) > kMaxBitmapBytes)
    return "the bitmap would be too large for this disk: choose a coarser granularity";
  b.entry.table_size = static_cast<uint32_t>(entries);
  if (int r = alloc_zeroed_clusters_locked(entries * 8, b.entry.table_offset))
    return std::strerror(r);
  for (uint64_t c = 0; c < entries * 8; c += cluster_size_)
    metadata_map_.add_cluster((b.entry.table_offset + c) >> cluster_bits_, kMetaBitmap);
  b.table.assign(entries, 0);
  b.bits = std::make_unique<DirtyBitmap>(size_, granularity_bits);
  bitmaps_.push_back(std::move(b));
  if (int r = write_bitmap_directory_locked()) return std::strerror(r);
  return {};
}

std::string Qcow2Device::bitmap_remove(const std::string& name) {
  WriterLock lk(mu_);
  std::string error;
  TrackedBitmap* b = bitmap_to_edit_locked(name, error);
  if (!b) return error;
  TrackedBitmap gone = std::move(*b);
  bitmaps_.erase(bitmaps_.begin() + (b - bitmaps_.data()));
  // The directory without it first; its clusters are freed once that is
  // durable (a bitmap that could not be validated leaks them).
  if (int r = write_bitmap_directory_locked()) return std::strerror(r);
  if (!gone.table.empty()) {
    free_bitmap_clusters_locked(gone);
    if (int r = flush_locked()) return std::strerror(r);
  }
  return {};
}

std::string Qcow2Device::bitmap_clear(const std::string& name) {
  WriterLock lk(mu_);
  std::string error;
  TrackedBitmap* b = bitmap_to_edit_locked(name, error);
  if (!b) return error;
  if (b->table.empty() && !b->problem.empty())
    return "bitmap '" + name + "' cannot be cleared (" + b->problem + "); remove it";
  // The table all clear and IN_USE cleared, then the data clusters freed.
  const std::vector<uint64_t> old_table = b->table;
  std::fill(b->table.begin(), b->table.end(), 0);
  if (int r = write_bitmap_table_locked(*b)) return std::strerror(r);
  if (int r = file_->sync()) return std::strerror(r);
  b->entry.flags &= ~kBitmapInUse;
  b->problem.clear();
  b->bits = std::make_unique<DirtyBitmap>(size_, b->entry.granularity_bits);
  if (int r = write_bitmap_directory_locked()) return std::strerror(r);
  free_bitmap_data_locked(old_table);
  if (int r = flush_locked()) return std::strerror(r);
  return {};
}

std::string Qcow2Device::bitmap_enable(const std::string& name, bool enabled) {
  WriterLock lk(mu_);
  std::string error;
  TrackedBitmap* b = bitmap_to_edit_locked(name, error);
  if (!b) return error;
  if (!b->problem.empty()) return "bitmap '" + name + "' cannot be used: " + b->problem;
  b->entry.flags = enabled ? (b->entry.flags | kBitmapAuto) : (b->entry.flags & ~kBitmapAuto);
  if (int r = write_bitmap_directory_locked()) return std::strerror(r);
  return {};
}

}  // namespace strata::qcow2
