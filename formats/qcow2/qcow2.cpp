// qcow2: open, mapping (guest -> host runs), reads, extents, info.
#include "formats/qcow2/qcow2.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "formats/endian.h"
#include "formats/errors.h"
#include "formats/qcow2/compress.h"

namespace strata::qcow2 {

Qcow2Device::Qcow2Device(std::unique_ptr<File> file, ChainContext& ctx) : file_(std::move(file)) {
  // Nobody else can reach the device yet; the lock is for the helpers, which
  // touch what it guards.
  WriterLock lk(mu_);
  header_ = read_header(*file_);
  cluster_size_ = header_.cluster_size();
  cluster_bits_ = header_.cluster_bits;
  extended_l2_ = header_.extended_l2();
  l2_entry_bytes_ = extended_l2_ ? 16 : 8;
  l2_entries_ = cluster_size_ / l2_entry_bytes_;
  external_data_file_ = header_.has_data_file();
  data_file_raw_ = header_.data_file_raw();
  l2_format_ = {cluster_bits_, extended_l2_, external_data_file_};
  // QEMU serves floor(size / 512) * 512 bytes.
  size_ = header_.size & ~uint64_t{511};
  read_only_ = !file_->writable();
  if (header_.incompatible & kIncompatCorrupt) {
    corrupt_ = true;
    if (!read_only_) {  // as QEMU: the metadata cannot be trusted for writing
      throw_image_error(
          path(),
          "the corrupt bit is set (incompatible feature bit 1): its metadata is inconsistent; "
          "open it read-only, or repair it with 'qemu-img check -r all'");
    }
  }
  if (header_.nb_snapshots) snapshots_ = read_snapshots(*file_, header_, &snapshot_table_bytes_);

  l1_table_.resize(header_.l1_size);
  if (header_.l1_size) {
    std::vector<uint8_t> raw(uint64_t{header_.l1_size} * 8);
    if (read_bytes(*file_, header_.l1_table_offset, raw.data(), raw.size()) != 0) {
      throw_image_error(path(), "cannot read the L1 table");
    }
    for (uint64_t i = 0; i < header_.l1_size; ++i) l1_table_[i] = load_be64(raw.data() + i * 8);
  }
  refcount_table_offset_ = header_.refcount_table_offset;
  refcount_table_clusters_ = header_.refcount_table_clusters;
  {
    uint64_t n = refcount_table_clusters_ * cluster_size_ / 8;
    std::vector<uint8_t> raw(n * 8);
    if (read_bytes(*file_, refcount_table_offset_, raw.data(), raw.size()) != 0) {
      throw_image_error(path(), "cannot read the refcount table");
    }
    refcount_table_.resize(n);
    for (uint64_t i = 0; i < n; ++i) refcount_table_[i] = load_be64(raw.data() + i * 8);
  }
  refblock_entries_ = cluster_size_ * 8 / header_.refcount_bits();
  refcount_max_ =
      header_.refcount_order == 6 ? ~uint64_t{0} : (uint64_t{1} << header_.refcount_bits()) - 1;
  int64_t fsize = file_->size();
  first_unused_cluster_ = (static_cast<uint64_t>(fsize) + cluster_size_ - 1) / cluster_size_;
  free_hint_ = first_unused_cluster_;

  open_children(ctx);
  setup_caches(ctx.options.metadata_cache_bytes);
  if (!read_only_) prepare_for_writing();
  load_bitmaps();
}

Qcow2Device::~Qcow2Device() {
  WriterLock lk(mu_);
  if (int r = store_bitmaps_locked())
    spdlog::error("{}: storing the dirty bitmaps failed: {}; they stay marked in use", path(),
                  std::strerror(r));
  if (int r = flush_locked())
    spdlog::error("{}: flush on close failed: {}", path(), std::strerror(r));
  if (read_only_) {
    spdlog::debug("{}: {}", path(), stats_locked_free());
  } else {
    spdlog::info("{}: {}", path(), stats_locked_free());
  }
}

void Qcow2Device::open_children(ChainContext& ctx) {
  if (external_data_file_) {
    std::string name = header_.data_file;
    if (ctx.depth == 0 && ctx.options.data_file) name = *ctx.options.data_file;
    if (name.empty()) {
      throw_image_error(
          path(),
          "incompatible feature bit 2 (external data file) is set but no data file name "
          "is recorded; configure one (data_file)");
    }
    data_file_name_ = name;
    std::string p = resolve_child_path(ctx, path(), name, ChildRole::data_file);
    data_file_owned_ = ctx.files().open(p, !read_only_);
    auto key = std::make_pair(data_file_owned_->device(), data_file_owned_->inode());
    if (!ctx.seen.insert(key).second) {
      throw_image_error(path(), "data file '" + name + "' is already part of this chain");
    }
    if (ctx.options.lock) lock_image(*data_file_owned_);
    data_file_ = data_file_owned_.get();
  } else {
    data_file_ = file_.get();
  }
  if (!header_.backing_file.empty()) {
    backing_name_ = header_.backing_file;
    backing_format_ = header_.backing_format;
    Format fmt = Format::automatic;
    if (!backing_format_.empty()) {
      auto f = parse_format(backing_format_);
      if (!f || *f == Format::automatic) {
        throw_image_error(path(), "backing format '" + backing_format_ + "' is not supported");
      }
      fmt = *f;
    }
    backing_ = open_child(ctx, path(), backing_name_, fmt, ChildRole::backing);
    backing_size_ = backing_->size();
  }
}

void Qcow2Device::setup_caches(uint64_t budget) {
  const uint64_t tables_needed =
      std::max<uint64_t>(1, l1_entries_needed(size_, cluster_bits_, extended_l2_));
  uint64_t l2_tables;
  uint64_t rb_tables = 4;
  if (budget == 0) {
    l2_tables =
        std::min<uint64_t>(tables_needed, std::max<uint64_t>(1, (32ull << 20) / cluster_size_));
  } else {
    uint64_t rest = budget > rb_tables * cluster_size_ ? budget - rb_tables * cluster_size_ : 0;
    l2_tables = std::min<uint64_t>(tables_needed, rest / cluster_size_);
  }
  l2_tables = std::max<uint64_t>(l2_tables, 2);
  l2_cache_ = std::make_unique<TableCache>("L2", l2_tables);
  refblock_cache_ = std::make_unique<TableCache>("refcount", rb_tables);
}

void Qcow2Device::prepare_for_writing() {
  if (header_.incompatible & kIncompatDirty) {
    spdlog::warn("{}: dirty bit set (lazy refcounts): rebuilding refcounts", path());
    rebuild_refcounts();
    spdlog::info("{}: refcounts rebuilt", path());
  }
  refuse_lost_refcounts();
  build_metadata_map();
  // A truncated image has clusters in use at and past EOF: new clusters go
  // after all of them.
  first_unused_cluster_ = std::max({first_unused_cluster_, metadata_map_.end(), refcounted_end()});
}

Capabilities Qcow2Device::capabilities() const {
  Capabilities c;
  c.read_only = read_only_;
  c.can_trim = !read_only_;
  c.can_zero = true;
  c.can_fast_zero = !read_only_ && header_.version >= 3 && !data_file_raw_;
  c.can_multi_conn = true;
  return c;
}

BlockSizes Qcow2Device::block_sizes() const {
  BlockSizes b;
  b.preferred = static_cast<uint32_t>(
      std::max<uint64_t>(4096, std::min<uint64_t>(cluster_size_, 2ull << 20)));
  return b;
}

std::vector<Child> Qcow2Device::children() const {
  std::vector<Child> out;
  if (backing_) out.push_back({ChildRole::backing, backing_});
  return out;
}

// ---- mapping

bool Qcow2Device::host_cluster_valid(uint64_t host) const {
  return host != 0 && host < kMaxHostOffset && host % cluster_size_ == 0;
}

uint64_t Qcow2Device::entry_at(const CachedTable& t, uint64_t i) const {
  return load_be64(t.data.data() + i * l2_entry_bytes_);
}

uint64_t Qcow2Device::bitmap_at(const CachedTable& t, uint64_t i) const {
  return extended_l2_ ? load_be64(t.data.data() + i * 16 + 8) : 0;
}

void Qcow2Device::set_entry(CachedTable& t, uint64_t i, uint64_t entry, uint64_t bitmap) {
  store_be64(t.data.data() + i * l2_entry_bytes_, entry);
  if (extended_l2_) store_be64(t.data.data() + i * 16 + 8, bitmap);
  t.dirty = true;
}

int Qcow2Device::load_table(TableCache& cache, uint64_t offset, CachedTable*& out, bool fresh) {
  if (CachedTable* t = cache.find(offset)) {
    if (fresh) {  // a newly allocated cluster: never trust older contents
      std::fill(t->data.begin(), t->data.end(), 0);
      t->dirty = true;
    }
    out = t;
    return 0;
  }
  if (int r = make_room_locked(cache)) return r;
  std::vector<uint8_t> d(cluster_size_);
  if (!fresh) {
    if (int r = file_->read_at(offset, {reinterpret_cast<std::byte*>(d.data()), d.size()}))
      return r;
  }
  out = cache.insert(offset, std::move(d), fresh);
  return 0;
}

int Qcow2Device::make_room_locked(TableCache& cache) {
  if (CachedTable* v = cache.victim()) {
    if (v->dirty) {
      int r = &cache == l2_cache_.get() ? writeback_locked() : write_refblock(*v);
      if (r) return r;
    }
    cache.erase(v->offset);
  }
  return 0;
}

int Qcow2Device::get_l2_locked(uint64_t l1_index, CachedTable*& out) {
  out = nullptr;
  if (l1_index >= l1_table_.size()) return EIO;
  uint64_t e = l1_table_[l1_index];
  if (e & kL1ReservedMask) return EIO;
  uint64_t off = e & kL1OffsetMask;
  if (off == 0) return 0;
  if (!host_cluster_valid(off)) return EIO;
  return load_table(*l2_cache_, off, out, false);
}

namespace {

void push_run(std::vector<Run>& out, const Run& r) {
  if (r.length == 0) return;
  if (!out.empty()) {
    Run& l = out.back();
    if (l.kind == r.kind && l.guest + l.length == r.guest && r.kind != Kind::compressed &&
        (r.kind != Kind::data || l.host + l.length == r.host)) {
      l.length += r.length;
      return;
    }
  }
  out.push_back(r);
}

}  // namespace

int Qcow2Device::map(uint64_t off, uint64_t len, std::vector<Run>& out, uint64_t max_l2,
                     uint64_t& covered) {
  {
    ReaderLock lk(mu_);
    uint64_t missing = 0;
    if (int r = map_locked(off, len, out, max_l2, covered, &missing, true)) return r;
    if (covered > 0 || missing == 0) return 0;
  }
  for (int attempt = 0;; ++attempt) {
    out.clear();
    uint64_t missing = 0, epoch = 0;
    {
      WriterLock lk(mu_);
      // A table lost twice to concurrent metadata changes is read under the lock.
      if (int r = map_locked(off, len, out, max_l2, covered, attempt < 2 ? &missing : nullptr)) {
        return r;
      }
      if (covered > 0 || missing == 0) return 0;
      epoch = l2_epoch_;
    }
    std::vector<uint8_t> table(cluster_size_);
    if (int r =
            file_->read_at(missing, {reinterpret_cast<std::byte*>(table.data()), table.size()})) {
      return r;
    }
    WriterLock lk(mu_);
    if (l2_epoch_ != epoch || l2_cache_->contains(missing)) continue;
    ++l2_cache_->misses;
    if (int r = make_room_locked(*l2_cache_)) return r;
    // The writeback a dirty victim needs may have changed tables on disk.
    if (l2_epoch_ != epoch) continue;
    l2_cache_->insert(missing, std::move(table), false);
  }
}

// The analysis cannot tie the lock mode to `shared`: map() passes true
// exactly when it holds mu_ shared, and only then are tables peeked at rather
// than loaded (which changes the cache and needs mu_ exclusively).
int Qcow2Device::l2_for_map(uint64_t l2_offset, const uint64_t* missing, bool shared,
                            const CachedTable*& out) NO_THREAD_SAFETY_ANALYSIS {
  out = nullptr;
  if (shared) {
    out = l2_cache_->peek(l2_offset);
  } else if (!missing || l2_cache_->contains(l2_offset)) {
    CachedTable* loaded = nullptr;
    if (int r = load_table(*l2_cache_, l2_offset, loaded, false)) return r;
    out = loaded;
  }
  return 0;
}

int Qcow2Device::map_locked(uint64_t off, uint64_t len, std::vector<Run>& out, uint64_t max_l2,
                            uint64_t& covered, uint64_t* missing, bool shared) {
  const uint64_t end = off + len;
  const uint64_t table_span = l2_entries_ * cluster_size_;
  const uint32_t subcluster_bits = cluster_bits_ - 5;
  uint64_t pos = off;
  uint64_t tables = 0;
  // Unallocated ranges: backing file, or the raw data file 1:1 (data_file_raw).
  auto unallocated = [&](uint64_t g, uint64_t n) {
    if (data_file_raw_) {
      push_run(out, {g, n, Kind::data, g});
    } else {
      push_run(out, {g, n, Kind::backing, 0});
    }
  };
  // [from, to) of the cluster at `cstart`, whose entry is `e` (decoded `d`),
  // reads as `type`.
  uint64_t cstart = 0, e = 0;
  L2Entry d;
  auto push_mapped = [&](uint64_t from, uint64_t to, SubclusterType type) {
    // data_file_raw: in a valid entry naming a host cluster, what is not zero
    // reads the data file, even where the bitmap is inconsistent (allocated
    // and zero).
    if (data_file_raw_ && d.has_host && d.type != ClusterType::invalid && !is_zero(type)) {
      type = SubclusterType::normal;
    }
    switch (type) {
      case SubclusterType::normal:
        push_run(out, {from, to - from, Kind::data, d.host + (from - cstart)});
        break;
      case SubclusterType::zero_plain:
      case SubclusterType::zero_alloc:
        push_run(out, {from, to - from, Kind::zero, 0});
        break;
      case SubclusterType::unallocated_plain:
      case SubclusterType::unallocated_alloc:
        unallocated(from, to - from);
        break;
      case SubclusterType::compressed:
        push_run(out, {from, to - from, external_data_file_ ? Kind::invalid : Kind::compressed, e});
        break;
      case SubclusterType::invalid:
        push_run(out, {from, to - from, Kind::invalid, 0});
        break;
    }
  };
  while (pos < end) {
    uint64_t l1i = pos / table_span;
    uint64_t span_end = std::min(end, (l1i + 1) * table_span);
    if (l1i >= l1_table_.size()) {
      push_run(out, {pos, span_end - pos, Kind::invalid, 0});
      pos = span_end;
      continue;
    }
    uint64_t l1e = l1_table_[l1i];
    uint64_t l2off = l1e & kL1OffsetMask;
    if ((l1e & kL1ReservedMask) || (l2off && !host_cluster_valid(l2off))) {
      push_run(out, {pos, span_end - pos, Kind::invalid, 0});
      pos = span_end;
      continue;
    }
    if (l2off == 0) {
      unallocated(pos, span_end - pos);
      pos = span_end;
      continue;
    }
    if (tables >= max_l2) break;
    const CachedTable* t = nullptr;
    if (int r = l2_for_map(l2off, missing, shared, t)) return r;
    if (!t) {
      *missing = l2off;
      break;
    }
    ++tables;
    while (pos < span_end) {
      const uint64_t gc = pos >> cluster_bits_;
      cstart = gc << cluster_bits_;
      const uint64_t cend = std::min(span_end, cstart + cluster_size_);
      const uint64_t idx = gc % l2_entries_;
      e = entry_at(*t, idx);
      d = classify(e);
      // One run per cluster unless extended L2 splits it into subclusters.
      if (!extended_l2_ || d.compressed() || d.type == ClusterType::invalid) {
        push_mapped(pos, cend, subcluster_type_of(d.type));
        pos = cend;
        continue;
      }
      const uint64_t bitmap = bitmap_at(*t, idx);
      while (pos < cend) {
        const auto sc = static_cast<unsigned>((pos - cstart) >> subcluster_bits);
        const uint64_t scend = std::min(cend, cstart + ((uint64_t{sc} + 1) << subcluster_bits));
        push_mapped(pos, scend, classify_subcluster(d, bitmap, sc));
        pos = scend;
      }
    }
  }
  covered = pos - off;
  return 0;
}

// ---- reads

uint64_t Qcow2Device::backing_part(uint64_t off, uint64_t length) const {
  return backing_ && off < backing_size_ ? std::min(length, backing_size_ - off) : 0;
}

int Qcow2Device::read_backing(uint64_t off, std::span<std::byte> buf) {
  const uint64_t n = backing_part(off, buf.size());
  if (n) {
    if (int r = backing_->read(off, buf.first(n))) return r;
  }
  if (n < buf.size()) std::memset(buf.data() + n, 0, buf.size() - n);
  return 0;
}

int Qcow2Device::read_compressed(uint64_t e, std::vector<uint8_t>& cluster) {
  const CompressedDescriptor desc = parse_compressed_descriptor(e, cluster_bits_);
  const uint64_t coff = desc.offset, csize = desc.length();
  if (coff == 0 || coff >= kMaxHostOffset || coff + csize > kMaxHostOffset) return EIO;
  std::vector<uint8_t> in(csize);
  if (int r = file_->read_at(coff, {reinterpret_cast<std::byte*>(in.data()), in.size()})) return r;
  cluster.resize(cluster_size_);
  ++compressed_reads_;
  return decompress_cluster(header_.compression_type, in.data(), in.size(), cluster.data(),
                            cluster_size_);
}

int Qcow2Device::read_run(const Run& r, std::span<std::byte> dst, std::vector<uint8_t>& cluster) {
  switch (r.kind) {
    case Kind::data:
      return data_file_->read_at(r.host, dst);
    case Kind::zero:
      std::memset(dst.data(), 0, dst.size());
      return 0;
    case Kind::backing:
      return read_backing(r.guest, dst);
    case Kind::compressed:
      if (int err = read_compressed(r.host, cluster)) return err;
      std::memcpy(dst.data(), cluster.data() + (r.guest & (cluster_size_ - 1)), dst.size());
      return 0;
    case Kind::invalid:
      break;
  }
  spdlog::warn("{}: corrupt mapping for guest offset {}: EIO", path(), r.guest);
  return EIO;
}

int Qcow2Device::read_runs(const std::vector<Run>& runs, uint64_t base, std::span<std::byte> buf) {
  std::vector<uint8_t> cluster;
  for (const Run& r : runs) {
    if (int err = read_run(r, buf.subspan(r.guest - base, r.length), cluster)) return err;
  }
  return 0;
}

// Every read goes through the mapping, data_file_raw included: the L2 zero
// flags (and extended L2 zero bits) are authoritative there as well, as in
// QEMU and in extents(), so the data file is not simply the disk. A run of
// plainly allocated clusters still maps to one contiguous run and costs one
// read of the data file.
int Qcow2Device::read(uint64_t offset, std::span<std::byte> buf) {
  return for_each_run(offset, buf.size(),
                      [&](const std::vector<Run>& runs, uint64_t base, uint64_t covered) {
                        return read_runs(runs, base, buf.subspan(base - offset, covered));
                      });
}

template <class Visit>
int Qcow2Device::for_each_run(uint64_t offset, uint64_t length, Visit&& visit) {
  uint64_t done = 0;
  std::vector<Run> runs;
  while (done < length) {
    runs.clear();
    uint64_t covered = 0;
    if (int r = map(offset + done, length - done, runs, 64, covered)) return r;
    if (covered == 0) return EIO;
    if (int r = visit(runs, offset + done, covered)) return r;
    done += covered;
  }
  return 0;
}

int Qcow2Device::read_deferring_data(uint64_t offset, std::span<std::byte> buf,
                                     std::vector<BatchIo>& host) {
  std::vector<uint8_t> cluster;
  return for_each_run(offset, buf.size(), [&](const std::vector<Run>& runs, uint64_t, uint64_t) {
    for (const Run& r : runs) {
      auto dst = buf.subspan(r.guest - offset, r.length);
      if (r.kind == Kind::data) {
        host.push_back({.offset = r.host, .data = dst.data(), .length = dst.size()});
      } else if (int err = read_run(r, dst, cluster)) {
        return err;
      }
    }
    return 0;
  });
}

void Qcow2Device::run_batch(std::span<BatchIo> ops) {
  std::vector<BatchIo> host;
  std::vector<size_t> owner;  // the op each entry of `host` reads for
  for (size_t i = 0; i < ops.size(); ++i) {
    BatchIo& op = ops[i];
    const size_t before = host.size();
    op.result = 0;
    if (op.write) {
      if (!defer_in_place_write(op.offset, {op.data, op.length}, host)) {
        op.result = write(op.offset, {op.data, op.length}, false);
      }
    } else {
      op.result = read_deferring_data(op.offset, {op.data, op.length}, host);
    }
    if (op.result) host.resize(before);  // failed: nothing of it runs
    owner.resize(host.size(), i);
  }
  data_file_->run_batch(host);
  bool wrote = false;
  for (size_t k = 0; k < host.size(); ++k) {
    if (host[k].result && !ops[owner[k]].result) ops[owner[k]].result = host[k].result;
    wrote |= host[k].write;
  }
  // Only now: a flush that ran meanwhile must not have cleared it before
  // these writes reached the data file.
  if (wrote) data_dirty_ = true;
}

// ---- host mapping

// A data cluster of a writable image can be freed (trim, zero, a rewrite of
// a compressed or shared cluster) and handed to another guest offset before
// the reply is sent: only clusters that cannot move are mapped, those of a
// read-only layer and of data_file_raw (where the host offset is the guest
// offset, whatever the L2 table says next).
bool Qcow2Device::data_cannot_move(const Run& r) const {
  return read_only_.load(std::memory_order_acquire) || (data_file_raw_ && r.host == r.guest);
}

int Qcow2Device::map_backing(uint64_t off, uint64_t length, std::vector<HostPiece>& out) {
  const uint64_t n = backing_part(off, length);
  if (n) {
    if (int r = backing_->map_host(off, n, out)) return r;
  }
  append_zeros(out, length - n);
  return 0;
}

int Qcow2Device::map_runs(const std::vector<Run>& runs, std::vector<HostPiece>& out) {
  for (const Run& r : runs) {
    int err = 0;
    switch (r.kind) {
      case Kind::data:
        err = data_cannot_move(r) ? map_file(*data_file_, r.host, r.length, out) : ENOTSUP;
        break;
      case Kind::zero:
        append_zeros(out, r.length);
        break;
      case Kind::backing:
        err = map_backing(r.guest, r.length, out);
        break;
      case Kind::compressed:  // the bytes exist only once inflated
      case Kind::invalid:     // read() reports it
        err = ENOTSUP;
        break;
    }
    if (err) return err;
  }
  return 0;
}

int Qcow2Device::map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
  return for_each_run(offset, length, [&](const std::vector<Run>& runs, uint64_t, uint64_t) {
    return map_runs(runs, out);
  });
}

