// `strata info` and `strata check` for VHD: what one layer is made of, and a
// structural check (footers, header, BAT, overlaps, leaked space).
#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "formats/vhd/vhd.h"

namespace strata::vhd {

void VhdDevice::describe(nlohmann::json& out) const {
  out["subformat"] = disk_type_name(footer_.disk_type);
  out["current-size"] = footer_.current_size;
  out["original-size"] = footer_.original_size;
  out["unique-id"] = uuid_string(footer_.unique_id);
  out["creator"] = creator_string(footer_.creator_app);
  out["geometry"] = {
      {"cylinders", footer_.cylinders}, {"heads", footer_.heads}, {"sectors", footer_.sectors}};
  out["read-only"] = !file_->writable();
  if (!opened_notes_.empty()) out["notes"] = opened_notes_;
  if (!dynamic()) return;
  out["block-size"] = block_size_;
  {
    MutexLock lock(meta_mutex_);
    out["max-table-entries"] = bat_.size();
    out["allocated-blocks"] =
        std::count_if(bat_.begin(), bat_.end(), [](uint32_t e) { return e != kUnallocated; });
  }
  if (has_batmap_) out["batmap"] = true;
  if (differencing()) {
    out["parent-id"] = uuid_string(header_.parent_id);
    out["parent-name"] = parent_info_.name;
    out["parent-timestamp"] = header_.parent_timestamp;
    out["parent-locators"] = parent_info_.locators;
    out["parent-filename"] = parent_info_.resolved_path;
    out["parent-resolved-by"] = parent_info_.resolved_by;
  }
}

void VhdDevice::check(CheckReport& report) {
  const std::string& p = path();
  int64_t fs = file_->size();
  if (fs < 512) {
    report.errors.push_back(p + ": file is too small for a footer");
    return;
  }
  const uint64_t fsize = static_cast<uint64_t>(fs);
  std::array<uint8_t, 512> buf{};
  Footer tail;
  std::string err = "unreadable";
  if (read_bytes(*file_, fsize - 512, buf.data(), 512) == 0) err = parse_footer(buf.data(), tail);
  if (!err.empty()) report.errors.push_back(p + ": trailing footer: " + err);
  if (!dynamic()) {
    if (fsize - 512 != size_) {
      report.notes.push_back(p + ": fixed disk data area is " + std::to_string(fsize - 512) +
                             " bytes, virtual size " + std::to_string(size_));
    }
    return;
  }
  Footer head;
  err = "unreadable";
  if (read_bytes(*file_, 0, buf.data(), 512) == 0) err = parse_footer(buf.data(), head);
  if (!err.empty()) {
    report.errors.push_back(p + ": footer copy at offset 0: " + err);
  } else if (head.unique_id != footer_.unique_id || head.disk_type != footer_.disk_type ||
             head.current_size != footer_.current_size) {
    report.errors.push_back(p + ": footer copy at offset 0 disagrees with the trailing footer");
  }
  std::array<uint8_t, 1024> hb{};
  DynHeader h;
  err = "unreadable";
  if (read_bytes(*file_, footer_.data_offset, hb.data(), hb.size()) == 0) {
    err = parse_header(hb.data(), h);
  }
  if (!err.empty()) report.errors.push_back(p + ": dynamic header: " + err);

  // Open refuses to write such an image (vhd_open.cpp, reserve_declared_area).
  for (const auto& a : areas_past_end_) report.errors.push_back(p + ": " + a);
  // BAT on disk must equal the BAT in memory, and blocks must not overlap.
  std::vector<uint32_t> bat;
  {
    MutexLock lock(meta_mutex_);
    bat = bat_;
  }
  std::vector<uint8_t> raw(bat.size() * 4);
  if (read_bytes(*file_, header_.table_offset, raw.data(), raw.size()) != 0) {
    report.errors.push_back(p + ": cannot read the BAT");
    return;
  }
  std::vector<std::pair<uint64_t, uint64_t>> used = metadata_ranges_;  // [start, end)
  const uint64_t needed = (size_ + block_size_ - 1) / block_size_;
  for (size_t i = 0; i < bat.size(); ++i) {
    uint32_t v;
    std::memcpy(&v, raw.data() + 4 * i, 4);
    v = __builtin_bswap32(v);
    if (v != bat[i]) {
      report.errors.push_back(p + ": BAT entry " + std::to_string(i) + " on disk (" +
                              std::to_string(v) + ") differs from the one in use (" +
                              std::to_string(bat[i]) + ")");
    }
    if (v == kUnallocated) continue;
    uint64_t start = uint64_t{v} * kSector, end = start + block_bytes();
    if (end > fsize - 512) {
      report.errors.push_back(p + ": BAT entry " + std::to_string(i) +
                              " points past the end of the file");
      continue;
    }
    if (i >= needed) {
      report.notes.push_back(p + ": BAT entry " + std::to_string(i) +
                             " is allocated past the virtual size");
    }
    used.emplace_back(start, end);
  }
  std::sort(used.begin(), used.end());
  uint64_t covered = 0;
  for (auto& [s, e] : used) {
    if (s < covered) {
      report.errors.push_back(p + ": structures overlap at byte " + std::to_string(s));
    } else if (s > covered) {
      // Alignment padding (up to 4 KiB, and stale footers left in it) is not a leak.
      uint64_t gap = s - covered;
      if (gap >= 4096 + kSector) {
        report.leaks.push_back(p + ": " + std::to_string(gap) + " unreferenced bytes at " +
                               std::to_string(covered));
      }
    }
    covered = std::max(covered, e);
  }
  if (fsize - 512 > covered && fsize - 512 - covered >= 4096 + kSector) {
    report.leaks.push_back(p + ": " + std::to_string(fsize - 512 - covered) +
                           " unreferenced bytes at " + std::to_string(covered));
  }
  // Differencing: the parent must still be the one recorded.
  if (differencing() && parent_) {
    auto* pv = dynamic_cast<VhdDevice*>(parent_.get());
    if (pv && pv->footer().unique_id != header_.parent_id) {
      report.errors.push_back(p + ": parent unique id does not match");
    }
  }
  report.notes.push_back(
      p + ": " +
      std::to_string(
          std::count_if(bat.begin(), bat.end(), [](uint32_t e) { return e != kUnallocated; })) +
      " of " + std::to_string(bat.size()) + " blocks allocated");
}

}  // namespace strata::vhd
