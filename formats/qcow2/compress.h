// Decompression of qcow2 compressed clusters: raw deflate (compression type 0,
// "zlib") and zstd (type 1). Output must be exactly one cluster.
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata::qcow2 {

// Returns 0 when exactly out_len bytes were produced, EIO otherwise.
int decompress_cluster(uint8_t type, const uint8_t* in, size_t in_len, uint8_t* out,
                       size_t out_len);

}  // namespace strata::qcow2