// ---- extents

int Qcow2Device::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  std::vector<Run> runs;
  uint64_t covered = 0;
  if (int r = map(offset, length, runs, 16, covered)) return r;
  if (covered == 0) return EIO;
  const Extent data{.length = 0, .hole = false, .zero = false, .depth = 1};
  const Extent zero_here{.length = 0, .hole = true, .zero = true, .depth = 1};
  const Extent nothing{.length = 0, .hole = true, .zero = true, .depth = 0};
  std::vector<Extent> tmp;
  for (const Run& r : runs) {
    Extent e;
    switch (r.kind) {
      case Kind::data:
      case Kind::compressed:
      case Kind::invalid:
        e = data;
        break;
      case Kind::zero:
        e = zero_here;
        break;
      case Kind::backing: {
        uint64_t pos = r.guest;
        const uint64_t end = r.guest + r.length;
        uint64_t bend = backing_ ? std::min(end, std::max(pos, backing_size_)) : pos;
        while (pos < bend) {
          tmp.clear();
          if (int err = backing_->extents(pos, bend - pos, tmp)) return err;
          if (tmp.empty()) return EIO;
          for (Extent be : tmp) {
            be.length = std::min(be.length, bend - pos);
            if (be.length == 0) break;
            be.depth = be.depth ? be.depth + 1 : 0;
            append_extent(out, be);
            pos += be.length;
          }
        }
        e = nothing;
        e.length = end - pos;
        append_extent(out, e);
        continue;
      }
    }
    e.length = r.length;
    append_extent(out, e);
  }
  return 0;
}

