#include "formats/file.h"

#include <cerrno>

#include "formats/errors.h"

namespace strata {

void File::run_batch(std::span<BatchIo> ops) {
  for (BatchIo& op : ops) {
    op.result = op.write ? write_at(op.offset, {op.data, op.length})
                         : read_at(op.offset, {op.data, op.length});
  }
}

void lock_image(File& file) {
  int e = file.lock();
  if (e != EWOULDBLOCK) return;  // locked, or no locks here (ENOLCK, EINVAL)
  throw ImageInUseError(file.path() + ": " +
                        (file.writable()
                             ? "in use: another export or process has this image open (it holds "
                               "a lock on it), so it cannot be opened read-write"
                             : "in use: another export or process has this image open read-write "
                               "(it holds a lock on it)"));
}

}  // namespace strata
