// Image creation for `strata create`.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "formats/open.h"

namespace strata {

struct CreateOptions {
  Format format = Format::raw;
  std::string path;
  // Virtual size in bytes; for images with a backing file/parent, defaults to
  // the backing image's size.
  std::optional<uint64_t> size;
  // Format-specific options from `-o key=value,...` (type, block_size,
  // cluster_size, ...). Unknown keys are refused by the driver.
  std::map<std::string, std::string> options;
  // Backing file / parent, as it will be recorded in the new image.
  std::optional<std::string> backing;
  Format backing_format = Format::automatic;
};

// Creates the image; throws ImageError with a message naming the option.
void create_image(const CreateOptions& opts);

void create_raw(const CreateOptions& opts);
void create_vhd(const CreateOptions& opts);    // formats/vhd
void create_qcow2(const CreateOptions& opts);  // formats/qcow2

// Parses "64M", "1G", "512", "1.5G" style sizes; throws std::invalid_argument.
uint64_t parse_size(const std::string& text);

}  // namespace strata