// ---- info

void Qcow2Device::describe(nlohmann::json& out) const {
  WriterLock lk(mu_);
  out["compat"] = header_.version == 2 ? "0.10" : "1.1";
  out["version"] = header_.version;
  out["cluster-size"] = cluster_size_;
  out["virtual-size"] = size_;
  out["refcount-bits"] = header_.refcount_bits();
  out["compression-type"] = header_.compression_type == 1 ? "zstd" : "zlib";
  out["lazy-refcounts"] = (header_.compatible & kCompatLazyRefcounts) != 0;
  out["extended-l2"] = extended_l2_;
  out["corrupt"] = corrupt_;
  out["dirty"] = (header_.incompatible & kIncompatDirty) != 0;
  if (!backing_name_.empty()) {
    out["backing-filename"] = backing_name_;
    if (!backing_format_.empty()) out["backing-filename-format"] = backing_format_;
  }
  if (external_data_file_) {
    out["data-file"] = data_file_name_;
    out["data-file-raw"] = data_file_raw_;
  }
  if (!snapshots_.empty()) {
    auto arr = nlohmann::json::array();
    for (const auto& s : snapshots_) arr.push_back({{"id", s.id}, {"name", s.name}});
    out["snapshots"] = arr;
  }
  if (header_.has_bitmaps_ext) {
    auto arr = nlohmann::json::array();
    for (const TrackedBitmap& b : bitmaps_) {
      auto flags = nlohmann::json::array();
      if (b.entry.in_use()) flags.push_back("in-use");
      if (b.entry.enabled()) flags.push_back("auto");
      nlohmann::json j = {{"name", b.entry.name},
                          {"granularity", b.entry.granularity()},
                          {"flags", flags},
                          {"consistent", b.problem.empty()}};
      if (!b.problem.empty()) j["problem"] = b.problem;
      arr.push_back(std::move(j));
    }
    out["bitmaps"] = arr;
    if (!bitmap_directory_problem_.empty()) out["bitmaps-problem"] = bitmap_directory_problem_;
  }
}

