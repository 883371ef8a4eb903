#include "formats/vhd/vhd_format.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <random>

#include "formats/endian.h"

namespace strata::vhd {

namespace {
// The cookies open the footer and the dynamic header; 8 bytes, no terminator.
constexpr std::array<char, 8> kFooterCookie = {'c', 'o', 'n', 'e', 'c', 't', 'i', 'x'};
constexpr std::array<char, 8> kHeaderCookie = {'c', 'x', 's', 'p', 'a', 'r', 's', 'e'};
}  // namespace

uint32_t checksum(const uint8_t* data, size_t len, size_t checksum_off) {
  uint32_t sum = 0;
  for (size_t i = 0; i < len; ++i) {
    if (i >= checksum_off && i < checksum_off + 4) continue;
    sum += data[i];
  }
  return ~sum;
}

std::string parse_footer(const uint8_t* b, Footer& f) {
  if (std::memcmp(b, kFooterCookie.data(), kFooterCookie.size()) != 0)
    return "cookie is not 'conectix'";
  f.features = load_be32(b + 8);
  f.version = load_be32(b + 12);
  f.data_offset = load_be64(b + 16);
  f.timestamp = load_be32(b + 24);
  std::memcpy(f.creator_app.data(), b + 28, 4);
  f.creator_version = load_be32(b + 32);
  f.creator_os = load_be32(b + 36);
  f.original_size = load_be64(b + 40);
  f.current_size = load_be64(b + 48);
  f.cylinders = load_be16(b + 56);
  f.heads = b[58];
  f.sectors = b[59];
  f.disk_type = load_be32(b + 60);
  f.checksum = load_be32(b + 64);
  std::memcpy(f.unique_id.data(), b + 68, 16);
  f.saved_state = b[84];
  std::memcpy(f.reserved.data(), b + 85, f.reserved.size());
  uint32_t want = checksum(b, 512, 64);
  if (want != f.checksum) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "checksum 0x%08x does not match the computed 0x%08x", f.checksum,
                  want);
    return msg;
  }
  if ((f.version >> 16) != 1) {
    return "file format version 0x" + [&] {
      char h[16];
      std::snprintf(h, sizeof h, "%08x", f.version);
      return std::string(h);
    }() + " is not 1.x";
  }
  if (f.disk_type != kTypeFixed && f.disk_type != kTypeDynamic &&
      f.disk_type != kTypeDifferencing) {
    return "disk type " + std::to_string(f.disk_type) +
           " is not fixed (2), dynamic (3) or differencing (4)";
  }
  return {};
}

void serialize_footer(const Footer& f, uint8_t* b) {
  std::memset(b, 0, 512);
  std::memcpy(b, kFooterCookie.data(), kFooterCookie.size());
  store_be32(b + 8, f.features);
  store_be32(b + 12, f.version);
  store_be64(b + 16, f.data_offset);
  store_be32(b + 24, f.timestamp);
  std::memcpy(b + 28, f.creator_app.data(), 4);
  store_be32(b + 32, f.creator_version);
  store_be32(b + 36, f.creator_os);
  store_be64(b + 40, f.original_size);
  store_be64(b + 48, f.current_size);
  store_be16(b + 56, f.cylinders);
  b[58] = f.heads;
  b[59] = f.sectors;
  store_be32(b + 60, f.disk_type);
  std::memcpy(b + 68, f.unique_id.data(), 16);
  b[84] = f.saved_state;
  std::memcpy(b + 85, f.reserved.data(), f.reserved.size());
  store_be32(b + 64, checksum(b, 512, 64));
}

std::string parse_header(const uint8_t* b, DynHeader& h) {
  if (std::memcmp(b, kHeaderCookie.data(), kHeaderCookie.size()) != 0)
    return "cookie is not 'cxsparse'";
  h.data_offset = load_be64(b + 8);
  h.table_offset = load_be64(b + 16);
  h.version = load_be32(b + 24);
  h.max_table_entries = load_be32(b + 28);
  h.block_size = load_be32(b + 32);
  h.checksum = load_be32(b + 36);
  std::memcpy(h.parent_id.data(), b + 40, 16);
  h.parent_timestamp = load_be32(b + 56);
  std::memcpy(h.parent_name_raw.data(), b + 64, 512);
  for (int i = 0; i < 8; ++i) {
    const uint8_t* e = b + 576 + size_t{24} * i;
    h.locators[i] = {load_be32(e), load_be32(e + 4), load_be32(e + 8), load_be64(e + 16)};
  }
  uint32_t want = checksum(b, 1024, 36);
  if (want != h.checksum) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "checksum 0x%08x does not match the computed 0x%08x", h.checksum,
                  want);
    return msg;
  }
  if ((h.version >> 16) != 1) return "header version is not 1.x";
  return {};
}

