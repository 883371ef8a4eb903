// TableCache: a bounded LRU cache of cluster-sized metadata tables (L2 tables or
// refcount blocks) keyed by host offset, with hit/miss/eviction counters.
//
// It is not locked itself: the owning Qcow2Device calls it with its metadata
// mutex held (exclusively, except for peek()). Entries live in a std::list so
// their addresses stay valid until they are erased; the owner writes dirty
// entries back before erasing them.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace strata::qcow2 {

struct CachedTable {
  uint64_t offset = 0;
  std::vector<uint8_t> data;
  bool dirty = false;
  // Hit under the shared lock since victim() last passed it over. Written
  // through std::atomic_ref: readers holding the lock shared set it together.
  bool referenced = false;
};

class TableCache {
 public:
  TableCache(std::string name, size_t capacity)
      : name_(std::move(name)), capacity_(capacity < 1 ? 1 : capacity) {}

  // A hit moves the entry to the front and counts a hit; a miss returns nullptr
  // and counts a miss.
  CachedTable* find(uint64_t offset);
  // Least recently used entry when the cache is full (the owner writes it back
  // if dirty, then erases it); nullptr when there is room. An entry peeked at
  // since it was last passed over gets a second chance: it moves to the front
  // and the next one is taken (the CLOCK rule, so shared hits count too).
  CachedTable* victim();
  // Membership test without touching the counters or the LRU order.
  bool contains(uint64_t offset) const { return map_.count(offset) != 0; }
  // Lookup for readers that hold the owner's lock shared: no LRU move (that
  // needs the lock exclusively), the entry is marked referenced instead, and
  // the hit is counted in a per-thread slot.
  const CachedTable* peek(uint64_t offset) const {
    auto it = map_.find(offset);
    if (it == map_.end()) return nullptr;
    std::atomic_ref<bool> referenced(it->second->referenced);
    if (!referenced.load(std::memory_order_relaxed)) {
      referenced.store(true, std::memory_order_relaxed);
    }
    count_shared_hit();
    return &*it->second;
  }
  CachedTable* insert(uint64_t offset, std::vector<uint8_t> data, bool dirty);
  void erase(uint64_t offset);

  // Every entry, most recent first (a plain range rather than a callback, so
  // the owner's lock annotations hold in the loop body).
  std::list<CachedTable>& entries() { return lru_; }
  bool any_dirty() const;

  size_t capacity() const { return capacity_; }
  size_t size() const { return lru_.size(); }
  std::string stats() const;

  uint64_t hits = 0, misses = 0, evictions = 0;
  uint64_t shared_hits() const;

 private:
  // Hits under the shared lock, counted in one of a few cache-line-sized
  // slots picked per thread: one shared counter would bounce between CPUs on
  // every read.
  struct alignas(64) HitSlot {
    std::atomic<uint64_t> n{0};
  };
  static constexpr size_t kHitSlots = 8;
  void count_shared_hit() const;
  mutable std::array<HitSlot, kHitSlots> shared_hits_;

  std::string name_;
  size_t capacity_;
  std::list<CachedTable> lru_;  // front = most recent
  std::unordered_map<uint64_t, std::list<CachedTable>::iterator> map_;
};

}  // namespace strata::qcow2
