// qcow2: write paths — in-place writes, cluster and subcluster allocation with
// copy-on-write, L2 table allocation/copy, zero writes and trim.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "formats/endian.h"
#include "formats/qcow2/qcow2.h"

namespace strata::qcow2 {
namespace {

const std::vector<std::byte>& zero_buffer() {
  static const std::vector<std::byte> z(2u << 20);
  return z;
}

}  // namespace

void Qcow2Device::lock_cluster(WriterLock& lk, uint64_t gc) {
  while (inflight_.count(gc) != 0) inflight_changed_.wait(lk);
  inflight_.insert(gc);
}

void Qcow2Device::unlock_cluster(uint64_t gc) {
  inflight_.erase(gc);
  inflight_changed_.notify_all();
}

Qcow2Device::InflightCluster::InflightCluster(Qcow2Device& device, WriterLock& lk, uint64_t gc)
    : device_(device), cluster_(gc) {
  device_.lock_cluster(lk, gc);
}

// Destroyed before the WriterLock declared ahead of it, with mu_ held again
// after any WriterUnlock scope in between (those end first): the analysis
// cannot follow the lock into a destructor.
Qcow2Device::InflightCluster::~InflightCluster() NO_THREAD_SAFETY_ANALYSIS {
  if (held_) device_.unlock_cluster(cluster_);
}

int Qcow2Device::free_entry_locked(uint64_t e) {
  if (external_data_file_) return 0;  // data clusters of a data file are not refcounted
  const L2Entry d = classify(e);
  if (d.compressed()) {
    // Every host cluster the compressed data touches holds a reference.
    const CompressedDescriptor desc = parse_compressed_descriptor(e, cluster_bits_);
    const uint64_t last = desc.first_byte() + desc.span() - 1;
    for (uint64_t c = desc.first_byte() >> cluster_bits_; c <= last >> cluster_bits_; ++c)
      pending_frees_.push_back(c);
    return 0;
  }
  if (d.host) pending_frees_.push_back(d.host >> cluster_bits_);
  return 0;
}

int Qcow2Device::get_l2_for_write_locked(uint64_t l1i, CachedTable*& out) {
  out = nullptr;
  if (corrupt_) return EIO;
  if (l1i >= l1_table_.size()) return EIO;
  uint64_t e = l1_table_[l1i];
  if (e & kL1ReservedMask) return EIO;
  uint64_t off = e & kL1OffsetMask;
  if (off && !host_cluster_valid(off)) return EIO;
  if (off && (e & kCopied)) {
    if (int r = check_metadata_write_locked(off, cluster_size_, kMetaActiveL2)) return r;
    return load_table(*l2_cache_, off, out, false);
  }
  if (off) {
    uint64_t rc = 0;
    if (int r = get_refcount_locked(off >> cluster_bits_, rc)) return r;
    if (rc == 1) {
      if (int r = check_metadata_write_locked(off, cluster_size_, kMetaActiveL2)) return r;
      set_l1_entry_locked(l1i, off | kCopied);
      return load_table(*l2_cache_, off, out, false);
    }
  }
  // A new table, or a private copy of one shared with a snapshot.
  std::vector<uint8_t> copy;
  if (off) {
    CachedTable* old = nullptr;
    if (int r = load_table(*l2_cache_, off, old, false)) return r;
    copy = old->data;
  }
  uint64_t host = 0;
  bool fresh = false;
  if (int r = alloc_cluster_locked(host, fresh)) return r;
  if (int r = load_table(*l2_cache_, host, out, true)) return r;
  if (!copy.empty()) {
    out->data = std::move(copy);
    pending_frees_.push_back(off >> cluster_bits_);
  }
  out->dirty = true;
  set_l1_entry_locked(l1i, host | kCopied);
  return 0;
}

// The runs of an in-place write of [offset, end): every touched cluster (and
// subcluster) is allocated and ours alone. False when some is not, and the
// write goes cluster by cluster through write_cluster().
bool Qcow2Device::map_in_place_locked(uint64_t offset, uint64_t end, std::vector<Run>& runs) {
  // An L2 table used twice must not be written through: write_cluster() checks.
  if (metadata_map_.has_duplicates()) return false;
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t gc = pos >> cluster_bits_;
    const uint64_t cstart = gc << cluster_bits_;
    const uint64_t cend = std::min(end, cstart + cluster_size_);
    const uint64_t l1i = gc / l2_entries_, idx = gc % l2_entries_;
    CachedTable* t = nullptr;
    if (get_l2_locked(l1i, t) != 0 || !t || !(l1_table_[l1i] & kCopied)) return false;
    const L2Entry d = classify(entry_at(*t, idx));
    if (!d.copied || d.type != ClusterType::normal) return false;
    if (extended_l2_) {
      const uint64_t bitmap = bitmap_at(*t, idx);
      const uint32_t mask = subcluster_mask(pos - cstart, cend - cstart, cluster_bits_);
      if ((bitmap & alloc_bits(mask)) != alloc_bits(mask) || (bitmap & zero_bits(mask)) != 0)
        return false;
    }
    if (overlaps_metadata(d.host)) return false;  // write_cluster() reports it
    runs.push_back({pos, cend - pos, Kind::data, d.host + (pos - cstart)});
    pos = cend;
  }
  return true;
}

