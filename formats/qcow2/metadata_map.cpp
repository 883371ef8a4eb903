#include "formats/qcow2/metadata_map.h"

#include <algorithm>
#include <array>

namespace strata::qcow2 {
namespace {

constexpr int kKindBits = 10;

uint16_t mask_of(const std::array<uint32_t, kKindBits>& uses) {
  uint16_t m = 0;
  for (int b = 0; b < kKindBits; ++b) {
    if (uses[b]) m |= static_cast<uint16_t>(1u << b);
    if (uses[b] > 1) m |= kMetaDuplicate;
  }
  return m;
}

}  // namespace

std::string describe_meta_kinds(uint16_t kinds) {
  static const char* const names[kKindBits] = {
      "header",           "active L1 table",     "active L2 table",   "refcount table",
      "refcount block",   "snapshot table",      "snapshot L1 table", "bitmap directory",
      "second reference", "bitmap table or data"};
  std::string out;
  for (int b = 0; b < kKindBits; ++b) {
    if (!(kinds & (1u << b))) continue;
    if (!out.empty()) out += " and ";
    out += names[b];
  }
  return out.empty() ? "nothing" : out;
}

void MetadataMap::set_ranges(const std::vector<Range>& ranges) {
  struct Event {
    uint64_t pos;
    int bit;
    int delta;
  };
  std::vector<Event> events;
  for (const Range& r : ranges) {
    if (r.count == 0) continue;
    for (int b = 0; b < kKindBits; ++b) {
      if (!(r.kind & (1u << b))) continue;
      events.push_back({r.first, b, +1});
      events.push_back({r.first + r.count, b, -1});
    }
    end_ = std::max(end_, r.first + r.count);
  }
  std::sort(events.begin(), events.end(),
            [](const Event& a, const Event& b) { return a.pos < b.pos; });
  // The segment being built ends at the next position where the mask changes;
  // every range ends, so the last one is closed by a mask of 0.
  constexpr uint64_t kOpen = ~uint64_t{0};
  segments_.clear();
  std::array<uint32_t, kKindBits> uses{};
  for (size_t i = 0; i < events.size();) {
    const uint64_t pos = events[i].pos;
    for (; i < events.size() && events[i].pos == pos; ++i) uses[events[i].bit] += events[i].delta;
    const uint16_t m = mask_of(uses);
    if (m & kMetaDuplicate) duplicates_ = true;
    if (!segments_.empty() && segments_.back().end == kOpen) {
      if (segments_.back().kinds == m) continue;
      segments_.back().end = pos;
    }
    if (m) segments_.push_back({pos, kOpen, m});
  }
}

void MetadataMap::add_cluster(uint64_t cluster, uint16_t kind) {
  uint16_t& k = clusters_[cluster];
  if (k & kind) {
    k |= kMetaDuplicate;
    duplicates_ = true;
  }
  k |= kind;
  end_ = std::max(end_, cluster + 1);
}

void MetadataMap::remove_cluster(uint64_t cluster, uint16_t kind) {
  auto it = clusters_.find(cluster);
  if (it == clusters_.end() || (it->second & kMetaDuplicate)) return;  // a duplicate stays suspect
  it->second &= static_cast<uint16_t>(~kind);
  if (it->second == 0) clusters_.erase(it);
}

uint16_t MetadataMap::kinds(uint64_t first, uint64_t count) const {
  if (count == 0) return 0;
  const uint64_t last = first + count;
  uint16_t out = 0;
  auto it = std::upper_bound(segments_.begin(), segments_.end(), first,
                             [](uint64_t c, const Segment& s) { return c < s.end; });
  for (; it != segments_.end() && it->first < last; ++it) out |= it->kinds;
  if (!clusters_.empty()) {
    for (uint64_t c = first; c < last; ++c) {
      auto hit = clusters_.find(c);
      if (hit != clusters_.end()) out |= hit->second;
    }
  }
  return out;
}

}  // namespace strata::qcow2
