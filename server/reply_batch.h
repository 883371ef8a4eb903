// ReplyBatch: the replies of one batch of requests, sent together with one
// gather write. The iovecs point into `headers` and `data`, whose heap
// buffers do not move when the vectors grow.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "protocol/nbd.h"
#include "server/io_buffer.h"

namespace strata {

struct ReplyBatch {
  std::vector<iovec> iov;
  std::vector<nbd::Bytes> headers;
  std::vector<IoBuffer> data;
  uint64_t read_bytes = 0;  // payload bytes of successful reads, counted once sent

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
  // Keeps a read buffer alive until the batch is sent.
  void keep(IoBuffer buffer) { data.push_back(std::move(buffer)); }
  bool empty() const { return iov.empty(); }
  void clear() {
    iov.clear();
    headers.clear();
    data.clear();
    read_bytes = 0;
  }
};

}  // namespace strata