int Qcow2Device::write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (read_only_) return EPERM;
  if (int r = begin_writing_once()) return r;
  mark_dirty(offset, buf.size());
  const uint64_t end = offset + buf.size();
  if (data_file_raw_) {
    for (uint64_t pos = offset; pos < end;) {
      uint64_t cend = std::min(end, ((pos >> cluster_bits_) + 1) << cluster_bits_);
      if (int r = write_raw_cluster(pos, buf.subspan(pos - offset, cend - pos))) return r;
      pos = cend;
    }
    data_dirty_ = true;
    return fua ? flush() : 0;
  }

  std::vector<Run> runs;
  if (map_in_place(offset, end, runs)) {
    for (const Run& r : runs) {
      if (int err = data_file_->write_at(r.host, buf.subspan(r.guest - offset, r.length)))
        return err;
    }
    data_dirty_ = true;
    return fua ? flush() : 0;
  }
  for (uint64_t pos = offset; pos < end;) {
    uint64_t cend = std::min(end, ((pos >> cluster_bits_) + 1) << cluster_bits_);
    if (int r = write_cluster(pos, buf.subspan(pos - offset, cend - pos))) return r;
    pos = cend;
  }
  return fua ? flush() : 0;
}

bool Qcow2Device::map_in_place(uint64_t offset, uint64_t end, std::vector<Run>& runs) {
  WriterLock lk(mu_);
  return map_in_place_locked(offset, end, runs);
}

bool Qcow2Device::defer_in_place_write(uint64_t offset, std::span<std::byte> buf,
                                       std::vector<BatchIo>& host) {
  if (read_only_ || data_file_raw_ || begin_writing_once()) return false;
  mark_dirty(offset, buf.size());
  std::vector<Run> runs;
  if (!map_in_place(offset, offset + buf.size(), runs)) return false;
  for (const Run& r : runs) {
    host.push_back({.offset = r.host,
                    .data = buf.data() + (r.guest - offset),
                    .length = r.length,
                    .write = true});
  }
  return true;
}

// REQUIRES mu_. The subclusters of an L2 entry that read as zeros under
// data_file_raw, as a 32-bit mask (bit i: subcluster i; a cluster without
// subclusters is all or nothing): the standard zero flag, or an extended L2
// zero bit without its allocation bit. Everything else reads the data file.
uint32_t Qcow2Device::raw_zero_subclusters(uint64_t entry, uint64_t bitmap) const {
  if (!extended_l2_) return classify(entry).zero_flag ? ~uint32_t{0} : 0;
  return static_cast<uint32_t>((bitmap & kZeroBits) >> kSubclusters) &
         ~static_cast<uint32_t>(bitmap & kAllocBits);
}

