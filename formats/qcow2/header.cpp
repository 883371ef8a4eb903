#include "formats/qcow2/header.h"

#include <cstring>
#include <vector>

#include "formats/endian.h"
#include "formats/errors.h"

namespace strata::qcow2 {
namespace {

constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xE2792ACA;
constexpr uint32_t kExtFeatureTable = 0x6803F857;
constexpr uint32_t kExtEncryption = 0x0537BE77;
constexpr uint32_t kExtDataFile = 0x44415441;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw_image_error(path, "header: " + what);
}

// offset + len must not overflow and must stay below 2^56.
void check_range(const std::string& path, const char* field, uint64_t off, uint64_t len) {
  if (off > kMaxHostOffset || len > kMaxHostOffset || off + len > kMaxHostOffset) {
    bad(path, std::string(field) + " " + hex(off) + " + " + std::to_string(len) +
                  " bytes is beyond the largest valid offset");
  }
}

void check_aligned(const std::string& path, const char* field, uint64_t off, uint64_t cs) {
  if (off % cs != 0) bad(path, std::string(field) + " " + hex(off) + " is not cluster aligned");
}

}  // namespace

std::string Header::feature_name(uint8_t type, uint8_t bit) const {
  for (const auto& f : feature_names) {
    if (f.type == type && f.bit == bit && !f.name.empty())
      return "bit " + std::to_string(bit) + " '" + f.name + "'";
  }
  return "bit " + std::to_string(bit);
}

uint64_t l1_entries_needed(uint64_t size, uint32_t cluster_bits, bool extended_l2) {
  uint64_t cs = 1ull << cluster_bits;
  uint64_t l2_entries = cs / (extended_l2 ? 16 : 8);
  uint64_t clusters = size / cs + (size % cs ? 1 : 0);
  return clusters / l2_entries + (clusters % l2_entries ? 1 : 0);
}

