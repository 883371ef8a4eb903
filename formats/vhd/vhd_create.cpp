// `strata create -f vhd`: fixed, dynamic and differencing images.
//
// Options (-o key=value,...):
//   type=fixed|dynamic|differencing   (subformat= is accepted as in qemu-img;
//                                      default dynamic, differencing with -b)
//   block_size=2M                     (power of two, 512 B .. 256 MiB)
//   force_size=on|off                 (off: round the size up to a CHS product,
//                                      as qemu-img does, so every reader agrees)
//   locators=w2ru+w2ku+macx           (which parent locators to write)
//   data_space=bytes|sectors          (how locator data space is recorded)
#include <algorithm>
#include <cctype>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "formats/create.h"
#include "formats/errors.h"
#include "formats/file_system.h"
#include "formats/vhd/vhd.h"

namespace fs = std::filesystem;

namespace strata::vhd {
namespace {

bool parse_bool(const CreateOptions& o, const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "yes" || v == "1") return true;
  if (v == "off" || v == "false" || v == "no" || v == "0") return false;
  throw_image_error(o.path, "option " + key + "=" + v + ": expected on or off");
}

std::string percent_encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '/' || c == '.' || c == '-' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char b[4];
      std::snprintf(b, sizeof b, "%%%02X", c);
      out += b;
    }
  }
  return out;
}

void check_io(const CreateOptions& o, int r, const char* what) {
  if (r)
    throw_image_error(o.path, std::string("cannot write the ") + what + ": " + std::strerror(r));
}

uint32_t now_vhd() {
  return static_cast<uint32_t>(static_cast<int64_t>(std::time(nullptr)) - kVhdEpoch);
}

}  // namespace