// data_file_raw: the data file is the disk at guest offsets, but a cluster the
// L2 table marks zero reads as zeros whatever the data file holds there. So
// before a write maps such a cluster 1:1, the zero parts the write does not
// cover get zeros in the data file, as QEMU's copy-on-write does; otherwise
// stale bytes of the data file would appear. The cluster lock is held across
// the data write, so a second writer of the cluster cannot have its data
// zeroed, and the entry changes only after the data file holds what it maps.
int Qcow2Device::write_raw_cluster(uint64_t guest, std::span<const std::byte> data) {
  const uint64_t gc = guest >> cluster_bits_;
  const uint64_t cstart = gc << cluster_bits_;
  const uint64_t want = cstart | kCopied;
  const uint64_t want_bitmap = extended_l2_ ? kAllocBits : 0;
  const uint64_t l1i = gc / l2_entries_, idx = gc % l2_entries_;
  WriterLock lk(mu_);
  CachedTable* t = nullptr;
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  if (entry_at(*t, idx) == want && bitmap_at(*t, idx) == want_bitmap) {
    lk.unlock();  // Already mapped 1:1: the data file alone changes.
    return data_file_->write_at(guest, data);
  }
  InflightCluster busy(*this, lk, gc);
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  const uint32_t zeros = raw_zero_subclusters(entry_at(*t, idx), bitmap_at(*t, idx));
  {
    WriterUnlock unlocked(mu_);
    if (int r = fill_raw_zero_gaps(cstart, zeros, guest - cstart, guest - cstart + data.size()))
      return r;
    if (int r = data_file_->write_at(guest, data)) return r;
  }
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  set_entry(*t, idx, want, want_bitmap);
  return 0;
}

// Writes zeros into the data file over the zero subclusters of the cluster at
// `cstart`, except [skip_from, skip_to) (cluster-relative), which the caller
// writes itself.
int Qcow2Device::fill_raw_zero_gaps(uint64_t cstart, uint32_t zeros, uint64_t skip_from,
                                    uint64_t skip_to) {
  if (!zeros) return 0;
  const uint64_t unit = extended_l2_ ? cluster_size_ / kSubclusters : cluster_size_;
  const unsigned units = extended_l2_ ? kSubclusters : 1;
  auto fill = [&](uint64_t a, uint64_t b) {
    return a < b ? data_file_->write_at(cstart + a, std::span(zero_buffer()).first(b - a)) : 0;
  };
  for (unsigned i = 0; i < units; ++i) {
    if (!((zeros >> i) & 1)) continue;
    const uint64_t from = i * unit, to = from + unit;
    if (int r = fill(from, std::min(to, skip_from))) return r;
    if (int r = fill(std::max(from, skip_to), to)) return r;
  }
  return 0;
}

// Writes `data` (inside one cluster), allocating and copying as needed: the
// plan and the order of its steps are described in write_plan.h.
int Qcow2Device::write_cluster(uint64_t guest, std::span<const std::byte> data) {
  const uint64_t gc = guest >> cluster_bits_;
  WriterLock lk(mu_);
  InflightCluster busy(*this, lk, gc);
  WritePlan plan;
  if (int r = plan_write_locked(guest, data.size(), plan)) return r;
  if (int r = take_host_cluster_locked(plan)) return r;  // 1.
  {
    WriterUnlock unlocked(mu_);
    if (int r = write_planned_data(plan, data)) return r;  // 2.
  }
  return commit_write_locked(plan);  // 3.
}

int Qcow2Device::plan_write_locked(uint64_t guest, uint64_t length, WritePlan& plan) {
  const uint64_t gc = guest >> cluster_bits_;
  const uint64_t cstart = gc << cluster_bits_;
  CachedTable* t = nullptr;
  if (int r = get_l2_for_write_locked(gc / l2_entries_, t)) return r;
  const uint64_t e = entry_at(*t, gc % l2_entries_);
  const bool backing_visible = backing_ && cstart < backing_size_;
  return plan_cluster_write(e, classify(e), bitmap_at(*t, gc % l2_entries_), l2_format_, gc,
                            guest - cstart, length, backing_visible, plan);
}

// Step 1: the host cluster the data goes to, checked against the metadata.
int Qcow2Device::take_host_cluster_locked(WritePlan& plan) {
  if (plan.target == WritePlan::Target::allocate) {
    if (int r = alloc_cluster_locked(plan.host, plan.fresh)) return r;
    ++cow_allocations_;
  }
  return check_data_write_locked(plan.host);
}

