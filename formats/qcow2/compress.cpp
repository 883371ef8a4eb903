#include "formats/qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

#include <cerrno>

namespace strata::qcow2 {
namespace {

int inflate_raw(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  z_stream s{};
  // Raw deflate; a 32 KiB window also decodes QEMU's 4 KiB-window streams.
  if (inflateInit2(&s, -15) != Z_OK) return EIO;
  s.next_in = const_cast<Bytef*>(in);
  s.avail_in = static_cast<uInt>(in_len);
  s.next_out = out;
  s.avail_out = static_cast<uInt>(out_len);
  int r = inflate(&s, Z_FINISH);
  bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && s.avail_out == 0;
  inflateEnd(&s);
  return ok ? 0 : EIO;
}

int zstd_decode(const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len) {
  ZSTD_DStream* ds = ZSTD_createDStream();
  if (!ds) return ENOMEM;
  ZSTD_inBuffer ib{in, in_len, 0};
  ZSTD_outBuffer ob{out, out_len, 0};
  int result = EIO;
  while (ob.pos < ob.size) {
    size_t before_in = ib.pos, before_out = ob.pos;
    size_t r = ZSTD_decompressStream(ds, &ob, &ib);
    if (ZSTD_isError(r)) break;
    if (ob.pos == ob.size) {
      result = 0;
      break;
    }
    // No progress (input exhausted or a stalled frame): the data is bad.
    if (ib.pos == before_in && ob.pos == before_out) break;
    if (ib.pos == ib.size && r != 0 && ob.pos == before_out) break;
  }
  ZSTD_freeDStream(ds);
  return result;
}

}  // namespace

int decompress_cluster(uint8_t type, const uint8_t* in, size_t in_len, uint8_t* out,
                       size_t out_len) {
  if (type == 0) return inflate_raw(in, in_len, out, out_len);
  if (type == 1) return zstd_decode(in, in_len, out, out_len);
  return EIO;
}

}  // namespace strata::qcow2
