// The image tool verbs of the `strata` binary: info, map, check, create.
// They work on every format the drivers know and follow the whole chain.
// Child images may live anywhere unless --allowed-dir narrows it: the tool is
// run by the image's owner, unlike the server, which confines children.
#pragma once

#include <string>
#include <vector>

#include "formats/create.h"
#include "formats/open.h"

namespace strata {

struct ToolOptions {
  Format format = Format::automatic;
  bool json_output = false;
  std::vector<std::string> allowed_dirs;
  bool allow_raw_backing = true;
  bool force_share = false;  // open images in use by others (no lock), like qemu-img -U
};

int tool_info(const std::string& path, const ToolOptions& t);
int tool_map(const std::string& path, const ToolOptions& t);
// Exit codes like qemu-img check: 0 clean, 2 corruption, 3 leaks only.
int tool_check(const std::string& path, const ToolOptions& t);
int tool_create(const CreateOptions& opts);

// `strata bitmap VERB IMAGE [NAME]`: the persistent dirty bitmaps of a qcow2
// image, with qemu-img bitmap's verbs (add, remove, clear, enable, disable)
// and list. Every verb but list opens the image read-write and locked.
struct BitmapArgs {
  std::string verb;
  std::string image;
  std::string name;
  uint64_t granularity = 65536;  // add
  bool disabled = false;         // add: created disabled
};
int tool_bitmap(const BitmapArgs& a, const ToolOptions& t);

}  // namespace strata