// Step 2, without mu_: the guest data, with the copied head and tail around it
// unless the target already holds them.
int Qcow2Device::write_planned_data(const WritePlan& plan, std::span<const std::byte> data) {
  const bool as_is = (plan.fresh && plan.old_zero) || plan.in_place_as_is;
  if (as_is) {
    if (int r = data_file_->write_at(plan.host + plan.offset, data)) return r;
  } else {
    std::vector<std::byte> buf(plan.copy_to - plan.copy_from);
    if (int r = copy_current(plan, buf, plan.copy_from, plan.offset)) return r;
    if (int r = copy_current(plan, buf, plan.offset + plan.length, plan.copy_to)) return r;
    std::memcpy(buf.data() + (plan.offset - plan.copy_from), data.data(), data.size());
    if (int r = data_file_->write_at(plan.host + plan.copy_from, buf)) return r;
  }
  data_dirty_ = true;
  return 0;
}

// Fills [a, b) (cluster-relative) of `buf`, which starts at plan.copy_from,
// with what the cluster reads as now (old cluster, compressed data, backing
// file or zeros), clipped to the virtual size.
int Qcow2Device::copy_current(const WritePlan& plan, std::span<std::byte> buf, uint64_t a,
                              uint64_t b) {
  if (a >= b) return 0;
  auto dst = buf.subspan(a - plan.copy_from, b - a);
  if (plan.zero_flag) {
    std::memset(dst.data(), 0, dst.size());
    return 0;
  }
  const uint64_t cstart = plan.guest_cluster << cluster_bits_;
  const uint64_t vis = cstart + a < size_ ? std::min(b - a, size_ - cstart - a) : 0;
  if (vis < dst.size()) std::memset(dst.data() + vis, 0, dst.size() - vis);
  return vis ? read(cstart + a, dst.first(vis)) : 0;
}

// Step 3: the L2 entry names the new data; the old clusters are queued.
int Qcow2Device::commit_write_locked(const WritePlan& plan) {
  CachedTable* t = nullptr;
  if (int r = get_l2_locked(plan.guest_cluster / l2_entries_, t)) return r;
  if (!t) return EIO;
  set_entry(*t, plan.guest_cluster % l2_entries_, plan.host | kCopied, plan.new_bitmap);
  if (plan.free_old) free_entry_locked(plan.old_entry);
  if (pending_frees_.size() > 4096) return flush_locked();
  return 0;
}

int Qcow2Device::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (read_only_) return EPERM;
  if (int r = begin_writing_once()) return r;
  mark_dirty(offset, length);
  const uint64_t end = offset + length;
  if (data_file_raw_) {
    if (flags.fast_only) return ENOTSUP;
    for (uint64_t pos = offset; pos < end;) {
      uint64_t n = std::min<uint64_t>(end - pos, zero_buffer().size());
      if (int r = write(pos, std::span(zero_buffer()).first(n), false)) return r;
      pos += n;
    }
    return flags.fua ? flush() : 0;
  }
  for (uint64_t pos = offset; pos < end;) {
    uint64_t cend = std::min(end, ((pos >> cluster_bits_) + 1) << cluster_bits_);
    if (int r = zero_cluster(pos, cend - pos, flags, false)) return r;
    pos = cend;
  }
  return flags.fua ? flush() : 0;
}

int Qcow2Device::trim(uint64_t offset, uint64_t length, bool fua) {
  if (read_only_) return EPERM;
  if (int r = begin_writing_once()) return r;
  mark_dirty(offset, length);
  if (data_file_raw_) {
    // The raw file must stay the disk: give its space back (the range reads as
    // zeros there and through the qcow2 alike) and leave the metadata alone.
    int r = data_file_->punch_hole(offset, length);
    if (r && r != ENOTSUP && r != EOPNOTSUPP) return r;
    return fua ? flush() : 0;
  }
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    uint64_t cend = std::min(end, ((pos >> cluster_bits_) + 1) << cluster_bits_);
    if (int r = zero_cluster(pos, cend - pos, ZeroFlags{.may_trim = true}, true)) return r;
    pos = cend;
  }
  return fua ? flush() : 0;
}

