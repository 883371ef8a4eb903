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

void Qcow2Device::lock_cluster(std::unique_lock<std::shared_mutex>& lk, uint64_t gc) {
  inflight_changed_.wait(lk, [&] { return inflight_.count(gc) == 0; });
  inflight_.insert(gc);
}

void Qcow2Device::unlock_cluster(uint64_t gc) {
  inflight_.erase(gc);
  inflight_changed_.notify_all();
}

int Qcow2Device::clear_autoclear_once() {
  if (autoclear_cleared_.load()) return 0;
  std::lock_guard lk(mu_);
  if (autoclear_cleared_) return 0;
  // We do not maintain persistent bitmaps or unknown autoclear features.
  uint64_t keep = header_.autoclear & kAutoclearDataFileRaw;
  if (header_.version >= 3 && keep != header_.autoclear) {
    uint8_t b[8];
    store_be64(b, keep);
    if (int r = write_metadata_locked(kOffAutoclear, b, 8, kMetaHeader)) return r;
    if (int r = file_->sync()) return r;
    spdlog::info("{}: cleared autoclear features {:#x}", path(), header_.autoclear & ~keep);
    header_.autoclear = keep;
  }
  autoclear_cleared_ = true;
  return 0;
}

int Qcow2Device::free_entry_locked(uint64_t e) {
  if (external_data_file_) return 0;  // data clusters of a data file are not refcounted
  if (e & kCompressed) {
    const uint32_t x = 62 - (cluster_bits_ - 8);
    uint64_t coff = e & ((uint64_t{1} << x) - 1);
    uint64_t nsec = ((e >> x) & ((uint64_t{1} << (cluster_bits_ - 8)) - 1)) + 1;
    uint64_t start = coff & ~uint64_t{511};
    uint64_t last = start + nsec * 512 - 1;
    for (uint64_t c = start >> cluster_bits_; c <= last >> cluster_bits_; ++c)
      pending_frees_.push_back(c);
    return 0;
  }
  uint64_t host = e & kL2OffsetMask;
  if (host) pending_frees_.push_back(host >> cluster_bits_);
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

int Qcow2Device::write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (read_only_) return EPERM;
  if (int r = clear_autoclear_once()) return r;
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

  // Fast path: every touched cluster (and subcluster) is allocated and ours.
  std::vector<Run> runs;
  bool inplace = true;
  {
    std::lock_guard lk(mu_);
    // An L2 table used twice must not be written through: write_cluster() checks.
    if (metadata_map_.has_duplicates()) inplace = false;
    const uint64_t sc_size = cluster_size_ / 32;
    for (uint64_t pos = offset; pos < end && inplace;) {
      uint64_t gc = pos >> cluster_bits_;
      uint64_t cstart = gc << cluster_bits_;
      uint64_t cend = std::min(end, cstart + cluster_size_);
      CachedTable* t = nullptr;
      if (get_l2_locked(gc / l2_entries_, t) != 0 || !t ||
          !(l1_table_[gc / l2_entries_] & kCopied)) {
        inplace = false;
        break;
      }
      uint64_t e = entry_at(*t, gc % l2_entries_);
      uint64_t host = e & kL2OffsetMask;
      bool ok = (e & kCopied) && !(e & kCompressed) && !(e & kL2StdReservedMask) &&
                !(e & kZeroFlag) && host % cluster_size_ == 0 &&
                (external_data_file_ || host_cluster_valid(host));
      if (ok && extended_l2_) {
        uint64_t bm = bitmap_at(*t, gc % l2_entries_);
        uint64_t s0 = (pos - cstart) / sc_size, s1 = (cend - 1 - cstart) / sc_size;
        uint64_t mask = ((s1 == 31 ? ~uint64_t{0} >> 32 : (uint64_t{1} << (s1 + 1)) - 1)) &
                        ~((uint64_t{1} << s0) - 1);
        ok = (bm & mask) == mask && (bm >> 32 & mask) == 0;
      }
      if (ok && overlaps_metadata(host)) ok = false;  // write_cluster() reports it
      if (!ok) {
        inplace = false;
        break;
      }
      runs.push_back({pos, cend - pos, Kind::data, host + (pos - cstart)});
      pos = cend;
    }
  }
  if (inplace) {
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

// REQUIRES mu_. The subclusters of an L2 entry that read as zeros under
// data_file_raw, as a 32-bit mask (bit i: subcluster i; a cluster without
// subclusters is all or nothing): the standard zero flag, or an extended L2
// zero bit without its allocation bit. Everything else reads the data file.
uint32_t Qcow2Device::raw_zero_subclusters(uint64_t entry, uint64_t bitmap) const {
  if (!extended_l2_) return (entry & kZeroFlag) ? ~uint32_t{0} : 0;
  return static_cast<uint32_t>(bitmap >> 32) & ~static_cast<uint32_t>(bitmap);
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
  const uint64_t want_bitmap = extended_l2_ ? 0xffffffffull : 0;
  std::unique_lock lk(mu_);
  CachedTable* t = nullptr;
  int r = get_l2_for_write_locked(gc / l2_entries_, t);
  if (r) return r;
  const uint64_t idx = gc % l2_entries_;
  if (entry_at(*t, idx) == want && bitmap_at(*t, idx) == want_bitmap) {
    lk.unlock();  // Already mapped 1:1: the data file alone changes.
    return data_file_->write_at(guest, data);
  }
  lock_cluster(lk, gc);
  r = get_l2_for_write_locked(gc / l2_entries_, t);
  if (!r) {
    const uint32_t zeros = raw_zero_subclusters(entry_at(*t, idx), bitmap_at(*t, idx));
    lk.unlock();
    r = fill_raw_zero_gaps(cstart, zeros, guest - cstart, guest - cstart + data.size());
    if (!r) r = data_file_->write_at(guest, data);
    lk.lock();
    if (!r) r = get_l2_for_write_locked(gc / l2_entries_, t);
    if (!r) set_entry(*t, idx, want, want_bitmap);
  }
  unlock_cluster(gc);
  return r;
}

// Writes zeros into the data file over the zero subclusters of the cluster at
// `cstart`, except [skip_from, skip_to) (cluster-relative), which the caller
// writes itself.
int Qcow2Device::fill_raw_zero_gaps(uint64_t cstart, uint32_t zeros, uint64_t skip_from,
                                    uint64_t skip_to) {
  if (!zeros) return 0;
  const uint64_t unit = extended_l2_ ? cluster_size_ / 32 : cluster_size_;
  const int units = extended_l2_ ? 32 : 1;
  for (int i = 0; i < units; ++i) {
    if (!((zeros >> i) & 1)) continue;
    const uint64_t from = i * unit, to = from + unit;
    auto fill = [&](uint64_t a, uint64_t b) {
      return a < b ? data_file_->write_at(cstart + a, std::span(zero_buffer()).first(b - a)) : 0;
    };
    if (int r = fill(from, std::min(to, skip_from))) return r;
    if (int r = fill(std::max(from, skip_to), to)) return r;
  }
  return 0;
}

// Writes `data` (inside one cluster), allocating and copying as needed.
int Qcow2Device::write_cluster(uint64_t guest, std::span<const std::byte> data) {
  const uint64_t gc = guest >> cluster_bits_;
  const uint64_t cstart = gc << cluster_bits_;
  const uint64_t in_off = guest - cstart;
  const uint64_t n = data.size();
  const uint64_t l1i = gc / l2_entries_, idx = gc % l2_entries_;
  const uint64_t sc_size = cluster_size_ / 32;

  std::unique_lock lk(mu_);
  lock_cluster(lk, gc);
  struct Release {
    Qcow2Device* d;
    std::unique_lock<std::shared_mutex>& lk;
    ~Release() {
      if (!lk.owns_lock()) lk.lock();
      d->unlock_cluster(d_gc);
    }
    uint64_t d_gc;
  } release{this, lk, gc};

  CachedTable* t = nullptr;
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  const uint64_t e = entry_at(*t, idx);
  const uint64_t bm = bitmap_at(*t, idx);
  const bool compressed = e & kCompressed;
  const uint64_t old_host = compressed ? 0 : e & kL2OffsetMask;
  const bool has_host = !compressed && (old_host != 0 || (external_data_file_ && (e & kCopied)));
  if (!compressed &&
      ((e & kL2StdReservedMask) || (extended_l2_ && (e & 1)) || old_host % cluster_size_ != 0))
    return EIO;
  if (compressed && external_data_file_) return EIO;
  const bool copied = e & kCopied;
  const bool zero_flag = !extended_l2_ && !compressed && (e & kZeroFlag);

  uint64_t host = 0;
  bool fresh = false;
  bool in_place = false;  // writing into the existing host cluster
  if (has_host && copied) {
    host = old_host;
    in_place = true;
  } else if (external_data_file_) {
    host = cstart;
  } else {
    if (int r = alloc_cluster_locked(host, fresh)) return r;
    ++cow_allocations_;
  }
  if (int r = check_data_write_locked(host)) return r;

  // Byte range of the new/old host cluster to write, relative to cstart.
  uint64_t lo, hi;
  uint64_t new_bm = 0;
  if (extended_l2_ && (in_place || (!has_host && !compressed))) {
    // Subcluster granularity: only the touched subclusters are written.
    uint64_t s0 = in_off / sc_size, s1 = (in_off + n - 1) / sc_size;
    lo = s0 * sc_size;
    hi = (s1 + 1) * sc_size;
    uint64_t mask = ((s1 == 31 ? ~uint64_t{0} >> 32 : (uint64_t{1} << (s1 + 1)) - 1)) &
                    ~((uint64_t{1} << s0) - 1);
    new_bm = (bm | mask) & ~(mask << 32);
    if (!has_host) new_bm &= ~uint64_t{0xffffffff} | mask;  // no stale allocation bits
  } else {
    lo = 0;
    hi = cluster_size_;
    new_bm = extended_l2_ ? 0xffffffffull : 0;
  }
  // Old contents are zeros (no copy needed into a fresh cluster) when:
  bool old_zero = zero_flag || (!has_host && !compressed && !extended_l2_ &&
                                (!backing_ || cstart >= backing_size_));
  const uint64_t new_entry = host | kCopied;

  lk.unlock();
  std::vector<std::byte> buf;
  std::span<const std::byte> out;
  uint64_t out_off;
  // The guest data goes out as it is into a fresh cluster over zeros, or in
  // place when no zero flag or partial subcluster needs the old contents.
  const bool write_as_is =
      (fresh && old_zero) ||
      (in_place && !zero_flag && (!extended_l2_ || (in_off == lo && in_off + n == hi)));
  if (write_as_is) {
    out = data;
    out_off = in_off;
  } else {
    buf.resize(hi - lo);
    // Head and tail from the current contents (old cluster, compressed data,
    // backing file or zeros), clipped to the virtual size.
    auto fill = [&](uint64_t a, uint64_t b) -> int {  // relative to cstart
      if (a >= b) return 0;
      auto dst = std::span<std::byte>(buf).subspan(a - lo, b - a);
      if (zero_flag) {
        std::memset(dst.data(), 0, dst.size());
        return 0;
      }
      uint64_t vis = cstart + a < size_ ? std::min(b - a, size_ - cstart - a) : 0;
      if (vis < dst.size()) std::memset(dst.data() + vis, 0, dst.size() - vis);
      return vis ? read(cstart + a, dst.first(vis)) : 0;
    };
    if (int r = fill(lo, in_off)) return r;
    if (int r = fill(in_off + n, hi)) return r;
    std::memcpy(buf.data() + (in_off - lo), data.data(), n);
    out = buf;
    out_off = lo;
  }
  if (int r = data_file_->write_at(host + out_off, out)) return r;
  data_dirty_ = true;

  lk.lock();
  if (int r = get_l2_locked(l1i, t)) return r;
  if (!t) return EIO;
  set_entry(*t, idx, new_entry, new_bm);
  if (!in_place && (compressed || has_host)) free_entry_locked(e);
  if (pending_frees_.size() > 4096) {
    if (int r = flush_locked()) return r;
  }
  return 0;
}

int Qcow2Device::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  if (read_only_) return EPERM;
  if (int r = clear_autoclear_once()) return r;
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
  if (data_file_raw_) {
    // The raw file must stay the disk: give its space back (the range reads as
    // zeros there and through the qcow2 alike) and leave the metadata alone.
    int r = data_file_->punch_hole(offset, length);
    if (r && r != ENOTSUP && r != EOPNOTSUPP) return r;
    return fua ? flush() : 0;
  }
  if (int r = clear_autoclear_once()) return r;
  const uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    uint64_t cend = std::min(end, ((pos >> cluster_bits_) + 1) << cluster_bits_);
    if (int r = zero_cluster(pos, cend - pos, ZeroFlags{.may_trim = true}, true)) return r;
    pos = cend;
  }
  return fua ? flush() : 0;
}

