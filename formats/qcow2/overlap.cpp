// qcow2: the overlap check (QEMU's qcow2_check_metadata_overlap) and what
// happens on an inconsistency (QEMU's qcow2_signal_corruption). The policy for
// each kind of damage is written down in docs/CORRUPT-IMAGES.md.
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>

#include "formats/endian.h"
#include "formats/errors.h"
#include "formats/qcow2/qcow2.h"

namespace strata::qcow2 {
namespace {

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string what_it_is(uint16_t kinds) {
  if (kinds == kMetaDuplicate) return "another use of the same cluster";
  return describe_meta_kinds(kinds);
}

}  // namespace

void Qcow2Device::refuse_lost_refcounts() {
  // Refcounts past EOF read as 0, so every cluster they counted would look
  // free and be handed out again while still in use.
  const int64_t fsize = file_->size();
  if (fsize < 0) throw_image_error(path(), "cannot read the file size");
  const uint64_t eof = static_cast<uint64_t>(fsize);
  auto refuse = [&](const std::string& what, uint64_t off) {
    throw_image_error(
        path(), what + " at offset " + hex(off) +
                    " lies past the end of the file (truncated image?): its refcounts are lost; "
                    "open it read-only, or repair it with 'qemu-img check -r all'");
  };
  for (uint64_t k = 0; k < refcount_table_clusters_; ++k) {
    if (refcount_table_offset_ + k * cluster_size_ >= eof)
      refuse("refcount table cluster " + std::to_string(k),
             refcount_table_offset_ + k * cluster_size_);
  }
  for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
    uint64_t off = refcount_table_[i] & kRefTableOffsetMask;
    if (off >= eof) refuse("refcount block " + std::to_string(i), off);
  }
}

void Qcow2Device::update_metadata_ranges() {
  auto range = [&](uint64_t off, uint64_t len, uint16_t kind) {
    uint64_t first = off >> cluster_bits_;
    uint64_t end = len ? (off + len + cluster_size_ - 1) >> cluster_bits_ : first;
    return MetadataMap::Range{first, end - first, kind};
  };
  std::vector<MetadataMap::Range> r;
  r.push_back(range(0, cluster_size_, kMetaHeader));
  r.push_back(range(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, kMetaActiveL1));
  r.push_back(
      range(refcount_table_offset_, refcount_table_clusters_ * cluster_size_, kMetaRefcountTable));
  if (header_.nb_snapshots)
    r.push_back(range(header_.snapshots_offset, snapshot_table_bytes_, kMetaSnapshotTable));
  for (const auto& s : snapshots_)
    r.push_back(range(s.l1_offset, uint64_t{s.l1_size} * 8, kMetaInactiveL1));
  if (header_.has_bitmaps_ext) {
    r.push_back(range(header_.bitmap_directory_offset, header_.bitmap_directory_size,
                      kMetaBitmapDirectory));
  }
  metadata_map_.set_ranges(r);
}

void Qcow2Device::build_metadata_map() {
  metadata_map_ = MetadataMap{};
  update_metadata_ranges();
  for (uint64_t e : l1_table_) {
    uint64_t off = e & kL1OffsetMask;
    if (off && !(e & kL1ReservedMask) && host_cluster_valid(off))
      metadata_map_.add_cluster(off >> cluster_bits_, kMetaActiveL2);
  }
  for (uint64_t e : refcount_table_) {
    uint64_t off = e & kRefTableOffsetMask;
    if (off && !(e & 0x1ff) && host_cluster_valid(off))
      metadata_map_.add_cluster(off >> cluster_bits_, kMetaRefcountBlock);
  }
}

void Qcow2Device::set_l1_entry_locked(uint64_t index, uint64_t entry) {
  uint64_t old = l1_table_[index] & kL1OffsetMask;
  uint64_t now = entry & kL1OffsetMask;
  if (old != now) {
    if (old) metadata_map_.remove_cluster(old >> cluster_bits_, kMetaActiveL2);
    if (now) metadata_map_.add_cluster(now >> cluster_bits_, kMetaActiveL2);
    ++l2_epoch_;
  }
  l1_table_[index] = entry;
  l1_dirty_.insert(index);
}

bool Qcow2Device::overlaps_metadata(uint64_t host) const {
  return !external_data_file_ && metadata_map_.kinds(host >> cluster_bits_, 1) != 0;
}

int Qcow2Device::check_new_clusters_locked(uint64_t first, uint64_t count, const char* purpose) {
  if (corrupt_) return EIO;
  uint16_t k = metadata_map_.kinds(first, count);
  if (k == 0) return 0;
  return signal_corruption_locked("cluster " + std::to_string(first) + " (offset " +
                                  hex(first << cluster_bits_) +
                                  "), free by its refcount, was chosen for " + purpose +
                                  " but is in use as the " + what_it_is(k));
}

int Qcow2Device::check_metadata_write_locked(uint64_t offset, uint64_t length, uint16_t kind) {
  uint64_t first = offset >> cluster_bits_;
  uint64_t end = (offset + length + cluster_size_ - 1) >> cluster_bits_;
  uint16_t k = metadata_map_.kinds(first, end - first) & static_cast<uint16_t>(~kind);
  if (k == 0) return 0;
  return signal_corruption_locked("refusing to write the " + describe_meta_kinds(kind) +
                                  " at offset " + hex(offset) + ": it overlaps the " +
                                  what_it_is(k));
}

int Qcow2Device::check_data_write_locked(uint64_t host) {
  if (!overlaps_metadata(host)) return 0;
  return signal_corruption_locked("refusing to write guest data at offset " + hex(host) +
                                  ": it overlaps the " +
                                  what_it_is(metadata_map_.kinds(host >> cluster_bits_, 1)));
}

int Qcow2Device::check_free_locked(uint64_t cluster, uint64_t refcount) {
  const std::string c =
      "cluster " + std::to_string(cluster) + " (offset " + hex(cluster << cluster_bits_) + ")";
  if (refcount == 0)
    return signal_corruption_locked("freeing " + c + " whose refcount is already 0");
  if (refcount == 1) {
    if (uint16_t k = metadata_map_.kinds(cluster, 1)) {
      return signal_corruption_locked("freeing " + c + " which is still in use as the " +
                                      what_it_is(k));
    }
  }
  return 0;
}

int Qcow2Device::write_metadata_locked(uint64_t offset, const void* data, size_t length,
                                       uint16_t kind) {
  if (int r = check_metadata_write_locked(offset, length, kind)) return r;
  return write_bytes(*file_, offset, data, length);
}

int Qcow2Device::signal_corruption_locked(const std::string& what) {
  read_only_ = true;
  if (corrupt_) return EIO;  // reported once
  corrupt_ = true;
  std::string bit;
  if (header_.version < 3) {
    bit = " (a version 2 image has no corrupt bit)";
  } else {
    header_.incompatible |= kIncompatCorrupt;
    uint8_t b[8];
    store_be64(b, header_.incompatible);
    int r = write_bytes(*file_, kOffIncompat, b, sizeof b);
    if (!r) r = file_->sync();
    if (r) bit = std::string(" (setting the corrupt bit failed: ") + std::strerror(r) + ")";
  }
  spdlog::error("{}: marking image as corrupt: {}; the export is read-only from now on{}", path(),
                what, bit);
  return EIO;
}

}  // namespace strata::qcow2