Qcow2Device::ZeroRequest Qcow2Device::zero_request(uint64_t guest, uint64_t length, ZeroFlags flags,
                                                   bool is_trim) const {
  ZeroRequest z;
  z.guest_cluster = guest >> cluster_bits_;
  z.cluster_start = z.guest_cluster << cluster_bits_;
  z.from = guest - z.cluster_start;
  // Past the virtual size counts as covered.
  z.to = (guest + length >= size_) ? cluster_size_ : z.from + length;
  const uint64_t unit = extended_l2_ ? cluster_size_ / kSubclusters : cluster_size_;
  z.whole_from = (z.from + unit - 1) / unit * unit;
  z.whole_to = z.to / unit * unit;
  z.backing_visible = backing_ && z.cluster_start < backing_size_;
  z.flags = flags;
  z.is_trim = is_trim;
  return z;
}

// Explicit zeros over [from, to) (cluster-relative, clipped to the virtual
// size) through write_cluster(); trim leaves partial units alone.
int Qcow2Device::write_zeros(const ZeroRequest& z, uint64_t from, uint64_t to) {
  if (from >= to || z.is_trim) return 0;
  if (z.flags.fast_only) return ENOTSUP;
  const uint64_t vis_to = std::min(to, size_ - z.cluster_start);
  if (from >= vis_to) return 0;
  return write_cluster(z.cluster_start + from, std::span(zero_buffer()).first(vis_to - from));
}

// Zeroes (or trims) [guest, guest+length) inside one cluster. Whole clusters
// and subclusters change metadata only; partial ones are written as zeros
// (trim skips them).
int Qcow2Device::zero_cluster(uint64_t guest, uint64_t length, ZeroFlags flags, bool is_trim) {
  const ZeroRequest z = zero_request(guest, length, flags, is_trim);
  if (z.whole_from >= z.whole_to)
    return write_zeros(z, z.from, std::min(z.to, size_ - z.cluster_start));
  const bool v3 = header_.version >= 3;
  if (!v3 && !is_trim && (z.backing_visible || !flags.may_trim)) return zero_cluster_v2(z);
  if (!v3 && is_trim && z.backing_visible) return 0;
  if (int r = write_zeros(z, z.from, z.whole_from)) return r;
  if (int r = write_zeros(z, z.whole_to, z.to)) return r;
  return zero_whole_units(z);
}

// No zero flag in v2: explicit zeros, unless the cluster already reads as zero.
int Qcow2Device::zero_cluster_v2(const ZeroRequest& z) {
  bool unallocated = false;
  {
    WriterLock lk(mu_);
    CachedTable* t = nullptr;
    if (int r = get_l2_locked(z.guest_cluster / l2_entries_, t)) return r;
    unallocated = !t || entry_at(*t, z.guest_cluster % l2_entries_) == 0;
  }
  if (unallocated && !z.backing_visible) return 0;
  return write_zeros(z, z.from, z.to);
}

// The whole units [whole_from, whole_to) by a change of the L2 entry.
int Qcow2Device::zero_whole_units(const ZeroRequest& z) {
  const uint64_t l1i = z.guest_cluster / l2_entries_, idx = z.guest_cluster % l2_entries_;
  WriterLock lk(mu_);
  InflightCluster busy(*this, lk, z.guest_cluster);
  CachedTable* t = nullptr;
  if (int r = get_l2_locked(l1i, t)) return r;
  if (!t && !z.backing_visible) return 0;  // already reads as zeros
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  const uint64_t e = entry_at(*t, idx);
  const uint64_t bm = bitmap_at(*t, idx);
  const L2Entry d = classify(e);
  // Unallocated instead of zero when nothing shows through.
  const bool dealloc = !z.backing_visible && (z.is_trim || z.flags.may_trim || header_.version < 3);
  const ZeroPlan p = plan_cluster_zero(e, d, bm, l2_format_, z.whole_from, z.whole_to, dealloc,
                                       z.is_trim, z.flags.may_trim);
  if (p.copy_on_write) {
    unlock_cluster(z.guest_cluster);
    busy.dismiss();
    lk.unlock();
    return write_zeros(z, z.whole_from, z.whole_to);
  }
  if (p.new_entry != e || p.new_bitmap != bm) set_entry(*t, idx, p.new_entry, p.new_bitmap);
  if (p.drop_old) {
    if (external_data_file_ && d.has_host && z.is_trim) {
      int r = data_file_->punch_hole(d.host, cluster_size_);
      (void)r;  // advisory
    }
    free_entry_locked(e);
  }
  if (pending_frees_.size() > 4096) return flush_locked();
  return 0;
}

}  // namespace strata::qcow2
