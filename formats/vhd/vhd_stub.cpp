// Placeholder until the VHD driver lands: refuses VHD images cleanly.
#include "formats/create.h"
#include "formats/errors.h"
#include "formats/open.h"

namespace strata {

std::shared_ptr<BlockDevice> open_vhd(std::unique_ptr<File> file, ChainContext&) {
  throw_image_error(file->path(), "VHD images are not supported yet");
}

void create_vhd(const CreateOptions& opts) {
  throw_image_error(opts.path, "VHD creation is not supported yet");
}

}  // namespace strata
