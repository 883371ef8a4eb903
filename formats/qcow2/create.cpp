// qcow2 image creation for `strata create`.
#include "formats/create.h"
#include "formats/errors.h"

namespace strata {

void create_qcow2(const CreateOptions& opts) {
  throw_image_error(opts.path, "qcow2 creation is not supported yet (use qemu-img create -f qcow2)");
}

}  // namespace strata
