#include "formats/file.h"

#include <cerrno>

#include "formats/errors.h"

namespace strata {

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
