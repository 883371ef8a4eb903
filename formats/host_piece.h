// HostPiece: where the bytes of a guest range live on the host, for replies
// the kernel sends straight from the page cache (BlockDevice::map_host).
//
// A mapping is a list of pieces covering the range in order: either `length`
// bytes of the open file `fd` at `host_offset`, which are exactly the guest's
// bytes, or (fd < 0) `length` zero bytes. The descriptors belong to the
// drivers' Files and stay open as long as the device does.
#pragma once

#include <cstdint>
#include <vector>

namespace strata {

struct HostPiece {
  int fd = -1;  // -1: a run of zeros
  uint64_t host_offset = 0;
  uint64_t length = 0;

  bool zero() const { return fd < 0; }
};

// Appends a piece, merged with the last one where they are contiguous.
inline void append_piece(std::vector<HostPiece>& out, const HostPiece& p) {
  if (p.length == 0) return;
  if (!out.empty()) {
    HostPiece& last = out.back();
    if (last.fd == p.fd && (p.zero() || last.host_offset + last.length == p.host_offset)) {
      last.length += p.length;
      return;
    }
  }
  out.push_back(p);
}

inline void append_zeros(std::vector<HostPiece>& out, uint64_t length) {
  append_piece(out, {.fd = -1, .host_offset = 0, .length = length});
}

}  // namespace strata
