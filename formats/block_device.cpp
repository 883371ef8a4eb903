#include "formats/block_device.h"

#include <nlohmann/json.hpp>

#include "formats/errors.h"

namespace strata {

std::string_view to_string(ChildRole role) {
  switch (role) {
    case ChildRole::file:
      return "file";
    case ChildRole::backing:
      return "backing";
    case ChildRole::data_file:
      return "data-file";
  }
  return "?";
}

std::string_view child_noun(ChildRole role) {
  switch (role) {
    case ChildRole::file:
      return "file";
    case ChildRole::backing:
      return "backing file";
    case ChildRole::data_file:
      return "data file";
  }
  return "?";
}

std::string_view label(const Child& child) {
  return child.label.empty() ? to_string(child.role) : child.label;
}

void BlockDevice::run_batch(std::span<BatchIo> ops) {
  for (BatchIo& op : ops) {
    op.result = op.write ? write(op.offset, {op.data, op.length}, false)
                         : read(op.offset, {op.data, op.length});
  }
}

void BlockDevice::describe(nlohmann::json& out) const { (void)out; }

void append_extent(std::vector<Extent>& out, const Extent& e) {
  if (e.length == 0) return;
  if (!out.empty() && out.back().same_kind(e)) {
    out.back().length += e.length;
  } else {
    out.push_back(e);
  }
}

void throw_image_error(const std::string& path, const std::string& what) {
  throw ImageError(path + ": " + what);
}

}  // namespace strata
