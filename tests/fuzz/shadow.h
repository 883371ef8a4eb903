// Shadow: what a fuzz harness knows of a device's bytes, to check that reads
// return what was written. Shared by the image targets and fuzz_connection.
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace strata::fuzz {

// What the harness knows of the device's bytes: nothing (never read or
// written, or a failed write), their exact value, or "that value or zero"
// (after a trim, which may or may not deallocate). Kept per 4 KiB page, only
// for pages the ops touched.
class Shadow {
 public:
  enum State : uint8_t { kUnknown = 0, kExact = 1, kExactOrZero = 2 };

  void set(uint64_t off, const uint8_t* data, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t k) {
      p.value[i] = data[k];
      p.state[i] = kExact;
    });
  }
  void set_zero(uint64_t off, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t) {
      p.value[i] = 0;
      p.state[i] = kExact;
    });
  }
  void weaken(uint64_t off, uint64_t len) {  // after a trim
    each(off, len, [&](Page& p, size_t i, uint64_t) {
      if (p.state[i] == kExact) p.state[i] = kExactOrZero;
    });
  }
  void forget(uint64_t off, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t) { p.state[i] = kUnknown; });
  }

  // Compares what a read returned with what is known, then learns it.
  // Returns the device offset of the first byte that contradicts, or -1.
  int64_t check_and_learn(uint64_t off, const uint8_t* data, uint64_t len) {
    int64_t bad = -1;
    each(off, len, [&](Page& p, size_t i, uint64_t k) {
      bool ok = p.state[i] == kUnknown || p.value[i] == data[k] ||
                (p.state[i] == kExactOrZero && data[k] == 0);
      if (!ok && bad < 0) bad = static_cast<int64_t>(off + k);
      p.value[i] = data[k];
      p.state[i] = kExact;
    });
    return bad;
  }

  // Byte ranges of the pages that hold something known, in order.
  std::vector<std::pair<uint64_t, uint64_t>> known_pages() const {
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (const auto& [index, page] : pages_) {
      if (std::any_of(page.state, page.state + kPage, [](uint8_t s) { return s != kUnknown; })) {
        out.push_back({index * kPage, kPage});
      }
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  static constexpr uint64_t kPage = 4096;
  struct Page {
    uint8_t value[kPage];
    uint8_t state[kPage] = {};
  };

  template <class F>
  void each(uint64_t off, uint64_t len, F f) {
    uint64_t k = 0;
    while (k < len) {
      uint64_t pos = off + k;
      Page& p = pages_[pos / kPage];
      size_t i = pos % kPage;
      uint64_t n = std::min<uint64_t>(len - k, kPage - i);
      for (uint64_t j = 0; j < n; ++j) f(p, i + j, k + j);
      k += n;
    }
  }

  std::unordered_map<uint64_t, Page> pages_;
};

}  // namespace strata::fuzz
