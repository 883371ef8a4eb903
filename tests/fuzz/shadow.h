// Shadow: what a fuzz harness knows of a device's bytes, to check that reads
// return what was written. Shared by the image targets and fuzz_connection.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tests/fuzz/fuzz_check.h"

namespace strata::fuzz {

// What the harness knows of the device's bytes: nothing (never read or
// written, or a failed write), their exact value, or "that value or zero"
// (after a trim, which may or may not deallocate). Kept per 4 KiB page, only
// for pages the ops touched.
class Shadow {
 public:
  enum State : uint8_t { kUnknown = 0, kExact = 1, kExactOrZero = 2 };

  FUZZ_NO_COVERAGE void set(uint64_t off, const uint8_t* data, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t k, size_t n) FUZZ_NO_COVERAGE {
      std::memcpy(p.value + i, data + k, n);
      std::memset(p.state + i, kExact, n);
    });
  }
  FUZZ_NO_COVERAGE void set_zero(uint64_t off, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t, size_t n) FUZZ_NO_COVERAGE {
      std::memset(p.value + i, 0, n);
      std::memset(p.state + i, kExact, n);
    });
  }
  FUZZ_NO_COVERAGE void weaken(uint64_t off, uint64_t len) {  // after a trim
    each(off, len, [&](Page& p, size_t i, uint64_t, size_t n) FUZZ_NO_COVERAGE {
      for (size_t j = i; j < i + n; ++j) {
        if (p.state[j] == kExact) p.state[j] = kExactOrZero;
      }
    });
  }
  FUZZ_NO_COVERAGE void forget(uint64_t off, uint64_t len) {
    each(off, len, [&](Page& p, size_t i, uint64_t, size_t n) FUZZ_NO_COVERAGE {
      std::memset(p.state + i, kUnknown, n);
    });
  }

  // Compares what a read returned with what is known, then learns it.
  // Returns the device offset of the first byte that contradicts, or -1.
  FUZZ_NO_COVERAGE int64_t check_and_learn(uint64_t off, const uint8_t* data, uint64_t len) {
    int64_t bad = -1;
    each(off, len, [&](Page& p, size_t i, uint64_t k, size_t n) FUZZ_NO_COVERAGE {
      // Bytes equal to what is recorded agree whatever their state: most
      // reads take only this memcmp.
      if (std::memcmp(p.value + i, data + k, n) != 0) {
        for (size_t j = 0; j < n && bad < 0; ++j) {
          uint8_t st = p.state[i + j], want = p.value[i + j], got = data[k + j];
          bool ok = st == kUnknown || want == got || (st == kExactOrZero && got == 0);
          if (!ok) bad = static_cast<int64_t>(off + k + j);
        }
        std::memcpy(p.value + i, data + k, n);
      }
      std::memset(p.state + i, kExact, n);
    });
    return bad;
  }

  // Byte ranges of the pages that hold something known, in order.
  FUZZ_NO_COVERAGE std::vector<std::pair<uint64_t, uint64_t>> known_pages() const {
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (const auto& [index, page] : pages_) {
      for (uint8_t st : page.state) {
        if (st != kUnknown) {
          out.push_back({index * kPage, kPage});
          break;
        }
      }
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  static constexpr uint64_t kPage = 4096;
  struct Page {
    uint8_t value[kPage] = {};
    uint8_t state[kPage] = {};
  };

  // Calls f(page, offset in the page, offset in the range, length) for
  // each page's piece of [off, off + len).
  template <class F>
  FUZZ_NO_COVERAGE void each(uint64_t off, uint64_t len, F f) {
    uint64_t k = 0;
    while (k < len) {
      uint64_t pos = off + k;
      Page& p = pages_[pos / kPage];
      size_t i = pos % kPage;
      size_t n = static_cast<size_t>(std::min<uint64_t>(len - k, kPage - i));
      f(p, i, k, n);
      k += n;
    }
  }

  std::unordered_map<uint64_t, Page> pages_;
};

}  // namespace strata::fuzz