std::string Qcow2Device::stats_locked_free() const {
  return l2_cache_->stats() + "; " + refblock_cache_->stats() + "; compressed cluster reads " +
         std::to_string(compressed_reads_) + ", cluster allocations " +
         std::to_string(cow_allocations_) + ", metadata writebacks " + std::to_string(writebacks_);
}

DeviceCounters Qcow2Device::counters() const {
  ReaderLock lk(mu_);
  DeviceCounters c;
  for (const auto& [name, cache] :
       {std::pair{"l2", l2_cache_.get()}, {"refcount", refblock_cache_.get()}}) {
    c.caches.push_back({.cache = name,
                        .hits = cache->hits + cache->shared_hits(),
                        .misses = cache->misses,
                        .evictions = cache->evictions});
  }
  c.allocation_unit = "cluster";
  c.allocations = cow_allocations_.load(std::memory_order_relaxed);
  return c;
}

std::string Qcow2Device::stats() const {
  WriterLock lk(mu_);
  return stats_locked_free();
}

}  // namespace strata::qcow2

namespace strata {

std::shared_ptr<BlockDevice> open_qcow2(std::unique_ptr<File> file, ChainContext& ctx) {
  return std::make_shared<qcow2::Qcow2Device>(std::move(file), ctx);
}

}  // namespace strata
