#include "tests/support/bytes.h"

#include <doctest/doctest.h>

namespace strata::test {

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(out.good());
}

void patch(const std::string& path, uint64_t off, const Bytes& b) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  REQUIRE(f.good());
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

uint64_t peek_be64(const std::string& path, uint64_t off) {
  auto bytes = file_bytes(path);
  REQUIRE(off + 8 <= bytes.size());
  uint64_t v = 0;
  for (uint64_t k = 0; k < 8; ++k) v = v << 8 | bytes[off + k];
  return v;
}

Bytes be16(uint16_t v) { return {uint8_t(v >> 8), uint8_t(v)}; }

Bytes be32(uint32_t v) { return {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)}; }

Bytes be64(uint64_t v) {
  auto a = be32(uint32_t(v >> 32)), b = be32(uint32_t(v));
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace strata::test