Header read_header(File& file) {
  const std::string& path = file.path();
  int64_t fsize = file.size();
  if (fsize < 0) throw_image_error(path, "cannot read the file size");
  const uint64_t file_size = static_cast<uint64_t>(fsize);
  if (file_size < 72)
    bad(path, "file is " + std::to_string(file_size) + " bytes, too short for a qcow2 header");

  uint8_t b[112] = {};
  if (read_bytes(file, 0, b, sizeof b) != 0) throw_image_error(path, "cannot read the header");
  Header h;
  if (load_be32(b) != kMagic) bad(path, "magic is not QFI\\xfb");
  h.version = load_be32(b + 4);
  if (h.version != 2 && h.version != 3)
    bad(path, "version " + std::to_string(h.version) + " is not supported (2 or 3)");
  h.backing_file_offset = load_be64(b + 8);
  h.backing_file_size = load_be32(b + 16);
  h.cluster_bits = load_be32(b + 20);
  if (h.cluster_bits < 9 || h.cluster_bits > 21) {
    bad(path, "cluster_bits " + std::to_string(h.cluster_bits) + " is outside 9..21");
  }
  const uint64_t cs = h.cluster_size();
  h.size = load_be64(b + 24);
  h.crypt_method = load_be32(b + 32);
  h.l1_size = load_be32(b + 36);
  h.l1_table_offset = load_be64(b + 40);
  h.refcount_table_offset = load_be64(b + 48);
  h.refcount_table_clusters = load_be32(b + 56);
  h.nb_snapshots = load_be32(b + 60);
  h.snapshots_offset = load_be64(b + 64);
  if (h.version == 3) {
    h.incompatible = load_be64(b + 72);
    h.compatible = load_be64(b + 80);
    h.autoclear = load_be64(b + 88);
    h.refcount_order = load_be32(b + 96);
    h.header_length = load_be32(b + 100);
    if (h.header_length < 104)
      bad(path, "header_length " + std::to_string(h.header_length) + " is below 104");
    if (h.header_length > cs) {
      bad(path, "header_length " + std::to_string(h.header_length) + " exceeds the cluster size");
    }
    if (h.header_length % 8 != 0)
      bad(path, "header_length " + std::to_string(h.header_length) + " is not a multiple of 8");
    if (h.header_length > 104) h.compression_type = b[104];
  }

  // The rest of cluster 0: extensions and backing file name.
  std::vector<uint8_t> c0(cs);
  if (read_bytes(file, 0, c0.data(), cs) != 0) throw_image_error(path, "cannot read cluster 0");

  if (h.backing_file_offset != 0) {
    if (h.backing_file_offset > cs)
      bad(path, "backing_file_offset " + hex(h.backing_file_offset) + " is outside cluster 0");
    if (h.backing_file_size > 1023 || h.backing_file_size > cs - h.backing_file_offset) {
      bad(path, "backing_file_size " + std::to_string(h.backing_file_size) + " is too large");
    }
    if (h.backing_file_offset < h.header_length)
      bad(path, "backing_file_offset overlaps the header");
    h.backing_file.assign(reinterpret_cast<const char*>(c0.data() + h.backing_file_offset),
                          h.backing_file_size);
    if (h.backing_file.find('\0') != std::string::npos)
      bad(path, "backing file name contains a NUL byte");
  }

  // Header extensions.
  uint64_t pos = h.header_length;
  const uint64_t area_end = h.backing_file_offset ? h.backing_file_offset : cs;
  uint64_t seen_types = 0;
  auto string_ext = [&](const uint8_t* p, uint32_t len) {
    return std::string(reinterpret_cast<const char*>(p), len);
  };
  while (pos + 8 <= area_end) {
    uint32_t type = load_be32(c0.data() + pos);
    uint32_t len = load_be32(c0.data() + pos + 4);
    if (type == kExtEnd) break;
    if (len > area_end - pos - 8) {
      bad(path, "extension " + hex(type) + " length " + std::to_string(len) +
                    " runs past the extension area");
    }
    const uint8_t* p = c0.data() + pos + 8;
    switch (type) {
      case kExtBackingFormat:
        if (seen_types & 1) bad(path, "backing format extension appears twice");
        seen_types |= 1;
        if (len >= 16)
          bad(path, "backing format name of " + std::to_string(len) + " bytes is too long");
        h.backing_format = string_ext(p, len);
        break;
      case kExtFeatureTable:
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          FeatureName f{p[i], p[i + 1], {}};
          size_t n = strnlen(reinterpret_cast<const char*>(p + i + 2), 46);
          f.name.assign(reinterpret_cast<const char*>(p + i + 2), n);
          h.feature_names.push_back(std::move(f));
        }
        break;
      case kExtBitmaps:
        if (len < 24) bad(path, "bitmaps extension length " + std::to_string(len) + " is below 24");
        h.has_bitmaps_ext = true;
        h.nb_bitmaps = load_be32(p);
        h.bitmap_directory_size = load_be64(p + 8);
        h.bitmap_directory_offset = load_be64(p + 16);
        if (h.nb_bitmaps > 65535)
          bad(path,
              "bitmaps extension: nb_bitmaps " + std::to_string(h.nb_bitmaps) + " is too large");
        if (h.bitmap_directory_size > (64ull << 20))
          bad(path, "bitmaps extension: directory_size is too large");
        check_aligned(path, "bitmap directory offset", h.bitmap_directory_offset, cs);
        check_range(path, "bitmap directory", h.bitmap_directory_offset, h.bitmap_directory_size);
        break;
      case kExtEncryption:
        break;
      case kExtDataFile:
        if (seen_types & 2) bad(path, "data file extension appears twice");
        seen_types |= 2;
        h.has_data_file_ext = true;
        h.data_file = string_ext(p, len);
        break;
      default:
        break;  // unknown: ignored, preserved (we never rewrite the area)
    }
    uint64_t padded = (uint64_t{len} + 7) & ~uint64_t{7};
    if (padded > area_end - pos - 8) break;
    pos += 8 + padded;
  }

  // Features.
  uint64_t unknown = h.incompatible & ~kIncompatKnown;
  if (unknown) {
    std::string names;
    for (int bit = 0; bit < 64; ++bit) {
      if (unknown & (1ull << bit)) {
        if (!names.empty()) names += ", ";
        names += h.feature_name(0, static_cast<uint8_t>(bit));
      }
    }
    bad(path, "unknown incompatible feature " + names + " (incompatible_features " +
                  hex(h.incompatible) + ")");
  }
  if (h.crypt_method != 0) {
    bad(path,
        "crypt_method " + std::to_string(h.crypt_method) + ": encrypted images are not supported");
  }
  if (h.refcount_order > 6)
    bad(path, "refcount_order " + std::to_string(h.refcount_order) + " is above 6");
  if (h.extended_l2() && h.cluster_bits < 14) {
    bad(path, "extended L2 entries need clusters of at least 16 KiB (cluster_bits " +
                  std::to_string(h.cluster_bits) + ")");
  }
  bool comp_bit = h.incompatible & kIncompatCompression;
  if (h.compression_type > 1)
    bad(path, "compression_type " + std::to_string(h.compression_type) + " is unknown");
  if (comp_bit != (h.compression_type != 0)) {
    bad(path, "compression_type " + std::to_string(h.compression_type) +
                  " does not match incompatible feature bit 3");
  }
  if (h.data_file_raw() && !h.has_data_file()) {
    bad(path, "autoclear feature data_file_raw is set without an external data file");
  }
  if (h.has_data_file() && !h.backing_file.empty() && h.data_file_raw()) {
    bad(path, "data_file_raw images cannot have a backing file");
  }

  // Virtual size and L1.
  if (h.size > (1ull << 62)) bad(path, "size " + std::to_string(h.size) + " is too large");
  uint64_t needed = l1_entries_needed(h.size, h.cluster_bits, h.extended_l2());
  if (needed > 0x7fffffff)
    bad(path, "size " + std::to_string(h.size) + " needs too many L1 entries");
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes)
    bad(path, "l1_size " + std::to_string(h.l1_size) + " is larger than 32 MiB of entries");
  if (h.l1_size < needed) {
    bad(path, "l1_size " + std::to_string(h.l1_size) + " is too small for size " +
                  std::to_string(h.size) + " (needs " + std::to_string(needed) + ")");
  }
  if (h.l1_size > 0) {
    check_aligned(path, "l1_table_offset", h.l1_table_offset, cs);
    check_range(path, "l1_table_offset", h.l1_table_offset, uint64_t{h.l1_size} * 8);
    if (h.l1_table_offset == 0) bad(path, "l1_table_offset 0 overlaps the header");
    if (h.l1_table_offset >= file_size)
      bad(path, "l1_table_offset " + hex(h.l1_table_offset) + " is beyond the end of the file");
  }

  // Refcount table.
  if (h.refcount_table_clusters == 0) bad(path, "refcount_table_clusters is 0");
  if (uint64_t{h.refcount_table_clusters} * cs > kMaxRefcountTableBytes) {
    bad(path, "refcount_table_clusters " + std::to_string(h.refcount_table_clusters) +
                  " is larger than 8 MiB");
  }
  check_aligned(path, "refcount_table_offset", h.refcount_table_offset, cs);
  check_range(path, "refcount_table_offset", h.refcount_table_offset,
              uint64_t{h.refcount_table_clusters} * cs);
  if (h.refcount_table_offset == 0) bad(path, "refcount_table_offset 0 overlaps the header");
  if (h.refcount_table_offset >= file_size) {
    bad(path,
        "refcount_table_offset " + hex(h.refcount_table_offset) + " is beyond the end of the file");
  }

  // Snapshots.
  if (h.nb_snapshots > kMaxSnapshots)
    bad(path, "nb_snapshots " + std::to_string(h.nb_snapshots) + " is above 65536");
  if (h.nb_snapshots > 0) {
    check_aligned(path, "snapshots_offset", h.snapshots_offset, cs);
    check_range(path, "snapshots_offset", h.snapshots_offset, 0);
    if (h.snapshots_offset == 0 || h.snapshots_offset >= file_size) {
      bad(path, "snapshots_offset " + hex(h.snapshots_offset) + " is outside the file");
    }
  }
  return h;
}

