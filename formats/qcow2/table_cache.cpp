#include "formats/qcow2/table_cache.h"

#include <iterator>

namespace strata::qcow2 {

CachedTable* TableCache::find(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) {
    ++misses;
    return nullptr;
  }
  ++hits;
  if (it->second != lru_.begin()) lru_.splice(lru_.begin(), lru_, it->second);
  return &*it->second;
}

CachedTable* TableCache::victim() {
  if (lru_.size() < capacity_) return nullptr;
  for (size_t passes = lru_.size(); passes > 1; --passes) {
    std::atomic_ref<bool> referenced(lru_.back().referenced);
    if (!referenced.load(std::memory_order_relaxed)) break;
    referenced.store(false, std::memory_order_relaxed);
    lru_.splice(lru_.begin(), lru_, std::prev(lru_.end()));
  }
  return &lru_.back();
}

CachedTable* TableCache::insert(uint64_t offset, std::vector<uint8_t> data, bool dirty) {
  lru_.push_front(CachedTable{offset, std::move(data), dirty});
  map_[offset] = lru_.begin();
  return &lru_.front();
}

void TableCache::erase(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return;
  lru_.erase(it->second);
  map_.erase(it);
  ++evictions;
}

void TableCache::count_shared_hit() const {
  static std::atomic<size_t> next_slot{0};
  thread_local const size_t slot = next_slot.fetch_add(1, std::memory_order_relaxed) % kHitSlots;
  shared_hits_[slot].n.fetch_add(1, std::memory_order_relaxed);
}

uint64_t TableCache::shared_hits() const {
  uint64_t n = 0;
  for (const auto& s : shared_hits_) n += s.n.load(std::memory_order_relaxed);
  return n;
}

bool TableCache::any_dirty() const {
  for (const auto& e : lru_) {
    if (e.dirty) return true;
  }
  return false;
}

std::string TableCache::stats() const {
  return name_ + " cache: " + std::to_string(lru_.size()) + "/" + std::to_string(capacity_) +
         " tables, hits " + std::to_string(hits + shared_hits()) + ", misses " +
         std::to_string(misses) + ", evictions " + std::to_string(evictions);
}

}  // namespace strata::qcow2
