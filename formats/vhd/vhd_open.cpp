// Opening a VHD: footer (trailing copy, else the copy at offset 0), dynamic
// header, BAT and locator validation, and parent resolution for differencing
// disks. Every refusal names the file and the field (docs/FORMATS.md A2-A11, C2).
//
// Parent resolution order (first usable one wins; a candidate is usable when
// it exists inside the allowed directories, opens as a VHD, and its footer
// unique id equals the child's parent id):
//   1. W2ru locators (path relative to the child, '\' -> '/');
//   2. W2ku locators (absolute path; a drive-letter path is reduced to its base
//      name next to the child; an absolute host path is also tried by base name);
//   3. MacX locators (file:// URL, percent-decoded, relative to the child);
//   4. the header's parent unicode name, next to the child.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "formats/errors.h"
#include "formats/open.h"
#include "formats/vhd/vhd.h"

namespace strata::vhd {
namespace {

uint64_t add_saturating(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

// End of the area a locator entry claims: its data space or its data length,
// whichever is larger (a field that does not decode claims nothing).
uint64_t locator_area_end(const Locator& l) {
  uint64_t claimed =
      std::max<uint64_t>(locator_space_bytes(l.data_space).value_or(0),
                         (uint64_t{l.data_length} + kSector - 1) / kSector * kSector);
  return add_saturating(l.data_offset, claimed);
}

// Can a parent locator's path be read: sane sizes, and the data inside the file.
bool locator_readable(const Locator& l, uint64_t eof) {
  auto space = locator_space_bytes(l.data_space);
  return space && l.data_length <= *space && l.data_length <= 4096 && l.data_offset >= 512 &&
         l.data_offset <= eof && l.data_length <= eof - l.data_offset;
}

}  // namespace

class Opener {
 public:
  Opener(std::unique_ptr<File> file, ChainContext& ctx) : file_(std::move(file)), ctx_(ctx) {
    path_ = file_->path();
  }

  std::shared_ptr<BlockDevice> open();

 private:
  [[noreturn]] void fail(const std::string& what) { throw_image_error(path_, what); }
  void read_footer();
  uint64_t virtual_size();
  void read_dynamic(VhdDevice& d);
  void reserve_declared_area(VhdDevice& d, uint64_t start, uint64_t end, uint64_t data_end,
                             const std::string& what);
  void read_locators(VhdDevice& d, uint64_t data_end);
  void open_parent(VhdDevice& d);

