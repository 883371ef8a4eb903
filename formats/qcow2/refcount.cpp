// qcow2: refcounts, cluster allocation, refcount-table growth, metadata
// writeback in crash-safe order, deferred frees, refcount rebuild.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "formats/endian.h"
#include "formats/errors.h"
#include "formats/qcow2/qcow2.h"

namespace strata::qcow2 {
namespace {

uint64_t rb_get(const uint8_t* blk, uint32_t order, uint64_t i) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      uint32_t bits = 1u << order;
      uint64_t bit = i * bits;
      return (blk[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3:
      return blk[i];
    case 4:
      return load_be16(blk + i * 2);
    case 5:
      return load_be32(blk + i * 4);
    default:
      return load_be64(blk + i * 8);
  }
}

void rb_set(uint8_t* blk, uint32_t order, uint64_t i, uint64_t v) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      uint32_t bits = 1u << order;
      uint64_t bit = i * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      blk[bit / 8] = static_cast<uint8_t>((blk[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
      break;
    }
    case 3:
      blk[i] = static_cast<uint8_t>(v);
      break;
    case 4:
      store_be16(blk + i * 2, static_cast<uint16_t>(v));
      break;
    case 5:
      store_be32(blk + i * 4, static_cast<uint32_t>(v));
      break;
    default:
      store_be64(blk + i * 8, v);
      break;
  }
}

}  // namespace

int Qcow2Device::write_refblock(CachedTable& t) {
  if (int r = write_metadata_locked(t.offset, t.data.data(), t.data.size(), kMetaRefcountBlock))
    return r;
  t.dirty = false;
  return 0;
}

int Qcow2Device::write_l2_table(CachedTable& t) {
  if (int r = write_metadata_locked(t.offset, t.data.data(), t.data.size(), kMetaActiveL2))
    return r;
  t.dirty = false;
  return 0;
}

uint64_t Qcow2Device::refcounted_end() {
  for (uint64_t bi = refcount_table_.size(); bi-- > 0;) {
    uint64_t off = refcount_table_[bi] & kRefTableOffsetMask;
    if (off == 0 || (refcount_table_[bi] & 0x1ff) || !host_cluster_valid(off)) continue;
    CachedTable* t = nullptr;
    if (load_table(*refblock_cache_, off, t, false) != 0) {
      throw_image_error(path(), "cannot read refcount block " + std::to_string(bi));
    }
    for (uint64_t i = refblock_entries_; i-- > 0;) {
      if (rb_get(t->data.data(), header_.refcount_order, i) != 0)
        return bi * refblock_entries_ + i + 1;
    }
  }
  return 0;
}

int Qcow2Device::get_refcount_locked(uint64_t cluster, uint64_t& rc) {
  rc = 0;
  uint64_t bi = cluster / refblock_entries_;
  if (bi >= refcount_table_.size()) return 0;
  uint64_t e = refcount_table_[bi];
  uint64_t off = e & kRefTableOffsetMask;
  if (off == 0) return 0;
  if ((e & 0x1ff) || !host_cluster_valid(off)) return EIO;
  CachedTable* t = nullptr;
  if (int r = load_table(*refblock_cache_, off, t, false)) return r;
  rc = rb_get(t->data.data(), header_.refcount_order, cluster % refblock_entries_);
  return 0;
}

int Qcow2Device::set_refcount_locked(uint64_t cluster, uint64_t rc) {
  if (rc > refcount_max_) return EOVERFLOW;
  uint64_t bi = cluster / refblock_entries_;
  if (bi >= refcount_table_.size()) {
    if (rc == 0) return 0;
    if (int r = grow_reftable_locked(bi)) return r;
  }
  uint64_t e = refcount_table_[bi];
  uint64_t off = e & kRefTableOffsetMask;
  if (off == 0) {
    if (rc == 0) return 0;
    // A new refcount block at the end of the image. If it lies in the range it
    // covers it counts itself; otherwise its own refcount lives in another
    // block, set before the table points at it.
    uint64_t nb = first_unused_cluster_++;
    if (int r = check_new_clusters_locked(nb, 1, "a refcount block")) return r;
    bool self = nb / refblock_entries_ == bi;
    if (!self) {
      if (int r = set_refcount_locked(nb, 1)) return r;
    }
    CachedTable* t = nullptr;
    if (int r = load_table(*refblock_cache_, nb * cluster_size_, t, true)) return r;
    if (self) rb_set(t->data.data(), header_.refcount_order, nb % refblock_entries_, 1);
    t->dirty = true;
    refcount_table_[bi] = nb * cluster_size_;
    refcount_table_dirty_.insert(bi);
    metadata_map_.add_cluster(nb, kMetaRefcountBlock);
    off = nb * cluster_size_;
  } else if ((e & 0x1ff) || !host_cluster_valid(off)) {
    return EIO;
  } else if (int r = check_metadata_write_locked(off, cluster_size_, kMetaRefcountBlock)) {
    return r;
  }
  CachedTable* t = nullptr;
  if (int r = load_table(*refblock_cache_, off, t, false)) return r;
  rb_set(t->data.data(), header_.refcount_order, cluster % refblock_entries_, rc);
  t->dirty = true;
  return 0;
}

// Refcounts decide what is free, never the file size: first_unused_cluster_ lies past every
// cluster with a refcount (open computes it), so clusters from first_unused_cluster_ on are
// unused and read as zeros.
int Qcow2Device::alloc_cluster_locked(uint64_t& host, bool& fresh) {
  if (corrupt_) return EIO;
  uint64_t c = free_hint_;
  for (; c < first_unused_cluster_; ++c) {
    uint64_t rc = 0;
    if (int r = get_refcount_locked(c, rc)) return r;
    if (rc == 0 && c != 0) break;
  }
  fresh = c >= first_unused_cluster_;
  if (fresh) {
    c = first_unused_cluster_;
    first_unused_cluster_ = c + 1;
  }
  free_hint_ = c + 1;
  if (c << cluster_bits_ >= kMaxHostOffset) return ENOSPC;
  if (int r = check_new_clusters_locked(c, 1, "a new cluster")) return r;
  if (int r = set_refcount_locked(c, 1)) return r;
  host = c << cluster_bits_;
  return 0;
}

int Qcow2Device::grow_reftable_locked(uint64_t needed_index) {
  if (growing_refcount_table_) return EIO;
  if (int r = writeback_locked()) return r;
  growing_refcount_table_ = true;
  struct Reset {
    bool& b;
    ~Reset() { b = false; }
  } reset{growing_refcount_table_};

  const uint64_t old_entries = refcount_table_.size();
  const uint64_t old_off = refcount_table_offset_;
  const uint64_t old_clusters = refcount_table_clusters_;
  uint64_t entries = std::max(old_entries * 2, needed_index + 1);
  uint64_t clusters = 0;
  for (;;) {
    clusters = (entries * 8 + cluster_size_ - 1) / cluster_size_;
    // The new table and the blocks counting it must be covered by the table.
    uint64_t last = first_unused_cluster_ + clusters + clusters / refblock_entries_ + 4;
    if (last / refblock_entries_ < entries) break;
    entries *= 2;
  }
  if (clusters * cluster_size_ > kMaxRefcountTableBytes) return ENOSPC;
  entries = clusters * cluster_size_ / 8;
  const uint64_t p = first_unused_cluster_;
  if (int r = check_new_clusters_locked(p, clusters, "the refcount table")) return r;
  first_unused_cluster_ += clusters;
  refcount_table_.resize(entries, 0);
  for (uint64_t k = p; k < p + clusters; ++k) {
    if (int r = set_refcount_locked(k, 1)) return r;
  }
  bool wrote = false;
  for (CachedTable& t : refblock_cache_->entries()) {
    if (!t.dirty) continue;
    if (int r = write_refblock(t)) return r;
    wrote = true;
  }
  std::vector<uint8_t> raw(clusters * cluster_size_);
  for (uint64_t i = 0; i < entries; ++i) store_be64(raw.data() + i * 8, refcount_table_[i]);
  if (int r = write_metadata_locked(p * cluster_size_, raw.data(), raw.size(), kMetaRefcountTable))
    return r;
  if (int r = file_->sync()) return r;
  uint8_t hdr[12];
  store_be64(hdr, p * cluster_size_);
  store_be32(hdr + 8, static_cast<uint32_t>(clusters));
  if (int r = write_metadata_locked(kOffRefcountTable, hdr, sizeof hdr, kMetaHeader)) return r;
  if (int r = file_->sync()) return r;
  (void)wrote;
  refcount_table_offset_ = p * cluster_size_;
  refcount_table_clusters_ = clusters;
  refcount_table_dirty_.clear();
  header_.refcount_table_offset = refcount_table_offset_;
  header_.refcount_table_clusters = static_cast<uint32_t>(clusters);
  update_metadata_ranges();
  // The header no longer points at the old table: free it (a crash before
  // these counts are written only leaks it).
  for (uint64_t k = old_off / cluster_size_; k < old_off / cluster_size_ + old_clusters; ++k) {
    if (int r = set_refcount_locked(k, 0)) return r;
  }
  free_hint_ = std::min(free_hint_, old_off / cluster_size_);
  spdlog::info("{}: refcount table grown to {} clusters at offset {}", path(), clusters,
               refcount_table_offset_);
  return 0;
}

int Qcow2Device::writeback_locked() {
  bool l2_dirty = l2_cache_->any_dirty();
  bool rb_dirty = refblock_cache_->any_dirty();
  if (!l2_dirty && !rb_dirty && refcount_table_dirty_.empty() && l1_dirty_.empty()) return 0;
  ++writebacks_;
  // 1. Guest data before any metadata that points at it.
  if (data_dirty_.exchange(false)) {
    if (int r = data_file_->sync()) return r;
  }
  // 2. Refcount blocks, then the table entries that point at new blocks.
  bool wrote = false;
  for (CachedTable& t : refblock_cache_->entries()) {
    if (!t.dirty) continue;
    if (int r = write_refblock(t)) return r;
    wrote = true;
  }
  if (!refcount_table_dirty_.empty()) {
    const uint64_t capacity = refcount_table_clusters_ * cluster_size_ / 8;
    for (uint64_t bi : refcount_table_dirty_) {
      if (bi >= capacity) return EIO;
      uint8_t b[8];
      store_be64(b, refcount_table_[bi]);
      if (int r = write_metadata_locked(refcount_table_offset_ + bi * 8, b, 8, kMetaRefcountTable))
        return r;
    }
    refcount_table_dirty_.clear();
    wrote = true;
  }
  if (wrote) {
    if (int r = file_->sync()) return r;
  }
  // 3. L2 tables.
  if (l2_dirty) {
    ++l2_epoch_;
    for (CachedTable& t : l2_cache_->entries()) {
      if (!t.dirty) continue;
      if (int r = write_l2_table(t)) return r;
    }
    if (int r = file_->sync()) return r;
  }
  // 4. L1 entries pointing at new or copied L2 tables.
  if (!l1_dirty_.empty()) {
    for (uint64_t i : l1_dirty_) {
      uint8_t b[8];
      store_be64(b, l1_table_[i]);
      if (int r = write_metadata_locked(header_.l1_table_offset + i * 8, b, 8, kMetaActiveL1))
        return r;
    }
    l1_dirty_.clear();
    if (int r = file_->sync()) return r;
  }
  return 0;
}

int Qcow2Device::apply_frees_locked() {
  if (pending_frees_.empty()) return 0;
  std::vector<uint64_t> frees;
  frees.swap(pending_frees_);
  for (uint64_t c : frees) {
    uint64_t rc = 0;
    if (int r = get_refcount_locked(c, rc)) return r;
    if (int r = check_free_locked(c, rc)) return r;  // the rest leak
    if (int r = set_refcount_locked(c, rc - 1)) return r;
    if (rc == 1) {
      // A freed L2 table (copied away from a snapshot) must not linger in the
      // cache: the cluster may come back as data or as another table.
      l2_cache_->erase(c << cluster_bits_);
      ++l2_epoch_;
      free_hint_ = std::min(free_hint_, c);
      int r = file_->punch_hole(c << cluster_bits_, cluster_size_);
      (void)r;  // advisory
    }
  }
  return 0;
}

int Qcow2Device::flush_locked() {
  if (!file_->writable()) return 0;
  // After a corruption was found, what was acknowledged before it is still
  // made durable (every write is checked again); frees are not applied.
  if (int r = writeback_locked()) return r;
  data_dirty_ = false;
  if (int r = data_file_->sync()) return r;
  if (data_file_ != file_.get()) {
    if (int r = file_->sync()) return r;
  }
  if (corrupt_) return 0;
  // Frees whose L2/L1 changes are now durable.
  if (int r = apply_frees_locked()) return r;
  return writeback_locked();
}

int Qcow2Device::flush() {
  WriterLock lk(mu_);
  return flush_locked();
}

void Qcow2Device::rebuild_refcounts() {
  CheckReport rep;
  std::vector<uint64_t> counts;
  count_references(counts, rep, false, false);
  if (!rep.errors.empty()) {
    throw_image_error(path(), "dirty image: cannot rebuild refcounts: " + rep.errors.front());
  }
  const uint64_t epb = refblock_entries_;
  const uint64_t e0 = std::max<uint64_t>(counts.size(), first_unused_cluster_);
  uint64_t nb = 0, nt = 0;
  for (;;) {
    uint64_t total = e0 + nb + nt;
    uint64_t nb2 = (total + epb - 1) / epb;
    uint64_t nt2 = (nb2 * 8 + cluster_size_ - 1) / cluster_size_;
    if (nb2 == nb && nt2 == nt) break;
    nb = nb2;
    nt = nt2;
  }
  if (nt * cluster_size_ > kMaxRefcountTableBytes)
    throw_image_error(path(), "dirty image: refcount table would be too large");
  counts.resize(e0 + nb + nt, 0);
  for (uint64_t k = e0; k < e0 + nb + nt; ++k) counts[k] = 1;
  std::vector<uint8_t> blk(cluster_size_);
  for (uint64_t j = 0; j < nb; ++j) {
    std::fill(blk.begin(), blk.end(), 0);
    for (uint64_t i = 0; i < epb && j * epb + i < counts.size(); ++i) {
      uint64_t v = counts[j * epb + i];
      if (v > refcount_max_)
        throw_image_error(
            path(), "dirty image: refcount overflow for cluster " + std::to_string(j * epb + i));
      rb_set(blk.data(), header_.refcount_order, i, v);
    }
    if (write_bytes(*file_, (e0 + j) * cluster_size_, blk.data(), cluster_size_) != 0)
      throw_image_error(path(), "cannot write refcount block");
  }
  std::vector<uint8_t> table(nt * cluster_size_);
  for (uint64_t j = 0; j < nb; ++j) store_be64(table.data() + j * 8, (e0 + j) * cluster_size_);
  if (write_bytes(*file_, (e0 + nb) * cluster_size_, table.data(), table.size()) != 0 ||
      file_->sync() != 0) {
    throw_image_error(path(), "cannot write the refcount table");
  }
  uint8_t hdr[12];
  store_be64(hdr, (e0 + nb) * cluster_size_);
  store_be32(hdr + 8, static_cast<uint32_t>(nt));
  if (write_bytes(*file_, kOffRefcountTable, hdr, 12) != 0 || file_->sync() != 0) {
    throw_image_error(path(), "cannot update the header");
  }
  uint8_t inc[8];
  header_.incompatible &= ~kIncompatDirty;
  store_be64(inc, header_.incompatible);
  if (write_bytes(*file_, kOffIncompat, inc, 8) != 0 || file_->sync() != 0) {
    throw_image_error(path(), "cannot clear the dirty bit");
  }
  refcount_table_offset_ = (e0 + nb) * cluster_size_;
  refcount_table_clusters_ = nt;
  header_.refcount_table_offset = refcount_table_offset_;
  header_.refcount_table_clusters = static_cast<uint32_t>(nt);
  refcount_table_.assign(nt * cluster_size_ / 8, 0);
  for (uint64_t j = 0; j < nb; ++j) refcount_table_[j] = (e0 + j) * cluster_size_;
  refcount_table_dirty_.clear();
  refblock_cache_ = std::make_unique<TableCache>("refcount", refblock_cache_->capacity());
  first_unused_cluster_ = e0 + nb + nt;
  free_hint_ = 1;
}

}  // namespace strata::qcow2
