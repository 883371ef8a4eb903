// qcow2: reference counting from the metadata (for `strata check` and for the
// refcount rebuild of dirty images).
#include <algorithm>
#include <cstring>

#include "formats/endian.h"
#include "formats/qcow2/qcow2.h"

namespace strata::qcow2 {

void Qcow2Device::count_references(std::vector<uint64_t>& counts, CheckReport& report,
                                   bool include_refcount_structures, bool report_past_eof) {
  const uint64_t fsize = static_cast<uint64_t>(std::max<int64_t>(file_->size(), 0));
  const uint64_t nclusters = (fsize + cluster_size_ - 1) / cluster_size_;
  // Beyond this a reference is not counted (the counts would not fit in memory).
  const uint64_t limit = nclusters + std::max<uint64_t>(16, (64ull << 20) / cluster_size_);
  counts.assign(nclusters, 0);
  auto add = [&](uint64_t off, uint64_t len, const std::string& what) {
    if (len == 0) return;
    if (off >= kMaxHostOffset || len > kMaxHostOffset || off + len > kMaxHostOffset) {
      report.errors.push_back(what + ": offset " + std::to_string(off) + " is invalid");
      return;
    }
    uint64_t first = off >> cluster_bits_, last = (off + len - 1) >> cluster_bits_;
    if (last >= limit) {
      report.errors.push_back(what + ": offset " + std::to_string(off) +
                              " is beyond the end of the file");
      return;
    }
    // The last cluster may be partly written (tables are not padded), so a
    // reference is only lost when it ends a whole cluster or more past EOF
    // (qemu-img check's rule). It is still counted: the cluster is in use.
    if (report_past_eof && off + len >= fsize + cluster_size_) {
      report.errors.push_back(what + ": offset " + std::to_string(off) + " size " +
                              std::to_string(len) +
                              " lies past the end of the file (truncated image?)");
    }
    if (last >= counts.size()) counts.resize(last + 1, 0);
    for (uint64_t c = first; c <= last; ++c) ++counts[c];
  };

  add(0, cluster_size_, "header");
  std::vector<uint8_t> l2(cluster_size_);
  auto walk_l1 = [&](const std::vector<uint64_t>& l1, const std::string& name) {
    for (uint64_t i = 0; i < l1.size(); ++i) {
      uint64_t l1e = l1[i];
      uint64_t off = l1e & kL1OffsetMask;
      if (off == 0) continue;
      std::string where = name + " L1 entry " + std::to_string(i);
      if ((l1e & kL1ReservedMask) || off % cluster_size_) {
        report.errors.push_back(where + ": invalid L2 table offset " + std::to_string(l1e));
        continue;
      }
      add(off, cluster_size_, where + " L2 table");
      if ((off >> cluster_bits_) >= limit) continue;
      if (file_->read_at(off, {reinterpret_cast<std::byte*>(l2.data()), l2.size()}) != 0) {
        report.errors.push_back(where + ": cannot read the L2 table");
        continue;
      }
      for (uint64_t j = 0; j < l2_entries_; ++j) {
        uint64_t e = load_be64(l2.data() + j * l2_entry_bytes_);
        if (e == 0) continue;
        std::string ew = name + " L2 entry " + std::to_string(i * l2_entries_ + j);
        const L2Entry d = classify(e);
        if (d.compressed()) {
          if (external_data_file_) {
            report.errors.push_back(ew + ": compressed cluster in an image with a data file");
            continue;
          }
          const CompressedDescriptor desc = parse_compressed_descriptor(e, cluster_bits_);
          add(desc.first_byte(), desc.span(), ew + " compressed data");
          continue;
        }
        if (d.type == ClusterType::invalid) {
          report.errors.push_back(ew + ": invalid entry " + std::to_string(e));
          continue;
        }
        if (d.host && !external_data_file_) add(d.host, cluster_size_, ew + " data cluster");
      }
    }
  };
  add(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, "L1 table");
  walk_l1(l1_table_, "active");
  if (header_.nb_snapshots) {
    add(header_.snapshots_offset, snapshot_table_bytes_, "snapshot table");
    for (const auto& s : snapshots_) {
      add(s.l1_offset, uint64_t{s.l1_size} * 8, "snapshot '" + s.name + "' L1 table");
      std::vector<uint64_t> l1(s.l1_size);
      std::vector<uint8_t> raw(uint64_t{s.l1_size} * 8);
      if (!raw.empty() && file_->read_at(s.l1_offset, {reinterpret_cast<std::byte*>(raw.data()),
                                                       raw.size()}) != 0) {
        report.errors.push_back("snapshot '" + s.name + "': cannot read its L1 table");
        continue;
      }
      for (uint64_t i = 0; i < s.l1_size; ++i) l1[i] = load_be64(raw.data() + i * 8);
      walk_l1(l1, "snapshot '" + s.name + "'");
    }
  }
  if (header_.has_bitmaps_ext && header_.bitmap_directory_size) {
    add(header_.bitmap_directory_offset, header_.bitmap_directory_size, "bitmap directory");
    std::vector<uint8_t> dir(header_.bitmap_directory_size);
    if (file_->read_at(header_.bitmap_directory_offset,
                       {reinterpret_cast<std::byte*>(dir.data()), dir.size()}) == 0) {
      uint64_t pos = 0;
      for (uint32_t i = 0; i < header_.nb_bitmaps && pos + 24 <= dir.size(); ++i) {
        uint64_t toff = load_be64(dir.data() + pos);
        uint32_t tsize = load_be32(dir.data() + pos + 8);
        uint16_t name_size = load_be16(dir.data() + pos + 18);
        uint32_t extra = load_be32(dir.data() + pos + 20);
        add(toff, uint64_t{tsize} * 8, "bitmap table");
        std::vector<uint8_t> tbl(std::min<uint64_t>(uint64_t{tsize} * 8, 64ull << 20));
        if (!tbl.empty() &&
            file_->read_at(toff, {reinterpret_cast<std::byte*>(tbl.data()), tbl.size()}) == 0) {
          for (uint64_t k = 0; k + 8 <= tbl.size(); k += 8) {
            uint64_t be = load_be64(tbl.data() + k) & 0x00fffffffffffe00ull;
            if (be) add(be, cluster_size_, "bitmap data");
          }
        }
        pos += (24 + uint64_t{extra} + name_size + 7) & ~uint64_t{7};
      }
    }
  }
  if (include_refcount_structures) {
    add(refcount_table_offset_, refcount_table_clusters_ * cluster_size_, "refcount table");
    for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
      uint64_t off = refcount_table_[i] & kRefTableOffsetMask;
      if (off) add(off, cluster_size_, "refcount block " + std::to_string(i));
    }
  }
}

