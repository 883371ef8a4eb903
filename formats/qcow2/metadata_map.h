// MetadataMap: which host clusters of a qcow2 image file hold metadata in use
// (header, active L1 table, active L2 tables, refcount table, refcount blocks,
// snapshot table, snapshot L1 tables, bitmap directory). It is QEMU's
// "overlap check" set, kept in memory so that checking a cluster costs one
// hash lookup and a binary search over a handful of ranges, never a scan of
// the tables.
//
// The large structures that only move when the refcount table grows are kept
// as sorted, disjoint ranges (rebuilt by set_ranges()); L2 tables and refcount
// blocks, which come and go one cluster at a time, in a hash map. A cluster
// used twice as one kind (two L1 entries naming one L2 table) carries
// kDuplicate, so that no write to it passes as a write of that kind alone.
//
// Not locked itself: the owning Qcow2Device holds its metadata lock.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace strata::qcow2 {

enum MetaKind : uint16_t {
  kMetaHeader = 1u << 0,
  kMetaActiveL1 = 1u << 1,
  kMetaActiveL2 = 1u << 2,
  kMetaRefcountTable = 1u << 3,
  kMetaRefcountBlock = 1u << 4,
  kMetaSnapshotTable = 1u << 5,
  kMetaInactiveL1 = 1u << 6,
  kMetaBitmapDirectory = 1u << 7,
  kMetaDuplicate = 1u << 8,
  kMetaBitmap = 1u << 9,  // a bitmap table or data cluster
};

// "active L2 table and refcount block", for log lines.
std::string describe_meta_kinds(uint16_t kinds);

class MetadataMap {
 public:
  struct Range {
    uint64_t first = 0;  // cluster index
    uint64_t count = 0;  // clusters
    uint16_t kind = 0;
  };

  // Replaces the ranged structures (header, L1, refcount table, snapshot
  // structures, bitmap directory). Ranges may overlap each other.
  void set_ranges(const std::vector<Range>& ranges);
  // Adds or drops one use of `cluster` as an L2 table or refcount block.
  void add_cluster(uint64_t cluster, uint16_t kind);
  void remove_cluster(uint64_t cluster, uint16_t kind);
  void clear_clusters() { clusters_.clear(); }

  // Union of the kinds of every cluster in [first, first + count).
  uint16_t kinds(uint64_t first, uint64_t count) const;
  // One past the highest cluster ever recorded.
  uint64_t end() const { return end_; }
  // Some cluster was recorded twice as one kind (it stays so).
  bool has_duplicates() const { return duplicates_; }

 private:
  struct Segment {
    uint64_t first = 0, end = 0;  // [first, end), disjoint, sorted
    uint16_t kinds = 0;
  };
  std::vector<Segment> segments_;
  std::unordered_map<uint64_t, uint16_t> clusters_;
  uint64_t end_ = 0;
  bool duplicates_ = false;
};

}  // namespace strata::qcow2
