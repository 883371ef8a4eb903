// Whole-file reads, byte patches and big-endian fields, for tests that build
// or corrupt images by hand.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace strata::test {

using Bytes = std::vector<uint8_t>;

// The whole file, as B (uint8_t, or std::byte to compare with device reads).
template <class B = uint8_t>
std::vector<B> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<B> b(std::filesystem::file_size(path));
  in.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(b.size()));
  return b;
}

void write_file(const std::string& path, const Bytes& b);
// Overwrites bytes of a file in place (corrupting images on purpose).
void patch(const std::string& path, uint64_t off, const Bytes& b);
// The big-endian 64-bit value at off.
uint64_t peek_be64(const std::string& path, uint64_t off);

Bytes be16(uint16_t v);
Bytes be32(uint32_t v);
Bytes be64(uint64_t v);

}  // namespace strata::test