bool Qcow2Device::check_refcount(uint64_t c, uint64_t used, CheckReport& report, uint64_t& leaked) {
  uint64_t rc = 0;
  if (get_refcount_locked(c, rc) != 0) return false;
  const std::string what = "cluster " + std::to_string(c) + ": refcount " + std::to_string(rc) +
                           " but used " + std::to_string(used) + " times";
  if (rc < used) {
    report.errors.push_back(what);
  } else if (rc > used) {
    ++leaked;
    if (report.leaks.size() < 100) report.leaks.push_back(what);
  }
  return true;
}

// A bitmap that cannot be read is corruption; one left IN_USE (a crash) or a
// directory gone stale is not: QEMU's check reports neither, and the bitmap
// verbs repair them.
void Qcow2Device::check_bitmaps_locked(CheckReport& report) {
  if (!bitmap_directory_problem_.empty()) {
    if (header_.autoclear & kAutoclearBitmaps) {  // a directory in force that cannot be read
      report.errors.push_back("bitmaps: " + bitmap_directory_problem_);
    } else {
      report.notes.push_back("bitmaps: " + bitmap_directory_problem_);
    }
  }
  for (const TrackedBitmap& b : bitmaps_) {
    if (b.problem.empty()) continue;
    const std::string line = "bitmap '" + b.entry.name + "': " + b.problem;
    if (b.entry.in_use() && !b.table.empty()) {
      report.notes.push_back(line);  // its structures are sound
    } else {
      report.errors.push_back(line);
    }
  }
}

void Qcow2Device::check(CheckReport& report) {
  WriterLock lk(mu_);
  if (file_->writable()) {
    if (int r = flush_locked())
      report.errors.push_back(std::string("flush failed: ") + std::strerror(r));
  }
  check_bitmaps_locked(report);
  std::vector<uint64_t> counts;
  count_references(counts, report, true, true);
  const uint64_t covered =
      refcount_table_.size() * refblock_entries_;  // clusters the refcount table can count
  uint64_t leaked = 0;
  for (uint64_t c = 0; c < std::max<uint64_t>(counts.size(), covered);) {
    const uint64_t bi = c / refblock_entries_;
    const uint64_t block_end = (bi + 1) * refblock_entries_;
    if (bi >= refcount_table_.size() || (refcount_table_[bi] & kRefTableOffsetMask) == 0) {
      // No block (or past the table): every refcount in its range is 0.
      for (; c < block_end && c < counts.size(); ++c) {
        if (counts[c]) {
          report.errors.push_back("cluster " + std::to_string(c) + " is used " +
                                  std::to_string(counts[c]) + " times but has no refcount block");
        }
      }
      c = block_end;
      continue;
    }
    if (!check_refcount(c, c < counts.size() ? counts[c] : 0, report, leaked)) {
      report.errors.push_back("refcount block " + std::to_string(bi) + " is unreadable");
      c = block_end;
      continue;
    }
    ++c;
  }
  if (leaked > report.leaks.size())
    report.notes.push_back(std::to_string(leaked) + " leaked clusters in total");
  report.notes.push_back(stats_locked_free());
}

}  // namespace strata::qcow2
