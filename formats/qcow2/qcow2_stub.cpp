// Placeholder until the qcow2 driver lands: refuses qcow2 images cleanly.
#include "formats/create.h"
#include "formats/errors.h"
#include "formats/open.h"

namespace strata {

std::shared_ptr<BlockDevice> open_qcow2(std::unique_ptr<File> file, ChainContext&) {
  throw_image_error(file->path(), "qcow2 images are not supported yet");
}

void create_qcow2(const CreateOptions& opts) {
  throw_image_error(opts.path, "qcow2 creation is not supported yet");
}

}  // namespace strata
