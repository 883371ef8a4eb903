// The stack builder: probes formats, opens images and their children (backing
// files, VHD parents, qcow2 data files) with the safety rules of docs/DESIGN.md:
//  - an image configured as raw is never probed;
//  - child paths resolve relative to the referencing image's directory, are
//    canonicalized and must stay inside the allowed directories;
//  - loops (same device+inode twice in one chain) and chains deeper than
//    max_chain_depth are refused;
//  - children that are backing files or parents are opened read-only;
//  - every file of the chain is opened, stat'ed and resolved through
//    OpenOptions::file_system (formats/file_system.h), so a test file system
//    can fail any of those opens.
// Every refusal throws ImageError naming the file, the field and the reason.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "formats/block_device.h"
#include "formats/file.h"
#include "formats/file_system.h"

namespace strata {

enum class Format { automatic, raw, qcow2, vhd };
std::optional<Format> parse_format(std::string_view name);
std::string_view to_string(Format f);

struct OpenOptions {
  Format format = Format::automatic;
  bool read_only = false;
  // Directories child images (backing, parent, data file) must live in. Empty:
  // the top image's own directory.
  std::vector<std::string> allowed_dirs;
  int max_chain_depth = 16;
  // qcow2: combined L2 + refcount cache budget in bytes; 0 = driver default
  // (enough to map the whole disk, capped at 32 MiB).
  uint64_t metadata_cache_bytes = 0;
  // qcow2: external data file path overriding the header extension.
  std::optional<std::string> data_file;
  // qcow2: a backing file without a recorded format may be treated as raw.
  bool allow_raw_backing_probe = false;
  // VHD: refuse a parent whose timestamp differs (otherwise: warn).
  bool vhd_strict_parent_timestamp = false;
  // VHD: virtual size rule: "current" (footer current size) or "chs".
  std::string vhd_size_mode = "current";
  // VHD: explicit virtual size override in bytes.
  std::optional<uint64_t> vhd_size_override;
  // Lock every file of the chain (lock_image); off only for read-only tools
  // that look at an image in use (like qemu-img -U).
  bool lock = true;
  // Opens, stats and resolves every file of the chain. Null means the host.
  std::shared_ptr<FileSystem> file_system = host_file_system();
};

// State carried down one chain while it is being opened.
struct ChainContext {
  OpenOptions options;
  std::vector<std::string> allowed_dirs;   // canonical
  std::set<std::pair<dev_t, ino_t>> seen;  // loop detection
  int depth = 0;                           // 0 = top image

  // The file system every open in this chain goes through.
  FileSystem& files() const {
    return options.file_system ? *options.file_system : *host_file_system();
  }
};

// Probes a file's format from its bytes: qcow2 by magic, VHD by footer cookie
// at the end (fixed) or at offset 0 (dynamic/differencing). Else raw.
Format probe_format(File& file);

// Opens the top image of an export.
std::shared_ptr<BlockDevice> open_image(const std::string& path, const OpenOptions& options);

// For drivers: opens a child image named by `name` (as stored in the parent
// image) relative to the directory of `referrer`, applying confinement, loop
// and depth checks. `format` automatic probes qcow2/VHD only unless raw is
// allowed. `writable` is only ever true for a qcow2 data file.
std::shared_ptr<BlockDevice> open_child(ChainContext& ctx, const std::string& referrer,
                                        const std::string& name, Format format, ChildRole role);

// For drivers: resolves and confines a child path without opening it as an
// image (used for data files). Returns the canonical path.
std::string resolve_child_path(const ChainContext& ctx, const std::string& referrer,
                               const std::string& name, ChildRole role);

// Opens an image file with a known format inside a chain (used by open_image
// and open_child). Registers the file's device+inode in ctx.seen.
std::shared_ptr<BlockDevice> open_with_format(ChainContext& ctx, const std::string& path,
                                              Format format, bool writable);

// Driver entry points (formats/raw, formats/vhd, formats/qcow2).
std::shared_ptr<BlockDevice> open_raw(std::unique_ptr<File> file, ChainContext& ctx);
std::shared_ptr<BlockDevice> open_vhd(std::unique_ptr<File> file, ChainContext& ctx);
std::shared_ptr<BlockDevice> open_qcow2(std::unique_ptr<File> file, ChainContext& ctx);

}  // namespace strata
