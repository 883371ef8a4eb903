#include "formats/create.h"

#include <cmath>
#include <stdexcept>

#include "formats/errors.h"

namespace strata {

void create_image(const CreateOptions& opts) {
  switch (opts.format) {
    case Format::raw:
      return create_raw(opts);
    case Format::vhd:
      return create_vhd(opts);
    case Format::qcow2:
      return create_qcow2(opts);
    case Format::automatic:
      break;
  }
  throw_image_error(opts.path, "create needs a format (-f raw|qcow2|vhd)");
}

uint64_t parse_size(const std::string& text) {
  if (text.empty()) throw std::invalid_argument("empty size");
  size_t pos = 0;
  double value = std::stod(text, &pos);
  if (value < 0 || !std::isfinite(value)) throw std::invalid_argument("bad size '" + text + "'");
  std::string unit = text.substr(pos);
  double mult = 1;
  if (unit.empty() || unit == "B" || unit == "b") {
    mult = 1;
  } else if (unit == "K" || unit == "k" || unit == "KiB") {
    mult = 1024.0;
  } else if (unit == "M" || unit == "MiB") {
    mult = 1024.0 * 1024;
  } else if (unit == "G" || unit == "GiB") {
    mult = 1024.0 * 1024 * 1024;
  } else if (unit == "T" || unit == "TiB") {
    mult = 1024.0 * 1024 * 1024 * 1024;
  } else {
    throw std::invalid_argument("bad size unit in '" + text + "'");
  }
  double bytes = value * mult;
  if (bytes > 9.2e18) throw std::invalid_argument("size '" + text + "' too large");
  return static_cast<uint64_t>(bytes);
}

}  // namespace strata
