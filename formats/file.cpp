#include "formats/file.h"

#include <algorithm>
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

int map_file(File& file, uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
  const int fd = file.fd();
  if (fd < 0) return ENOTSUP;
  const int64_t size = file.size();
  if (size < 0) return static_cast<int>(-size);
  const auto eof = static_cast<uint64_t>(size);
  const uint64_t in_file = offset >= eof ? 0 : std::min(length, eof - offset);
  append_piece(out, {.fd = fd, .host_offset = offset, .length = in_file});
  append_zeros(out, length - in_file);
  return 0;
}

}  // namespace strata
