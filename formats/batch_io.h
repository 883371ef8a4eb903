// BatchIo: one read or write of a batch that a File or a BlockDevice may run
// all at once (File::run_batch, BlockDevice::run_batch).
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata {

struct BatchIo {
  uint64_t offset = 0;
  std::byte* data = nullptr;  // read into, or (write) written from and left as it was
  size_t length = 0;
  bool write = false;
  int result = 0;  // set by the run: 0 or a positive errno value, as read/write return
};

}  // namespace strata
