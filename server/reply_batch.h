// ReplyBatch: the replies of one batch of requests, sent together with one
// gather write. The iovecs point into `headers` and `data`, whose heap
// buffers do not move when the vectors grow, and into a static zero buffer.
//
// A copy-free read reply (RequestExecutor::read, BlockDevice::map_host) adds
// file pieces: `files` lists them in order, each placed before the iovec at
// its `at` index, and the transport sends them from the page cache
// (Transport::send_with_files). A batch without file pieces is one gather
// write, as before.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "formats/host_piece.h"
#include "protocol/nbd.h"
#include "server/io_buffer.h"
#include "server/transport.h"

namespace strata {

// Zeros that zero runs of copy-free replies point at (never written).
inline std::span<std::byte> shared_zeros() {
  static std::vector<std::byte> zeros(1 << 20);
  return zeros;
}

struct ReplyBatch {
  std::vector<iovec> iov;
  std::vector<nbd::Bytes> headers;
  std::vector<IoBuffer> data;
  std::vector<FileSpan> files;
  uint64_t read_bytes = 0;       // payload bytes of successful reads, counted once sent
  uint64_t copy_free_bytes = 0;  // of which sent from files (`files`)

  void reserve(size_t replies) {
    iov.reserve(2 * replies);
    headers.reserve(replies);
    data.reserve(replies);
  }
  void add_header(nbd::Bytes h) {
    headers.push_back(std::move(h));
    iov.push_back({headers.back().data(), headers.back().size()});
  }
  void add_data(std::byte* p, size_t n) { iov.push_back({p, n}); }
  // Payload made of host pieces: file pieces go out from the file, zero runs
  // from shared_zeros().
  void add_pieces(std::span<const HostPiece> pieces) {
    for (const HostPiece& p : pieces) {
      if (!p.zero()) {
        files.push_back(
            {.at = iov.size(), .fd = p.fd, .offset = p.host_offset, .length = p.length});
        copy_free_bytes += p.length;
        continue;
      }
      const std::span<std::byte> zeros = shared_zeros();
      for (uint64_t left = p.length; left > 0;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(left, zeros.size()));
        add_data(zeros.data(), n);
        left -= n;
      }
    }
  }
  // Keeps a read buffer alive until the batch is sent.
  void keep(IoBuffer buffer) { data.push_back(std::move(buffer)); }
  bool empty() const { return iov.empty() && files.empty(); }
  void clear() {
    iov.clear();
    headers.clear();
    data.clear();
    files.clear();
    read_bytes = 0;
    copy_free_bytes = 0;
  }
};

}  // namespace strata