  std::unique_ptr<File> file_;
  ChainContext& ctx_;
  std::string path_;
  uint64_t fsize_ = 0;
  Footer footer_;
  bool from_head_copy_ = false;
  std::string notes_;
};

void Opener::read_footer() {
  int64_t s = file_->size();
  if (s < 0) fail("cannot read the file size");
  fsize_ = static_cast<uint64_t>(s);
  if (fsize_ < 512)
    fail("file is " + std::to_string(fsize_) + " bytes, too small for a VHD footer");
  std::array<uint8_t, 512> buf{};
  if (read_bytes(*file_, fsize_ - 512, buf.data(), 512)) fail("cannot read the footer");
  std::string tail_err = parse_footer(buf.data(), footer_);
  if (tail_err.empty()) {
    if (footer_.disk_type != kTypeFixed) {
      // Compare with the copy at 0: a disagreement is logged, the trailing copy wins.
      std::array<uint8_t, 512> head{};
      Footer h;
      if (read_bytes(*file_, 0, head.data(), 512) == 0 && parse_footer(head.data(), h).empty()) {
        if (h.disk_type != footer_.disk_type || h.current_size != footer_.current_size ||
            h.unique_id != footer_.unique_id) {
          spdlog::warn(
              "{}: footer copy at offset 0 disagrees with the trailing footer; "
              "using the trailing one",
              path_);
        }
      }
    }
    return;
  }
  // Pre-2004 Virtual PC wrote a 511-byte footer.
  std::array<uint8_t, 512> b511{};
  if (fsize_ >= 511 && read_bytes(*file_, fsize_ - 511, b511.data(), 511) == 0 &&
      parse_footer(b511.data(), footer_).empty()) {
    notes_ += "511-byte footer; ";
    return;
  }
  std::string head_err = "file too small";
  if (fsize_ >= 1024) {
    if (read_bytes(*file_, 0, buf.data(), 512)) fail("cannot read the footer copy at offset 0");
    head_err = parse_footer(buf.data(), footer_);
  }
  if (head_err.empty() && footer_.disk_type != kTypeFixed) {
    from_head_copy_ = true;
    return;
  }
  if (head_err.empty()) head_err = "a fixed disk has no copy at offset 0";
  fail("footer: " + tail_err + " (footer copy at offset 0: " + head_err + ")");
}

uint64_t Opener::virtual_size() {
  if (ctx_.depth == 0 && ctx_.options.vhd_size_override) {
    uint64_t v = *ctx_.options.vhd_size_override;
    if (v % kSector) fail("configured VHD size " + std::to_string(v) + " is not a multiple of 512");
    return v;
  }
  const std::string& mode = ctx_.options.vhd_size_mode;
  uint64_t chs = uint64_t{footer_.cylinders} * footer_.heads * footer_.sectors * kSector;
  uint64_t size;
  if (mode == "chs") {
    size = chs;
  } else if (mode == "qemu") {
    size = qemu_uses_current_size(footer_) ? footer_.current_size : chs;
  } else if (mode == "current" || mode.empty()) {
    size = footer_.current_size;
  } else {
    fail("unknown VHD size mode '" + mode + "' (current, chs, qemu)");
  }
  if (size % kSector) {
    fail("footer: current_size " + std::to_string(size) + " is not a multiple of 512");
  }
  return size;
}

std::shared_ptr<BlockDevice> Opener::open() {
  read_footer();
  uint64_t size = virtual_size();
  if (footer_.disk_type == kTypeFixed) {
    uint64_t data_bytes = fsize_ - (notes_.empty() ? 512 : 511);
    if (size > data_bytes) {
      fail("footer: current_size " + std::to_string(size) + " needs " + std::to_string(size + 512) +
           " bytes but the file has " + std::to_string(fsize_) + ": the image is truncated");
    }
    return std::make_shared<VhdDevice>(std::move(file_), footer_, size);
  }
  if (size > kMaxSize) {
    fail("footer: current_size " + std::to_string(size) + " exceeds the 2040 GiB limit");
  }
  auto d = std::make_shared<VhdDevice>(std::move(file_), footer_, size);
  read_dynamic(*d);
  if (footer_.disk_type == kTypeDifferencing) open_parent(*d);
  return d;
}

void Opener::read_dynamic(VhdDevice& d) {
  // The device is not shared yet: its locks are free, and holding them lets
  // the thread-safety analysis check the fields they guard here too.
  MutexLock bat_lock(d.meta_mutex_);
  MutexLock alloc_lock(d.alloc_mutex_);
  File& f = *d.file_;
  const uint64_t hoff = footer_.data_offset;
  if (hoff < 512 || hoff % kSector != 0 || hoff > fsize_ || fsize_ - hoff < 1024) {
    fail("footer: data_offset " + std::to_string(hoff) +
         " does not point at a dynamic header inside the file");
  }
  std::array<uint8_t, 1024> hb{};
  if (read_bytes(f, hoff, hb.data(), hb.size())) fail("cannot read the dynamic header");
  DynHeader& h = d.header_;
  std::string err = parse_header(hb.data(), h);
  if (!err.empty()) fail("dynamic header: " + err);
  const uint32_t bs = h.block_size;
  if (!valid_block_size(bs)) {
    const bool power_of_two = bs != 0 && (bs & (bs - 1)) == 0;
    fail("dynamic header: block_size " + std::to_string(bs) +
         (power_of_two ? " is outside 512 B .. 256 MiB" : " is not a power of two"));
  }
  const uint64_t needed = (d.size_ + bs - 1) / bs;
  // blktap may size the BAT for the largest disk; more than 2 TiB worth is hostile.
  const uint64_t limit = ((2ull << 40) + bs - 1) / bs;
  if (h.max_table_entries > limit) {
    fail("dynamic header: max_table_entries " + std::to_string(h.max_table_entries) +
         " exceeds the limit of " + std::to_string(limit) + " for block_size " +
         std::to_string(bs));
  }
  if (h.max_table_entries < needed) {
    fail("dynamic header: max_table_entries " + std::to_string(h.max_table_entries) +
         " is too small for the virtual size (" + std::to_string(needed) + " blocks needed)");
  }
  const uint64_t bat_bytes = uint64_t{h.max_table_entries} * 4;
  const uint64_t bat_end = h.table_offset + bat_bytes;
  if (h.table_offset < 512 || h.table_offset > fsize_ || bat_bytes > fsize_ - h.table_offset) {
    fail("dynamic header: table_offset " + std::to_string(h.table_offset) + " with " +
         std::to_string(h.max_table_entries) + " entries lies outside the file (" +
         std::to_string(fsize_) + " bytes)");
  }
  if (h.table_offset < hoff + 1024 && bat_end > hoff) {
    fail("dynamic header: table_offset " + std::to_string(h.table_offset) +
         ": the BAT overlaps the dynamic header");
  }
  d.block_size_ = bs;
  d.sectors_per_block_ = bs / kSector;
  d.bitmap_bytes_ = bitmap_bytes_for(bs);
  d.bitmap_cache_max_ = std::max<size_t>(64, (8u << 20) / d.bitmap_bytes_);

  std::vector<uint8_t> raw(bat_bytes);
  if (read_bytes(f, h.table_offset, raw.data(), raw.size())) fail("cannot read the BAT");
  d.bat_.resize(h.max_table_entries);
  for (size_t i = 0; i < d.bat_.size(); ++i) {
    uint32_t v;
    std::memcpy(&v, raw.data() + 4 * i, 4);
    d.bat_[i] = __builtin_bswap32(v);
  }

  // Where the footer is, or must be: the data may not run into it.
  const uint64_t limit_end = from_head_copy_ ? fsize_ : fsize_ - 512;
  auto& ranges = d.metadata_ranges_;
  ranges.emplace_back(0, 512);
  ranges.emplace_back(hoff, hoff + 1024);
  ranges.emplace_back(h.table_offset, (bat_end + kSector - 1) / kSector * kSector);
  // blktap batmap right after the padded BAT.
  uint64_t bm_off = (bat_end + kSector - 1) / kSector * kSector;
  std::array<uint8_t, 512> bmh{};
  if (bm_off + 512 <= fsize_ && read_bytes(f, bm_off, bmh.data(), 512) == 0 &&
      std::memcmp(bmh.data(), "tdbatmap", 8) == 0) {
    uint64_t map_off = __builtin_bswap64([&] {
      uint64_t v;
      std::memcpy(&v, bmh.data() + 8, 8);
      return v;
    }());
    uint32_t map_secs;
    std::memcpy(&map_secs, bmh.data() + 16, 4);
    map_secs = __builtin_bswap32(map_secs);
    ranges.emplace_back(bm_off, bm_off + 512);
    reserve_declared_area(d, map_off, add_saturating(map_off, uint64_t{map_secs} * kSector),
                          limit_end, "blktap batmap");
    d.has_batmap_ = true;
  }
  read_locators(d, limit_end);
  if (!d.areas_past_end_.empty()) {
    if (f.writable()) fail(d.areas_past_end_.front());
    spdlog::warn("{}: {}", path_, d.areas_past_end_.front());
    d.opened_notes_ += "metadata declared past the end of the file; ";
  }

  for (auto& r : ranges) {
    if (r.second > limit_end && r.first != 0) {
      fail("dynamic header: metadata at " + std::to_string(r.first) +
           " runs past the end of the file: the image is truncated");
    }
    d.metadata_end_ = std::max(d.metadata_end_, r.second);
  }
  // Every used BAT entry inside the file, clear of metadata and of other blocks.
  std::vector<std::pair<uint64_t, uint64_t>> blocks;  // start, block index
  uint64_t data_end = d.metadata_end_;
  for (uint64_t i = 0; i < d.bat_.size(); ++i) {
    uint32_t e = d.bat_[i];
    if (e == kUnallocated) continue;
    uint64_t start = uint64_t{e} * kSector;
    uint64_t end = start + d.block_bytes();
    if (i >= needed) {
      // Past the virtual size: ignored, but never allocated over if it is sane.
      if (end <= limit_end) data_end = std::max(data_end, end);
      continue;
    }
    if (end > limit_end) {
      fail("BAT entry " + std::to_string(i) + " (sector " + std::to_string(e) +
           ") points past the end of the file (block ends at " + std::to_string(end) +
           ", file data ends at " + std::to_string(limit_end) + "): the image is truncated");
    }
    for (auto& r : ranges) {
      if (start < r.second && r.first < end) {
        fail("BAT entry " + std::to_string(i) + " (sector " + std::to_string(e) +
             ") overlaps image metadata at " + std::to_string(r.first) + ".." +
             std::to_string(r.second));
      }
    }
    blocks.emplace_back(start, i);
    data_end = std::max(data_end, end);
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t k = 1; k < blocks.size(); ++k) {
    if (blocks[k].first < blocks[k - 1].first + d.block_bytes()) {
      fail("BAT entries " + std::to_string(blocks[k - 1].second) + " and " +
           std::to_string(blocks[k].second) + " point at overlapping blocks (sector " +
           std::to_string(blocks[k].first / kSector) + ")");
    }
  }
  uint64_t footer_pos =
      from_head_copy_ ? std::max(data_end, fsize_ >= 512 ? fsize_ - 512 : 0) : fsize_ - 512;
  if (from_head_copy_ && data_end > fsize_ - 512) footer_pos = data_end;
  footer_pos = (footer_pos + kSector - 1) / kSector * kSector;
  if (from_head_copy_) {
    if (f.writable()) {
      std::array<uint8_t, 512> fb;
      serialize_footer(footer_, fb.data());
      if (write_bytes(f, footer_pos, fb.data(), 512) || f.sync()) {
        fail("cannot repair the trailing footer");
      }
      spdlog::warn("{}: trailing footer was damaged; repaired it from the copy at offset 0", path_);
      d.opened_notes_ += "trailing footer repaired from the copy at offset 0; ";
    } else {
      spdlog::warn("{}: trailing footer is damaged; using the copy at offset 0 (read-only)", path_);
      d.opened_notes_ += "trailing footer damaged, using the copy at offset 0; ";
    }
  }
  d.next_free_ = std::max(footer_pos, data_end);
  d.next_free_ = (d.next_free_ + kSector - 1) / kSector * kSector;
  d.opened_notes_ += notes_;
}

// The one rule for every metadata area that a header field declares (the data
// of each locator, usable or not, and the blktap batmap): the area is what the
// header says, never cut at the end of the file, so every open of the image
// sees the same layout.
//  - An area inside the image data (before the trailing footer, or before the
//    end of the file when that footer is lost) is metadata: no block may
//    overlap it, and new blocks and a repaired footer go past it.
//  - An area reaching past the image data means the file is truncated there or
//    the field is damaged. Reading is unaffected (the part inside the file
//    stays reserved; a locator whose data is missing is not used to find the
//    parent), but a write would put the footer or new blocks inside the area
//    and the next open would find them overlapping it. So such an image opens
//    read-only only, and check reports it. Strata never writes it, so it stays
//    exactly as valid for QEMU and libvhdi as it was. (Reserving the area and
//    allocating past it instead would grow the file to wherever a damaged
//    field points, up to terabytes, and fill the locator with zeros.)
void Opener::reserve_declared_area(VhdDevice& d, uint64_t start, uint64_t end, uint64_t data_end,
                                   const std::string& what) {
  if (end <= start) return;
  if (end > data_end) {
    d.areas_past_end_.push_back(what + " data at " + std::to_string(start) + ".." +
                                std::to_string(end) + " runs past the end of the image data at " +
                                std::to_string(data_end) +
                                ": the image is truncated; it can only be opened read-only");
    end = data_end;
    if (end <= start) return;
  }
  d.metadata_ranges_.emplace_back(start, end);
}

void Opener::read_locators(VhdDevice& d, uint64_t data_end) {
  if (footer_.disk_type != kTypeDifferencing) return;
  const DynHeader& h = d.header_;
  d.parent_info_.name = utf16_to_utf8(h.parent_name_raw.data(), h.parent_name_raw.size(), true);
  for (int i = 0; i < 8; ++i) {
    const Locator& l = h.locators[i];
    if (l.platform == 0) continue;
    std::string label = "locator " + std::to_string(i) + " (" + platform_name(l.platform) + ")";
    reserve_declared_area(d, l.data_offset, locator_area_end(l), data_end, label);
    const uint32_t code = canonical_platform(l.platform);
    const bool names_parent = code == kPlatW2ru || code == kPlatW2ku || code == kPlatMacX;
    if (names_parent && !locator_readable(l, fsize_)) {
      spdlog::warn("{}: {}: data offset {} / length {} / space {} unusable; ignoring it", path_,
                   label, l.data_offset, l.data_length, l.data_space);
    }
  }
}

void Opener::open_parent(VhdDevice& d) {
  const DynHeader& h = d.header_;
  File& f = *d.file_;
  struct Candidate {
    std::string label, path;
  };
  std::vector<Candidate> cands;
  for (uint32_t want : {kPlatW2ru, kPlatW2ku, kPlatMacX}) {
    for (int i = 0; i < 8; ++i) {
      const Locator& l = h.locators[i];
      if (canonical_platform(l.platform) != want) continue;
      if (!locator_readable(l, fsize_)) continue;
      std::vector<uint8_t> blob(l.data_length);
      if (read_bytes(f, l.data_offset, blob.data(), blob.size())) continue;
      std::string text = want == kPlatMacX
                             ? std::string(reinterpret_cast<char*>(blob.data()), blob.size())
                             : utf16_to_utf8(blob.data(), blob.size(), false);
      if (auto nul = text.find('\0'); nul != std::string::npos) text.resize(nul);
      d.parent_info_.locators.push_back(platform_name(want) + ": " + text);
      for (auto& p : locator_paths(want, text)) cands.push_back({platform_name(want), p});
    }
  }
  if (!d.parent_info_.name.empty()) {
    std::string n = d.parent_info_.name;
    std::replace(n.begin(), n.end(), '\\', '/');
    auto slash = n.find_last_of('/');
    if (slash != std::string::npos) n = n.substr(slash + 1);
    if (!n.empty()) cands.push_back({"parent name", n});
  }
  if (cands.empty()) {
    fail("differencing disk: no parent locator and no parent name to find the parent by");
  }
  std::vector<std::string> errors, tried;
  for (const auto& c : cands) {
    if (std::find(tried.begin(), tried.end(), c.path) != tried.end()) continue;
    tried.push_back(c.path);
    auto seen = ctx_.seen;
    std::shared_ptr<BlockDevice> parent;
    try {
      parent = open_child(ctx_, path_, c.path, Format::vhd, ChildRole::backing);
    } catch (const ImageError& e) {
      ctx_.seen = seen;
      errors.push_back(c.label + " '" + c.path + "': " + e.what());
      continue;
    }
    auto* pv = dynamic_cast<VhdDevice*>(parent.get());
    if (!pv) {
      ctx_.seen = seen;
      errors.push_back(c.label + " '" + c.path + "': not a VHD");
      continue;
    }
    if (pv->footer().unique_id != h.parent_id) {
      ctx_.seen = seen;
      errors.push_back(c.label + " '" + c.path + "': parent unique id " +
                       uuid_string(pv->footer().unique_id) + " does not match the parent id " +
                       uuid_string(h.parent_id) + " in the dynamic header (parent id mismatch)");
      continue;
    }
    FileStat st;
    if (ctx_.files().stat(parent->path(), st) == 0) {
      int64_t mt = st.mtime - kVhdEpoch;
      if (mt != static_cast<int64_t>(h.parent_timestamp)) {
        std::string msg = "parent time stamp " + std::to_string(h.parent_timestamp) +
                          " differs from the parent's modification time " + std::to_string(mt);
        if (ctx_.options.vhd_strict_parent_timestamp) {
          ctx_.seen = seen;
          errors.push_back(c.label + " '" + c.path + "': " + msg + " (strict mode)");
          continue;
        }
        spdlog::warn("{}: {} ({})", path_, msg, parent->path());
      }
    }
    d.parent_ = parent;
    d.parent_info_.resolved_path = parent->path();
    d.parent_info_.resolved_by = c.label;
    return;
  }
  std::string all;
  for (auto& e : errors) all += (all.empty() ? "" : "; ") + e;
  fail("differencing disk: no usable parent: " + all);
}

}  // namespace strata::vhd

namespace strata {

std::shared_ptr<BlockDevice> open_vhd(std::unique_ptr<File> file, ChainContext& ctx) {
  vhd::Opener o(std::move(file), ctx);
  return o.open();
}

}  // namespace strata
