// Many threads on one differencing disk: writers on disjoint 4 KiB slots that
// share blocks (so allocation, copy-up and bitmap updates race on one block),
// readers of untouched space, and a flusher. The result equals the model, also
// after reopening.
#include <atomic>
#include <thread>

#include "vhd_test_util.h"

using namespace vhdtest;

TEST_CASE("concurrent writers, readers and flushes on a differencing disk") {
  TempDir t;
  std::string base = t / "base.vhd", child = t / "child.vhd";
  constexpr uint64_t kSize = 8 << 20, kSlot = 4096;
  create(base, "8M", {{"force_size", "on"}});
  Bytes model = pattern(kSize, 5);
  {
    auto d = open(base);
    REQUIRE(write(*d, 0, model) == 0);
  }
  create(child, "", {{"block_size", "64K"}}, std::string("base.vhd"));
  auto dev = open(child);
  constexpr int kWriters = 6;
  // Slot s belongs to writer s % (kWriters + 1); the last share is never written.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  std::vector<Bytes> models(kWriters, model);
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 rng(100 + w);
      Bytes& m = models[w];
      for (int i = 0; i < 400; ++i) {
        uint64_t slot = (rng() % (kSize / kSlot / (kWriters + 1))) * (kWriters + 1) + w;
        size_t len = 1 + rng() % kSlot;
        uint64_t off = slot * kSlot + rng() % (kSlot - len + 1);
        int r;
        if (i % 9 == 8) {
          r = dev->write_zeroes(off, len, {});
          std::fill(m.begin() + static_cast<long>(off), m.begin() + static_cast<long>(off + len),
                    0);
        } else {
          Bytes p = pattern(len, rng());
          r = write(*dev, off, p);
          std::copy(p.begin(), p.end(), m.begin() + static_cast<long>(off));
        }
        if (r != 0) ++failures;
      }
    });
  }
  auto untouched_ok = [&](std::mt19937& rng) {
    uint64_t slot = (rng() % (kSize / kSlot / (kWriters + 1))) * (kWriters + 1) + kWriters;
    Bytes b(kSlot);
    if (dev->read(slot * kSlot, {reinterpret_cast<std::byte*>(b.data()), b.size()}) != 0) {
      return false;
    }
    return std::equal(b.begin(), b.end(), model.begin() + static_cast<long>(slot * kSlot));
  };
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      std::mt19937 rng(7 + r);
      while (!stop) {
        if (!untouched_ok(rng)) ++failures;
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop) {
      if (dev->flush() != 0) ++failures;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (int w = 0; w < kWriters; ++w) threads[w].join();
  stop = true;
  for (size_t i = kWriters; i < threads.size(); ++i) threads[i].join();
  CHECK(failures == 0);
  // Merge: each writer owns its slots.
  for (uint64_t slot = 0; slot < kSize / kSlot; ++slot) {
    int owner = static_cast<int>(slot % (kWriters + 1));
    if (owner == kWriters) continue;
    auto from = models[owner].begin() + static_cast<long>(slot * kSlot);
    std::copy(from, from + kSlot, model.begin() + static_cast<long>(slot * kSlot));
  }
  CHECK(read_all(*dev) == model);
  dev.reset();
  CHECK(read_all(*open(child, true)) == model);
  strata::CheckReport rep;
  open(child, true)->check(rep);
  CHECK(rep.errors.empty());
  CHECK(rep.leaks.empty());
}
