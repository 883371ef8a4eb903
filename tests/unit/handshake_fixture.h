// The handshake tests' fixture: a catalog of two exports and the payloads
// of INFO/GO and META_CONTEXT options, built byte by byte.
#pragma once

#include <doctest/doctest.h>

#include <initializer_list>
#include <string_view>
#include <vector>

#include "formats/endian.h"
#include "protocol/handshake.h"
#include "protocol/nbd.h"

namespace strata::nbd::testing {

inline uint32_t load32(const Bytes& b, size_t off) {
  REQUIRE(off + 4 <= b.size());
  return strata::load_be32(b.data() + off);
}

inline Bytes hex(std::initializer_list<int> v) {
  Bytes b;
  for (int x : v) b.push_back(static_cast<uint8_t>(x));
  return b;
}

class FakeCatalog : public ExportCatalog {
 public:
  FakeCatalog() {
    a.name = "disk";
    a.description = "first disk";
    a.size = 0x100000;
    a.tx_flags = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxCanMultiConn;
    a.min_block = 1;
    a.pref_block = 4096;
    a.max_block = 32 << 20;
    b.name = "other";
    b.size = 512;
    b.tx_flags = kTxHasFlags | kTxReadOnly;
  }
  const ExportView* find(std::string_view name) const override {
    if (name.empty() || name == a.name) return &a;
    if (name == b.name) return &b;
    return nullptr;
  }
  std::vector<const ExportView*> all() const override { return {&a, &b}; }
  ExportView a, b;
};

inline Bytes info_payload(std::string_view name, std::initializer_list<uint16_t> reqs) {
  Bytes p;
  Writer w(p);
  w.u32(static_cast<uint32_t>(name.size())).bytes(name).u16(static_cast<uint16_t>(reqs.size()));
  for (auto r : reqs) w.u16(r);
  return p;
}

inline Bytes meta_payload(std::string_view name, std::initializer_list<std::string_view> queries) {
  Bytes p;
  Writer w(p);
  w.u32(static_cast<uint32_t>(name.size())).bytes(name).u32(static_cast<uint32_t>(queries.size()));
  for (auto q : queries) w.u32(static_cast<uint32_t>(q.size())).bytes(q);
  return p;
}

}  // namespace strata::nbd::testing