void serialize_header(const DynHeader& h, uint8_t* b) {
  std::memset(b, 0, 1024);
  std::memcpy(b, kHeaderCookie.data(), kHeaderCookie.size());
  store_be64(b + 8, h.data_offset);
  store_be64(b + 16, h.table_offset);
  store_be32(b + 24, h.version);
  store_be32(b + 28, h.max_table_entries);
  store_be32(b + 32, h.block_size);
  std::memcpy(b + 40, h.parent_id.data(), 16);
  store_be32(b + 56, h.parent_timestamp);
  std::memcpy(b + 64, h.parent_name_raw.data(), 512);
  for (int i = 0; i < 8; ++i) {
    uint8_t* e = b + 576 + size_t{24} * i;
    const Locator& l = h.locators[i];
    store_be32(e, l.platform);
    store_be32(e + 4, l.data_space);
    store_be32(e + 8, l.data_length);
    store_be64(e + 16, l.data_offset);
  }
  store_be32(b + 36, checksum(b, 1024, 36));
}

std::string disk_type_name(uint32_t type) {
  switch (type) {
    case kTypeFixed:
      return "fixed";
    case kTypeDynamic:
      return "dynamic";
    case kTypeDifferencing:
      return "differencing";
  }
  return "type " + std::to_string(type);
}

std::string creator_string(const std::array<char, 4>& app) {
  std::string s;
  for (char c : app) {
    if (c == 0) break;
    s += (c >= 32 && c < 127) ? c : '?';
  }
  return s;
}

std::string uuid_string(const Uuid& id) {
  char buf[40];
  std::snprintf(buf, sizeof buf,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", id[0],
                id[1], id[2], id[3], id[4], id[5], id[6], id[7], id[8], id[9], id[10], id[11],
                id[12], id[13], id[14], id[15]);
  return buf;
}

Uuid random_uuid() {
  std::random_device rd;
  Uuid id;
  for (size_t i = 0; i < id.size(); i += 4) {
    uint32_t v = rd();
    std::memcpy(id.data() + i, &v, 4);
  }
  id[6] = static_cast<uint8_t>((id[6] & 0x0F) | 0x40);  // version 4
  id[8] = static_cast<uint8_t>((id[8] & 0x3F) | 0x80);  // RFC 4122 variant
  return id;
}

Geometry calculate_geometry(uint64_t total_sectors) {
  total_sectors = std::min(total_sectors, kMaxGeometrySectors);
  Geometry g;
  uint64_t cth;
  if (total_sectors >= 65535ull * 16 * 63) {
    g.sectors = 255;
    g.heads = 16;
    cth = total_sectors / 255;
  } else {
    uint64_t spt = 17;
    cth = total_sectors / spt;
    uint64_t heads = std::max<uint64_t>((cth + 1023) / 1024, 4);
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = total_sectors / spt;
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = total_sectors / spt;
    }
    g.sectors = static_cast<uint8_t>(spt);
    g.heads = static_cast<uint8_t>(heads);
  }
  g.cylinders = static_cast<uint16_t>(std::min<uint64_t>(cth / g.heads, 65535));
  return g;
}

bool qemu_uses_current_size(const Footer& f) {
  const char* a = f.creator_app.data();
  if (std::memcmp(a, "win ", 4) == 0 || std::memcmp(a, "qem2", 4) == 0 ||
      std::memcmp(a, "d2v", 3) == 0 || std::memcmp(a, "CTXS", 4) == 0 ||
      std::memcmp(a, "tap\0", 4) == 0) {
    return true;
  }
  return f.cylinders == 65535 && f.heads == 16 && f.sectors == 255;
}

namespace {

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace

std::string utf16_to_utf8(const uint8_t* data, size_t len, bool big_endian) {
  std::string out;
  size_t n = len / 2;
  auto unit = [&](size_t i) -> uint32_t {
    return big_endian ? (uint32_t{data[2 * i]} << 8) | data[2 * i + 1]
                      : (uint32_t{data[2 * i + 1]} << 8) | data[2 * i];
  };
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = unit(i);
    if (u == 0) break;
    if (u >= 0xD800 && u < 0xDC00 && i + 1 < n) {
      uint32_t lo = unit(i + 1);
      if (lo >= 0xDC00 && lo < 0xE000) {
        append_utf8(out, 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00));
        ++i;
        continue;
      }
    }
    if (u >= 0xD800 && u < 0xE000) u = 0xFFFD;
    append_utf8(out, u);
  }
  return out;
}

