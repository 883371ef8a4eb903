#include "server/request_reader.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "formats/endian.h"
#include "protocol/nbd.h"

namespace strata {

size_t RequestReader::take(void* dst, size_t n) {
  const size_t have = std::min(n, end_ - pos_);
  if (have) std::memcpy(dst, buf_.get() + pos_, have);
  pos_ += have;
  return have;
}

size_t RequestReader::skip(uint64_t n) {
  const auto have = static_cast<size_t>(std::min<uint64_t>(n, end_ - pos_));
  pos_ += have;
  return have;
}

std::span<uint8_t> RequestReader::free_space() {
  if (pos_ == end_) pos_ = end_ = 0;
  return {buf_.get() + end_, kCapacity - end_};
}

bool RequestReader::read_exact(Transport& t, void* dst, size_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  for (;;) {
    const size_t have = take(out, n);
    out += have;
    n -= have;
    if (n == 0) return true;
    // Large remainders go straight to their buffer; small ones refill ours.
    const bool direct = n >= kCapacity / 2;
    if (!direct) pos_ = end_ = 0;
    const ssize_t got = direct ? t.recv_some(out, n) : t.recv_some(buf_.get(), kCapacity);
    if (got <= 0) return false;
    if (direct) {
      out += got;
      n -= static_cast<size_t>(got);
      if (n == 0) return true;
    } else {
      end_ = static_cast<size_t>(got);
    }
  }
}

bool RequestReader::discard(Transport& t, uint64_t n) {
  n -= skip(n);
  std::vector<uint8_t> sink(std::min<uint64_t>(n, 1 << 20));
  while (n > 0) {
    const auto k = static_cast<size_t>(std::min<uint64_t>(n, sink.size()));
    if (!read_exact(t, sink.data(), k)) return false;
    n -= k;
  }
  return true;
}

bool RequestReader::request_buffered() const {
  if (end_ - pos_ < nbd::kRequestSize) return false;
  const uint8_t* p = buf_.get() + pos_;
  if (load_be16(p + 6) != nbd::kCmdWrite) return true;
  return end_ - pos_ >= nbd::kRequestSize + load_be32(p + 24);
}

uint32_t RequestReader::buffered_request_length() const {
  return load_be32(buf_.get() + pos_ + 24);
}

void RequestReader::unread_request_header() { pos_ -= nbd::kRequestSize; }

}  // namespace strata