std::vector<SnapshotInfo> read_snapshots(File& file, const Header& h, uint64_t* table_bytes) {
  std::vector<SnapshotInfo> out;
  const std::string& path = file.path();
  uint64_t pos = h.snapshots_offset;
  uint64_t total = 0;
  const uint64_t cs = h.cluster_size();
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    uint8_t e[40];
    if (read_bytes(file, pos, e, sizeof e) != 0)
      throw_image_error(path, "cannot read the snapshot table");
    SnapshotInfo s;
    s.l1_offset = load_be64(e);
    s.l1_size = load_be32(e + 8);
    uint16_t id_len = load_be16(e + 12);
    uint16_t name_len = load_be16(e + 14);
    uint32_t extra = load_be32(e + 36);
    std::string where = "snapshot table entry " + std::to_string(i) + ": ";
    if (extra > 1024)
      bad(path, where + "extra_data_size " + std::to_string(extra) + " is above 1024");
    if (h.version == 3 && extra < 16)
      bad(path, where + "extra_data_size " + std::to_string(extra) + " is below 16");
    if (uint64_t{s.l1_size} * 8 > kMaxL1Bytes)
      bad(path, where + "l1_size " + std::to_string(s.l1_size) + " is too large");
    if (s.l1_size > 0) {
      check_aligned(path, (where + "l1_table_offset").c_str(), s.l1_offset, cs);
      check_range(path, (where + "l1_table_offset").c_str(), s.l1_offset, uint64_t{s.l1_size} * 8);
    }
    uint64_t len = 40 + uint64_t{extra} + id_len + name_len;
    std::vector<char> names(uint64_t{id_len} + name_len);
    if (!names.empty() && read_bytes(file, pos + 40 + extra, names.data(), names.size()) != 0) {
      throw_image_error(path, "cannot read the snapshot table");
    }
    s.id.assign(names.data(), id_len);
    s.name.assign(names.data() + id_len, name_len);
    len = (len + 7) & ~uint64_t{7};
    total += len;
    if (total > kMaxSnapshotTableBytes) bad(path, "snapshot table is larger than 64 MiB");
    pos += len;
    out.push_back(std::move(s));
  }
  check_range(path, "snapshot table", h.snapshots_offset, total);
  if (table_bytes) *table_bytes = total;
  return out;
}

}  // namespace strata::qcow2