std::vector<uint8_t> utf8_to_utf16(const std::string& s, bool big_endian) {
  std::vector<uint8_t> out;
  auto put = [&](uint32_t u) {
    if (big_endian) {
      out.push_back(static_cast<uint8_t>(u >> 8));
      out.push_back(static_cast<uint8_t>(u));
    } else {
      out.push_back(static_cast<uint8_t>(u));
      out.push_back(static_cast<uint8_t>(u >> 8));
    }
  };
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<uint8_t>(s[i]);
    uint32_t cp;
    size_t extra;
    if (c < 0x80) {
      cp = c;
      extra = 0;
    } else if ((c >> 5) == 6) {
      cp = c & 0x1F;
      extra = 1;
    } else if ((c >> 4) == 14) {
      cp = c & 0x0F;
      extra = 2;
    } else {
      cp = c & 0x07;
      extra = 3;
    }
    ++i;
    for (size_t k = 0; k < extra && i < s.size(); ++k, ++i) {
      cp = (cp << 6) | (static_cast<uint8_t>(s[i]) & 0x3F);
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      put(0xD800 + (cp >> 10));
      put(0xDC00 + (cp & 0x3FF));
    } else {
      put(cp);
    }
  }
  return out;
}

std::optional<uint64_t> locator_space_bytes(uint32_t data_space) {
  if (data_space < 512) return uint64_t{data_space} * 512;
  if (data_space % 512 != 0) return std::nullopt;
  return data_space;
}

uint32_t canonical_platform(uint32_t code) {
  switch (code) {
    case 0x57324B55:  // "W2KU"
      return kPlatW2ku;
    case 0x57325255:  // "W2RU"
      return kPlatW2ru;
    case 0x4D414358:  // "MACX"
      return kPlatMacX;
  }
  return code;
}

std::string platform_name(uint32_t code) {
  std::string s;
  for (int shift = 24; shift >= 0; shift -= 8) {
    char c = static_cast<char>((code >> shift) & 0xFF);
    s += (c >= 32 && c < 127) ? c : '?';
  }
  return s;
}

namespace {

std::string percent_decode(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string strip_dot_slash(std::string p) {
  while (p.rfind("./", 0) == 0) p.erase(0, 2);
  return p;
}

}  // namespace

std::vector<std::string> locator_paths(uint32_t platform, const std::string& text) {
  std::vector<std::string> out;
  if (text.empty()) return out;
  if (platform == kPlatW2ru || platform == kPlatW2ku) {
    std::string p = text;
    std::replace(p.begin(), p.end(), '\\', '/');
    bool drive = p.size() >= 2 && std::isalpha(static_cast<unsigned char>(p[0])) && p[1] == ':';
    if (drive) {
      // A Windows drive path cannot name a host file: try its base name next to the child.
      auto slash = p.find_last_of('/');
      std::string base = slash == std::string::npos ? p.substr(2) : p.substr(slash + 1);
      if (!base.empty()) out.push_back(base);
      return out;
    }
    if (platform == kPlatW2ru) {
      // Relative by definition, even with a leading separator.
      while (!p.empty() && p[0] == '/') p.erase(0, 1);
    }
    p = strip_dot_slash(p);
    if (!p.empty()) out.push_back(p);
    if (platform == kPlatW2ku && !p.empty() && p[0] == '/') {
      auto slash = p.find_last_of('/');
      std::string base = p.substr(slash + 1);
      if (!base.empty()) out.push_back(base);
    }
    return out;
  }
  if (platform == kPlatMacX) {
    std::string p = text;
    if (p.rfind("file://", 0) == 0) {
      p = p.substr(7);
      // "file://localhost/x" and "file:///x" name /x; "file://./x" is relative.
      if (p.rfind("localhost/", 0) == 0) p = p.substr(9);
    } else if (p.rfind("file:", 0) == 0) {
      p = p.substr(5);
    }
    p = strip_dot_slash(percent_decode(p));
    if (!p.empty()) out.push_back(p);
    return out;
  }
  return out;
}

}  // namespace strata::vhd
