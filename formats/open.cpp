#include "formats/open.h"

#include <array>
#include <cstring>
#include <filesystem>

#include "formats/errors.h"

namespace fs = std::filesystem;

namespace strata {

std::optional<Format> parse_format(std::string_view name) {
  if (name == "auto") return Format::automatic;
  if (name == "raw") return Format::raw;
  if (name == "qcow2") return Format::qcow2;
  if (name == "vhd" || name == "vpc") return Format::vhd;
  return std::nullopt;
}

std::string_view to_string(Format f) {
  switch (f) {
    case Format::automatic:
      return "auto";
    case Format::raw:
      return "raw";
    case Format::qcow2:
      return "qcow2";
    case Format::vhd:
      return "vhd";
  }
  return "?";
}

Format probe_format(File& file) {
  std::array<std::byte, 8> head{};
  if (file.read_at(0, head) != 0) return Format::raw;
  if (std::memcmp(head.data(), "QFI\xfb", 4) == 0) return Format::qcow2;
  if (std::memcmp(head.data(), "conectix", 8) == 0) return Format::vhd;
  int64_t size = file.size();
  if (size >= 512) {
    std::array<std::byte, 8> tail{};
    if (file.read_at(static_cast<uint64_t>(size) - 512, tail) == 0 &&
        std::memcmp(tail.data(), "conectix", 8) == 0) {
      return Format::vhd;
    }
  }
  return Format::raw;
}

namespace {

// Path arithmetic (lexically_*, parent_path, operator/) is pure and stays on
// std::filesystem::path; whatever asks the host goes through ctx.files().
std::string canonical_dir(FileSystem& files, const std::string& dir) {
  std::error_code ec;
  std::string p = files.weakly_canonical(files.absolute(dir), ec);
  if (ec) return fs::path(files.absolute(dir)).lexically_normal().string();
  return p;
}

bool inside(const std::string& path, const std::string& dir) {
  fs::path rel = fs::path(path).lexically_relative(dir);
  if (rel.empty()) return false;
  auto first = *rel.begin();
  return first != "..";
}

}  // namespace

std::shared_ptr<BlockDevice> open_with_format(ChainContext& ctx, const std::string& path,
                                              Format format, bool writable) {
  auto file = ctx.files().open(path, writable);
  auto key = std::make_pair(file->device(), file->inode());
  if (!ctx.seen.insert(key).second) {
    throw_image_error(path, "loop in the backing chain: this file is already part of it");
  }
  if (ctx.options.lock) lock_image(*file);
  if (format == Format::automatic) format = probe_format(*file);
  switch (format) {
    case Format::raw:
      return open_raw(std::move(file), ctx);
    case Format::qcow2:
      return open_qcow2(std::move(file), ctx);
    case Format::vhd:
      return open_vhd(std::move(file), ctx);
    case Format::automatic:
      break;
  }
  throw_image_error(path, "unknown format");
}

std::shared_ptr<BlockDevice> open_image(const std::string& path, const OpenOptions& options) {
  ChainContext ctx;
  ctx.options = options;
  if (options.allowed_dirs.empty()) {
    ctx.allowed_dirs.push_back(
        canonical_dir(ctx.files(), fs::path(ctx.files().absolute(path)).parent_path()));
  } else {
    for (const auto& d : options.allowed_dirs) {
      ctx.allowed_dirs.push_back(canonical_dir(ctx.files(), d));
    }
  }
  return open_with_format(ctx, path, options.format, !options.read_only);
}

std::string resolve_child_path(const ChainContext& ctx, const std::string& referrer,
                               const std::string& name, ChildRole role) {
  std::string what = std::string(child_noun(role));
  if (name.empty()) throw_image_error(referrer, what + " name is empty");
  if (name.rfind("json:", 0) == 0) {
    throw_image_error(referrer, what + " name '" + name + "': json: specifications are refused");
  }
  auto colon = name.find(':');
  auto slash = name.find('/');
  if (colon != std::string::npos && (slash == std::string::npos || colon < slash) &&
      name.find("://") != std::string::npos) {
    throw_image_error(referrer, what + " name '" + name + "': protocol prefixes are refused");
  }
  fs::path p(name);
  if (p.is_relative()) p = fs::path(ctx.files().absolute(referrer)).parent_path() / p;
  std::error_code ec;
  fs::path canon = ctx.files().canonical(p.string(), ec);
  if (ec) {
    throw_image_error(referrer, what + " '" + name + "' (" + p.lexically_normal().string() +
                                    "): " + ec.message());
  }
  bool ok = false;
  for (const auto& dir : ctx.allowed_dirs) ok = ok || inside(canon.string(), dir);
  if (!ok) {
    throw_image_error(referrer, what + " '" + name + "' resolves to " + canon.string() +
                                    ", outside the allowed directories");
  }
  return canon.string();
}

std::shared_ptr<BlockDevice> open_child(ChainContext& ctx, const std::string& referrer,
                                        const std::string& name, Format format, ChildRole role) {
  std::string path = resolve_child_path(ctx, referrer, name, role);
  if (ctx.depth + 1 > ctx.options.max_chain_depth) {
    throw_image_error(referrer, std::string(to_string(role)) + " chain deeper than " +
                                    std::to_string(ctx.options.max_chain_depth) + " images");
  }
  bool writable = role == ChildRole::data_file && !ctx.options.read_only;
  if (format == Format::automatic && role != ChildRole::data_file) {
    // Probe for qcow2/VHD only: treating an unnamed format as raw needs an opt-in.
    auto file = ctx.files().open(path, false);
    format = probe_format(*file);
    if (format == Format::raw && !ctx.options.allow_raw_backing_probe) {
      throw_image_error(referrer, std::string(child_noun(role)) + " '" + name +
                                      "' has no recorded format and is not qcow2 or VHD; "
                                      "set allow_raw_backing_probe to treat it as raw");
    }
  }
  ++ctx.depth;
  auto dev = open_with_format(ctx, path, format, writable);
  --ctx.depth;
  return dev;
}

}  // namespace strata