void create(const CreateOptions& opts) {
  std::string type;
  uint64_t block_size = 2u << 20;
  bool force_size = false;
  std::vector<std::string> locs = {"w2ru", "w2ku", "macx"};
  bool space_in_sectors = false;
  for (const auto& [k, v] : opts.options) {
    if (k == "type" || k == "subformat") {
      type = v;
    } else if (k == "block_size") {
      try {
        block_size = parse_size(v);
      } catch (const std::exception&) {
        throw_image_error(opts.path, "option block_size=" + v + ": not a size");
      }
    } else if (k == "force_size") {
      force_size = parse_bool(opts, k, v);
    } else if (k == "locators") {
      locs.clear();
      size_t pos = 0;
      while (pos <= v.size()) {
        size_t plus = v.find('+', pos);
        if (plus == std::string::npos) plus = v.size();
        std::string l = v.substr(pos, plus - pos);
        if (l != "w2ru" && l != "w2ku" && l != "macx" && !l.empty()) {
          throw_image_error(opts.path, "option locators: unknown locator '" + l +
                                           "' (w2ru, w2ku, macx joined by '+')");
        }
        if (!l.empty()) locs.push_back(l);
        pos = plus + 1;
      }
    } else if (k == "data_space") {
      if (v != "bytes" && v != "sectors") {
        throw_image_error(opts.path, "option data_space=" + v + ": expected bytes or sectors");
      }
      space_in_sectors = v == "sectors";
    } else {
      throw_image_error(opts.path, "unknown VHD option '" + k +
                                       "' (type, block_size, force_size, locators, data_space)");
    }
  }
  if (type.empty()) type = opts.backing ? "differencing" : "dynamic";
  uint32_t disk_type;
  if (type == "fixed") {
    disk_type = kTypeFixed;
  } else if (type == "dynamic") {
    disk_type = kTypeDynamic;
  } else if (type == "differencing") {
    disk_type = kTypeDifferencing;
  } else {
    throw_image_error(opts.path,
                      "option type=" + type + ": expected fixed, dynamic or differencing");
  }
  if (opts.backing && disk_type != kTypeDifferencing) {
    throw_image_error(opts.path, "a parent (-b) needs type=differencing");
  }
  if (!opts.backing && disk_type == kTypeDifferencing) {
    throw_image_error(opts.path, "type=differencing needs a parent (-b PARENT)");
  }
  if (opts.backing && opts.backing_format != Format::automatic &&
      opts.backing_format != Format::vhd) {
    throw_image_error(opts.path, "the parent of a differencing VHD must be a VHD");
  }
  if (!valid_block_size(block_size)) {
    throw_image_error(opts.path, "option block_size=" + std::to_string(block_size) +
                                     ": must be a power of two from 512 B to 256 MiB");
  }

  Footer f;
  std::memcpy(f.creator_app.data(), "strt", 4);
  f.creator_version = 0x00010000;
  f.creator_os = 0x5769326B;  // "Wi2k"
  f.timestamp = now_vhd();
  f.disk_type = disk_type;
  f.unique_id = random_uuid();

  DynHeader h;
  std::string parent_abs;
  // Creation has no OpenOptions (CreateOptions carries no file system): it
  // resolves and stats the parent on the host, as create_file() creates there.
  FileSystem& host = *host_file_system();
  if (opts.backing) {
    fs::path bp(*opts.backing);
    if (bp.is_relative()) bp = fs::path(host.absolute(opts.path)).parent_path() / bp;
    std::error_code ec;
    fs::path canon = host.canonical(bp.string(), ec);
    if (ec) throw_image_error(opts.path, "parent '" + *opts.backing + "': " + ec.message());
    parent_abs = canon.string();
    OpenOptions po;
    po.format = Format::vhd;
    po.read_only = true;
    po.allowed_dirs = {"/"};
    auto parent = open_image(parent_abs, po);
    auto* pv = dynamic_cast<VhdDevice*>(parent.get());
    if (!pv) throw_image_error(opts.path, "parent '" + parent_abs + "' is not a VHD");
    const Footer& pf = pv->footer();
    f.cylinders = pf.cylinders;
    f.heads = pf.heads;
    f.sectors = pf.sectors;
    f.current_size = f.original_size = parent->size();
    if (opts.size) {
      if (*opts.size < parent->size()) {
        throw_image_error(opts.path, "size " + std::to_string(*opts.size) +
                                         " is smaller than the parent's " +
                                         std::to_string(parent->size()));
      }
      f.current_size = f.original_size = (*opts.size + kSector - 1) / kSector * kSector;
      if (f.current_size != parent->size()) {
        Geometry g = calculate_geometry(f.current_size / kSector);
        f.cylinders = g.cylinders;
        f.heads = g.heads;
        f.sectors = g.sectors;
        if (g.total() * kSector != f.current_size) {
          f.cylinders = 65535;
          f.heads = 16;
          f.sectors = 255;
        }
      }
    }
    h.parent_id = pf.unique_id;
    FileStat st;
    if (host.stat(parent_abs, st) == 0) {
      h.parent_timestamp = static_cast<uint32_t>(st.mtime - kVhdEpoch);
    }
    auto name16 = utf8_to_utf16(canon.filename().string(), true);
    if (name16.size() > h.parent_name_raw.size()) {
      throw_image_error(opts.path, "parent file name is longer than 256 UTF-16 units");
    }
    std::copy(name16.begin(), name16.end(), h.parent_name_raw.begin());
  } else {
    if (!opts.size) throw_image_error(opts.path, "a size is required");
    uint64_t total = (*opts.size + kSector - 1) / kSector;
    if (force_size) {
      f.cylinders = 65535;
      f.heads = 16;
      f.sectors = 255;
    } else {
      // Round up to a CHS product, the way qemu-img does, so that readers that
      // size by geometry and readers that size by current_size agree.
      Geometry g = calculate_geometry(total);
      for (uint64_t i = 1; total > g.total() && i < 100000; ++i) {
        g = calculate_geometry(total + i);
      }
      f.cylinders = g.cylinders;
      f.heads = g.heads;
      f.sectors = g.sectors;
      if (g.total() != kMaxGeometrySectors) total = g.total();
    }
    f.current_size = f.original_size = total * kSector;
  }
  if (disk_type != kTypeFixed && f.current_size > kMaxSize) {
    throw_image_error(opts.path, "size " + std::to_string(f.current_size) +
                                     " exceeds the 2040 GiB limit of dynamic VHDs");
  }

  auto file = create_file(opts.path);
  std::array<uint8_t, 512> fb{};
  if (disk_type == kTypeFixed) {
    f.data_offset = ~0ull;
    serialize_footer(f, fb.data());
    check_io(opts, file->truncate(f.current_size), "data area");
    check_io(opts, write_bytes(*file, f.current_size, fb.data(), 512), "footer");
    check_io(opts, file->sync(), "image");
    return;
  }

  f.data_offset = 512;
  const uint64_t entries = (f.current_size + block_size - 1) / block_size;
  h.table_offset = 1536;
  h.max_table_entries = static_cast<uint32_t>(entries);
  h.block_size = static_cast<uint32_t>(block_size);
  uint64_t pos = (h.table_offset + entries * 4 + kSector - 1) / kSector * kSector;

  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> blobs;
  if (disk_type == kTypeDifferencing) {
    fs::path child_dir = fs::path(host.absolute(opts.path)).parent_path();
    std::error_code ec;
    fs::path cdir = host.weakly_canonical(child_dir.string(), ec);
    if (ec) cdir = child_dir;
    std::string rel = fs::path(parent_abs).lexically_relative(cdir).string();
    int slot = 0;
    for (const auto& l : locs) {
      std::vector<uint8_t> blob;
      uint32_t code;
      if (l == "w2ru") {
        std::string w = rel;
        std::replace(w.begin(), w.end(), '/', '\\');
        if (w.rfind("..", 0) != 0) w = ".\\" + w;
        blob = utf8_to_utf16(w, false);
        code = kPlatW2ru;
      } else if (l == "w2ku") {
        std::string w = parent_abs;
        std::replace(w.begin(), w.end(), '/', '\\');
        blob = utf8_to_utf16(w, false);
        code = kPlatW2ku;
      } else {
        std::string u = "file://./" + percent_encode(rel);
        blob.assign(u.begin(), u.end());
        code = kPlatMacX;
      }
      uint64_t space = std::max<uint64_t>(kSector, (blob.size() + kSector - 1) / kSector * kSector);
      Locator& loc = h.locators[slot++];
      loc.platform = code;
      loc.data_length = static_cast<uint32_t>(blob.size());
      loc.data_space = static_cast<uint32_t>(space_in_sectors ? space / kSector : space);
      loc.data_offset = pos;
      blobs.emplace_back(pos, std::move(blob));
      pos += space;
    }
  }

  serialize_footer(f, fb.data());
  std::array<uint8_t, 1024> hb{};
  serialize_header(h, hb.data());
  std::vector<uint8_t> meta(pos, 0);
  std::memcpy(meta.data(), fb.data(), 512);
  std::memcpy(meta.data() + 512, hb.data(), 1024);
  std::memset(meta.data() + h.table_offset, 0xFF, entries * 4);
  for (auto& [off, blob] : blobs) std::memcpy(meta.data() + off, blob.data(), blob.size());
  check_io(opts, write_bytes(*file, 0, meta.data(), meta.size()), "metadata");
  check_io(opts, write_bytes(*file, pos, fb.data(), 512), "footer");
  check_io(opts, file->sync(), "image");
}

}  // namespace strata::vhd

namespace strata {

void create_vhd(const CreateOptions& opts) { vhd::create(opts); }

}  // namespace strata
