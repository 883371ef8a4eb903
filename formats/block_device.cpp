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
    case ChildRole::parent:
      return "parent";
    case ChildRole::data_file:
      return "data-file";
  }
  return "?";
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
