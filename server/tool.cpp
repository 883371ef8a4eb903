#include "server/tool.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>

#include "config/config.h"
#include "formats/create.h"
#include "formats/errors.h"
#include "formats/qcow2/qcow2.h"

namespace strata {

using nlohmann::json;

namespace {

OpenOptions tool_open_options(const ToolOptions& t) {
  OpenOptions o;
  o.format = t.format;
  o.read_only = true;
  o.allowed_dirs = t.allowed_dirs.empty() ? std::vector<std::string>{"/"} : t.allowed_dirs;
  o.allow_raw_backing_probe = t.allow_raw_backing;
  o.lock = !t.force_share;
  return o;
}

json describe_layer(const BlockDevice& dev) {
  json j;
  j["filename"] = dev.path();
  j["format"] = std::string(dev.format());
  j["virtual-size"] = dev.size();
  json details = json::object();
  dev.describe(details);
  if (!details.empty()) j["format-specific"] = details;
  for (const auto& c : dev.children()) {
    if (c.device) j[std::string(label(c))] = describe_layer(*c.device);
  }
  return j;
}

// One line per bitmap, as qemu-img info shows them: name, granularity, flags.
void print_bitmap_text(const json& b, const std::string& pad) {
  std::string flags;
  for (const auto& f : b["flags"]) flags += (flags.empty() ? "" : ", ") + f.get<std::string>();
  std::cout << pad << b["name"].get<std::string>() << ": granularity "
            << b["granularity"].get<uint64_t>() << ", flags [" << flags << "]";
  if (b.contains("problem")) std::cout << ", inconsistent: " << b["problem"].get<std::string>();
  std::cout << "\n";
}

void print_layer_text(const json& j, int indent) {
  std::string pad(indent, ' ');
  std::cout << pad << "image: " << j["filename"].get<std::string>() << "\n";
  std::cout << pad << "file format: " << j["format"].get<std::string>() << "\n";
  std::cout << pad << "virtual size: " << j["virtual-size"].get<uint64_t>() << " bytes\n";
  if (j.contains("format-specific")) {
    for (auto it = j["format-specific"].begin(); it != j["format-specific"].end(); ++it) {
      if (it.key() == "bitmaps" && it->is_array()) {
        std::cout << pad << "bitmaps:\n";
        for (const auto& b : *it) print_bitmap_text(b, pad + "  ");
        continue;
      }
      std::cout << pad << it.key() << ": "
                << (it->is_string() ? it->get<std::string>() : it->dump()) << "\n";
    }
  }
  for (const char* role : {"backing", "parent", "data-file"}) {
    if (j.contains(role)) {
      std::cout << pad << role << ":\n";
      print_layer_text(j[role], indent + 2);
    }
  }
}

// Path of the layer at `depth` (1 = top) following backing children (qcow2
// backing files and VHD parents alike).
std::string layer_path(const BlockDevice& top, uint32_t depth) {
  const BlockDevice* d = &top;
  for (uint32_t i = 1; i < depth && d; ++i) {
    const BlockDevice* next = nullptr;
    for (const auto& c : d->children()) {
      if (c.role == ChildRole::backing) next = c.device.get();
    }
    d = next;
  }
  return d ? d->path() : "";
}

}  // namespace

int tool_info(const std::string& path, const ToolOptions& t) {
  auto dev = open_image(path, tool_open_options(t));
  json j = describe_layer(*dev);
  if (t.json_output) {
    std::cout << j.dump(2) << "\n";
  } else {
    print_layer_text(j, 0);
  }
  return 0;
}

int tool_map(const std::string& path, const ToolOptions& t) {
  auto dev = open_image(path, tool_open_options(t));
  std::vector<Extent> ext;
  uint64_t off = 0;
  const uint64_t size = dev->size();
  json out = json::array();
  if (!t.json_output)
    std::printf("%-16s %-16s %-6s %-5s %s\n", "Offset", "Length", "Depth", "Zero", "File");
  while (off < size) {
    ext.clear();
    uint64_t len = std::min<uint64_t>(size - off, 1ull << 30);
    if (int r = dev->extents(off, len, ext)) {
      throw ImageError(path + ": cannot map at offset " + std::to_string(off) + ": " +
                       std::strerror(r));
    }
    if (ext.empty()) throw ImageError(path + ": driver returned no extents");
    for (const auto& e : ext) {
      uint64_t l = std::min<uint64_t>(e.length, size - off);
      if (l == 0) break;
      if (t.json_output) {
        json x;
        x["start"] = off;
        x["length"] = l;
        x["depth"] = e.depth;
        x["present"] = !e.hole;
        x["zero"] = e.zero;
        x["data"] = !e.hole && !e.zero;
        if (!e.hole && e.depth > 0) x["file"] = layer_path(*dev, e.depth);
        if (!out.empty() && out.back()["depth"] == x["depth"] && out.back()["zero"] == x["zero"] &&
            out.back()["present"] == x["present"]) {
          out.back()["length"] = out.back()["length"].get<uint64_t>() + l;
        } else {
          out.push_back(x);
        }
      } else {
        std::printf("%#-16" PRIx64 " %#-16" PRIx64 " %-6u %-5s %s\n", off, l, e.depth,
                    e.zero ? "yes" : "no", e.hole ? "-" : layer_path(*dev, e.depth).c_str());
      }
      off += l;
    }
  }
  if (t.json_output) std::cout << out.dump(2) << "\n";
  return 0;
}

int tool_check(const std::string& path, const ToolOptions& t) {
  auto dev = open_image(path, tool_open_options(t));
  CheckReport report;
  dev->check(report);
  if (t.json_output) {
    json j;
    j["filename"] = path;
    j["format"] = std::string(dev->format());
    j["corruptions"] = report.errors;
    j["leaks"] = report.leaks;
    j["notes"] = report.notes;
    std::cout << j.dump(2) << "\n";
  } else {
    for (const auto& e : report.errors) std::cout << "ERROR: " << e << "\n";
    for (const auto& l : report.leaks) std::cout << "Leaked: " << l << "\n";
    for (const auto& n : report.notes) std::cout << n << "\n";
    if (report.errors.empty() && report.leaks.empty()) {
      std::cout << "No errors were found on the image.\n";
    } else {
      std::cout << report.errors.size() << " errors and " << report.leaks.size()
                << " leaks were found on the image.\n";
    }
  }
  if (!report.errors.empty()) return 2;
  if (!report.leaks.empty()) return 3;
  return 0;
}

int tool_bitmap(const BitmapArgs& a, const ToolOptions& t) {
  // The driver's statistics at close are for servers, not for a one-off edit.
  if (spdlog::get_level() == spdlog::level::info) spdlog::set_level(spdlog::level::warn);
  OpenOptions o = tool_open_options(t);
  o.read_only = a.verb == "list";
  auto dev = open_image(a.image, o);
  // The verbs edit qcow2 metadata: they need the driver itself, not the
  // BlockDevice interface the server sees.
  auto* q = dynamic_cast<qcow2::Qcow2Device*>(dev.get());
  if (!q) throw ImageError(a.image + ": only qcow2 images have persistent bitmaps");
  if (a.verb == "list") {
    json info;
    q->describe(info);
    json list = info.contains("bitmaps") ? info["bitmaps"] : json::array();
    if (t.json_output) {
      std::cout << list.dump(2) << "\n";
    } else {
      for (const auto& b : list) print_bitmap_text(b, "");
    }
    return 0;
  }
  if (a.name.empty()) throw ConfigError("bitmap " + a.verb + ": a bitmap NAME is needed");
  std::string error;
  if (a.verb == "add") {
    if (a.granularity == 0 || (a.granularity & (a.granularity - 1)))
      throw ConfigError("bitmap add: the granularity must be a power of two");
    error =
        q->bitmap_add(a.name, static_cast<uint32_t>(std::countr_zero(a.granularity)), !a.disabled);
  } else if (a.verb == "remove") {
    error = q->bitmap_remove(a.name);
  } else if (a.verb == "clear") {
    error = q->bitmap_clear(a.name);
  } else if (a.verb == "enable" || a.verb == "disable") {
    error = q->bitmap_enable(a.name, a.verb == "enable");
  } else {
    throw ConfigError("bitmap: unknown verb '" + a.verb + "'");
  }
  if (!error.empty()) throw ImageError(a.image + ": bitmap '" + a.name + "': " + error);
  return 0;
}

int tool_create(const CreateOptions& opts) {
  create_image(opts);
  std::cout << "Formatting '" << opts.path << "', fmt=" << to_string(opts.format);
  if (opts.size) std::cout << " size=" << *opts.size;
  if (opts.backing) std::cout << " backing_file=" << *opts.backing;
  std::cout << "\n";
  return 0;
}

}  // namespace strata
