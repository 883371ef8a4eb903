// On-disk structures of VHD (v1): the 512-byte hard-disk footer, the 1024-byte
// dynamic disk header with its parent locators, CHS geometry and the helpers
// to decode locator payloads. Pure code: no I/O. See docs/FORMATS.md Part A.
//
// All integers are big-endian on disk. Parse functions never throw: they return
// an error string (empty on success) naming the field that is wrong, and the
// caller prefixes the file name.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace strata::vhd {

constexpr uint32_t kSector = 512;
constexpr uint32_t kUnallocated = 0xFFFFFFFFu;
constexpr uint32_t kTypeFixed = 2;
constexpr uint32_t kTypeDynamic = 3;
constexpr uint32_t kTypeDifferencing = 4;
// QEMU's and the spec's limit for dynamic disks: 0xFF000000 sectors (2040 GiB).
constexpr uint64_t kMaxSize = 0xFF000000ull * kSector;
constexpr uint32_t kMinBlockSize = 512;
constexpr uint32_t kMaxBlockSize = 256u << 20;

// A block size the spec allows: a power of two (the BAT maps sector / spb),
// at least one sector, at most kMaxBlockSize (a hostile header must not make
// one block, or its bitmap, unreasonably large).
constexpr bool valid_block_size(uint64_t bs) {
  return bs >= kMinBlockSize && bs <= kMaxBlockSize && (bs & (bs - 1)) == 0;
}

// Bytes of the sector bitmap in front of every block: one bit per sector,
// rounded up to whole bytes and then to whole sectors, so a block of fewer
// than 8 sectors still has a one-sector bitmap. (QEMU's vpc driver rounds the
// byte count down first and gets 0 for blocks under 4 KiB, against the spec.)
constexpr uint32_t bitmap_bytes_for(uint32_t block_size) {
  const uint32_t bytes = (block_size / kSector + 7) / 8;
  return (bytes + kSector - 1) / kSector * kSector;
}
static_assert(bitmap_bytes_for(512) == 512 && bitmap_bytes_for(4096) == 512 &&
              bitmap_bytes_for(2u << 20) == 512 && bitmap_bytes_for(4u << 20) == 1024);
// Seconds between 1970-01-01 and 2000-01-01.
constexpr int64_t kVhdEpoch = 946684800;

// Locator platform codes (exact on-disk bytes).
constexpr uint32_t kPlatW2ru = 0x57327275;  // "W2ru": relative path, UTF-16LE
constexpr uint32_t kPlatW2ku = 0x57326B75;  // "W2ku": absolute path, UTF-16LE
constexpr uint32_t kPlatMacX = 0x4D616358;  // "MacX": file:// URL, UTF-8

// The spec's codes are mixed case; some writers store them upper case
// ("W2KU", "W2RU", "MACX"). Returns the spec code, or the input unchanged.
uint32_t canonical_platform(uint32_t code);

using Uuid = std::array<uint8_t, 16>;

struct Footer {
  uint32_t features = 2;
  uint32_t version = 0x00010000;
  uint64_t data_offset = ~0ull;
  uint32_t timestamp = 0;
  std::array<char, 4> creator_app{};
  uint32_t creator_version = 0;
  uint32_t creator_os = 0;
  uint64_t original_size = 0;
  uint64_t current_size = 0;
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors = 0;
  uint32_t disk_type = 0;
  uint32_t checksum = 0;
  Uuid unique_id{};
  uint8_t saved_state = 0;
  // Bytes 85..511 are kept verbatim (blktap stores flags there; the checksum covers them).
  std::array<uint8_t, 427> reserved{};
};

struct Locator {
  uint32_t platform = 0;
  uint32_t data_space = 0;
  uint32_t data_length = 0;
  uint64_t data_offset = 0;
};

struct DynHeader {
  uint64_t data_offset = ~0ull;
  uint64_t table_offset = 0;
  uint32_t version = 0x00010000;
  uint32_t max_table_entries = 0;
  uint32_t block_size = 0;
  uint32_t checksum = 0;
  Uuid parent_id{};
  uint32_t parent_timestamp = 0;
  std::array<uint8_t, 512> parent_name_raw{};  // UTF-16BE, NUL padded
  std::array<Locator, 8> locators{};
};

// Checksum as the spec defines it: NOT of the byte sum, with the 4 bytes at
// `checksum_off` counted as zero.
uint32_t checksum(const uint8_t* data, size_t len, size_t checksum_off);

// Parses 512 footer bytes. Returns "" on success, else what is wrong.
std::string parse_footer(const uint8_t* buf, Footer& out);
void serialize_footer(const Footer& f, uint8_t* buf);  // computes the checksum

std::string parse_header(const uint8_t* buf, DynHeader& out);
void serialize_header(const DynHeader& h, uint8_t* buf);  // computes the checksum

std::string disk_type_name(uint32_t type);
std::string creator_string(const std::array<char, 4>& app);
std::string uuid_string(const Uuid& id);
Uuid random_uuid();

// Spec CHS algorithm (as QEMU implements it) for a sector count.
struct Geometry {
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors = 0;
  uint64_t total() const { return uint64_t{cylinders} * heads * sectors; }
};
Geometry calculate_geometry(uint64_t total_sectors);
constexpr uint64_t kMaxGeometrySectors = 65535ull * 16 * 255;

// Does QEMU size this image by its current size (true) or by CHS (false)?
bool qemu_uses_current_size(const Footer& f);

// UTF-16 decoding, lenient: lone surrogates become U+FFFD. Stops at NUL.
std::string utf16_to_utf8(const uint8_t* data, size_t len, bool big_endian);
std::vector<uint8_t> utf8_to_utf16(const std::string& s, bool big_endian);

// Locator data space in bytes, following blktap: < 512 means sectors.
// Returns nullopt if the value is not usable.
std::optional<uint64_t> locator_space_bytes(uint32_t data_space);

std::string platform_name(uint32_t code);

// Turns a decoded locator payload into candidate host paths (relative ones
// are relative to the child's directory), in the order to try them.
std::vector<std::string> locator_paths(uint32_t platform, const std::string& text);

}  // namespace strata::vhd