// Zeroes (or trims) [guest, guest+length) inside one cluster. Whole clusters
// and subclusters change metadata only; partial ones are written as zeros
// (trim skips them).
int Qcow2Device::zero_cluster(uint64_t guest, uint64_t length, ZeroFlags flags, bool is_trim) {
  const uint64_t gc = guest >> cluster_bits_;
  const uint64_t cstart = gc << cluster_bits_;
  const uint64_t in_off = guest - cstart;
  const uint64_t in_end =
      (guest + length >= size_) ? cluster_size_ : in_off + length;  // past size counts as covered
  const uint64_t l1i = gc / l2_entries_, idx = gc % l2_entries_;
  const bool v3 = header_.version >= 3;
  const bool backing_visible = backing_ && cstart < backing_size_;
  const uint64_t unit = extended_l2_ ? cluster_size_ / 32 : cluster_size_;
  // Whole units covered.
  const uint64_t a = (in_off + unit - 1) / unit * unit;
  const uint64_t b = in_end / unit * unit;

  auto write_zeros = [&](uint64_t from, uint64_t to) -> int {  // relative to cstart
    if (from >= to || is_trim) return 0;
    if (flags.fast_only) return ENOTSUP;
    uint64_t vis_to = std::min(to, size_ - cstart);
    if (from >= vis_to) return 0;
    return write_cluster(cstart + from, std::span(zero_buffer()).first(vis_to - from));
  };
  if (a >= b) return write_zeros(in_off, std::min(in_end, size_ - cstart));
  if (!v3 && !is_trim && (backing_visible || !flags.may_trim)) {
    // No zero flag in v2: explicit zeros, unless the cluster already reads as zero.
    std::unique_lock lk(mu_);
    CachedTable* t = nullptr;
    if (int r = get_l2_locked(l1i, t)) return r;
    bool unalloc = !t || entry_at(*t, idx) == 0;
    lk.unlock();
    if (unalloc && !backing_visible) return 0;
    return write_zeros(in_off, in_end);
  }
  if (!v3 && is_trim && backing_visible) return 0;

  if (int r = write_zeros(in_off, a)) return r;
  if (int r = write_zeros(b, in_end)) return r;

  std::unique_lock lk(mu_);
  lock_cluster(lk, gc);
  struct Release {
    Qcow2Device* d;
    uint64_t g;
    ~Release() {
      if (g != ~uint64_t{0}) d->unlock_cluster(g);
    }
  } release{this, gc};
  CachedTable* t = nullptr;
  if (int r = get_l2_locked(l1i, t)) return r;
  if (!t && !backing_visible) return 0;  // already reads as zeros
  if (int r = get_l2_for_write_locked(l1i, t)) return r;
  const uint64_t e = entry_at(*t, idx);
  const uint64_t bm = bitmap_at(*t, idx);
  const bool compressed = e & kCompressed;
  const uint64_t host = compressed ? 0 : e & kL2OffsetMask;
  const bool has_host = !compressed && (host != 0 || (external_data_file_ && (e & kCopied)));
  const bool whole = a == 0 && b == cluster_size_;
  // Unallocated instead of zero when nothing shows through.
  const bool dealloc = !backing_visible && (is_trim || flags.may_trim || !v3);

  uint64_t new_e = e, new_bm = bm;
  bool drop_old = false;
  if (!extended_l2_) {
    if (dealloc) {
      new_e = 0;
      drop_old = has_host || compressed;
    } else if (!is_trim && !flags.may_trim && has_host && (e & kCopied)) {
      new_e = host | kCopied | kZeroFlag;  // keep the allocation
    } else {
      new_e = kZeroFlag;
      drop_old = has_host || compressed;
    }
  } else {
    uint64_t s0 = a / unit, s1 = b / unit;  // [s0, s1)
    uint64_t mask =
        (s1 >= 32 ? 0xffffffffull : (uint64_t{1} << s1) - 1) & ~((uint64_t{1} << s0) - 1);
    if (compressed && !whole) {
      // Partially zeroing a compressed cluster: copy-on-write with zeros.
      unlock_cluster(gc);
      release.g = ~uint64_t{0};
      lk.unlock();
      return write_zeros(a, b);
    }
    if (whole &&
        (compressed || (dealloc && has_host) || (flags.may_trim && has_host && !(e & kCopied)))) {
      new_e = 0;
      new_bm = dealloc ? 0 : 0xffffffff00000000ull;
      drop_old = has_host || compressed;
    } else {
      new_bm = (bm & ~mask) & ~(mask << 32);
      if (!dealloc) new_bm |= mask << 32;
    }
  }
  if (new_e != e || new_bm != bm) set_entry(*t, idx, new_e, new_bm);
  if (drop_old) {
    if (external_data_file_ && has_host && is_trim) {
      int r = data_file_->punch_hole(host, cluster_size_);
      (void)r;  // advisory
    }
    free_entry_locked(e);
  }
  if (pending_frees_.size() > 4096) return flush_locked();
  return 0;
}

}  // namespace strata::qcow2
