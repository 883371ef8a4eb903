// IoBuffer: the heap buffer of one request's data (a WRITE's payload, a
// READ's reply). An export served with cache none reads and writes them with
// O_DIRECT, which wants them aligned (else formats/direct_file.h copies
// through a bounce buffer); every other export takes a plain malloc, since
// an aligned allocation costs about five small ones.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace strata {

struct FreeBuffer {
  void operator()(std::byte* p) const { std::free(p); }
};
using IoBuffer = std::unique_ptr<std::byte[], FreeBuffer>;

// `alignment` 0: no alignment beyond malloc's. Throws std::bad_alloc.
inline IoBuffer make_io_buffer(size_t size, size_t alignment) {
  size = size ? size : 1;
  void* p = alignment
                ? std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment)
                : std::malloc(size);
  if (!p) throw std::bad_alloc();
  return IoBuffer(static_cast<std::byte*>(p));
}

}  // namespace strata
