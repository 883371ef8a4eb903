// The qcow2 driver (versions 2 and 3): standard, zero, compressed (deflate,
// zstd) and extended-L2 clusters, backing files of any format, external data
// files (with and without data_file_raw), internal snapshots (active layer
// served, shared clusters copied before a write).
//
// Concurrency: one metadata lock (mu_) guards the L1 table, the refcount
// table, both table caches and the allocator. It is held for table lookups and
// metadata writeback, never across guest data I/O: reads and in-place writes
// of allocated clusters run in parallel. Reads and block status map under
// the lock held shared when their L2 tables are cached (hits then mark the
// table referenced, for a second chance at eviction, instead of moving it),
// and read a missing table without the lock (l2_epoch_ keeps a table that
// changed meanwhile out of the cache). Every change takes the lock
// exclusively; writes load tables under it. A write that must change an L2
// entry marks its guest cluster in inflight_ so only that cluster is
// serialized. The rules are checked by clang's thread-safety analysis: mu_ is
// a SharedMutex (formats/mutex.h), what it guards is GUARDED_BY(mu_) and
// functions that expect it REQUIRES(mu_) (REQUIRES_SHARED where a shared hold
// is enough). Two spots are outside the analysis, each with its reason:
// l2_for_map() (the lock mode follows a flag) and ~InflightCluster().
//
// Where things are: l2_entry.h classifies L2 entries (the only code that
// reads their bits); write_plan.h decides what a write or zero write does to
// one cluster, write.cpp applies it.
//
// Crash safety (docs/DESIGN.md): metadata is cached write-back and written by
// writeback_locked() in dependency order — guest data synced, then refcount
// blocks, refcount table entries, L2 tables, L1 entries, each stage synced.
// Freed clusters are only decremented after the L2/L1 changes that dropped
// them are durable, so a crash leaks clusters but never leaves a referenced
// cluster with refcount 0.
//
// Corrupt images (docs/CORRUPT-IMAGES.md): a read-write open builds metadata_map_, the
// set of clusters holding metadata in use. Every new cluster, every metadata
// write and every guest data write into the image file is checked against it
// (QEMU's overlap check), as is every refcount decrement. On an inconsistency
// signal_corruption_locked() sets the corrupt bit (v3), fails the request with
// EIO and turns the device read-only; what was acknowledged before is still
// written back, frees are dropped (leaked).
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <set>
#include <unordered_set>
#include <vector>

#include "formats/block_device.h"
#include "formats/file.h"
#include "formats/mutex.h"
#include "formats/open.h"
#include "formats/qcow2/bitmap.h"
#include "formats/qcow2/header.h"
#include "formats/qcow2/l2_entry.h"
#include "formats/qcow2/metadata_map.h"
#include "formats/qcow2/table_cache.h"
#include "formats/qcow2/write_plan.h"

namespace strata::qcow2 {

// What a guest range maps to.
enum class Kind : uint8_t {
  data,        // at `host` in data_file_ (the data file or the image file)
  zero,        // zero flag in this layer
  backing,     // unallocated here: backing file (or zeros)
  compressed,  // `host` holds the L2 entry
  invalid      // corrupt mapping: EIO
};

struct Run {
  uint64_t guest = 0;
  uint64_t length = 0;
  Kind kind = Kind::backing;
  uint64_t host = 0;
};

class Qcow2Device final : public BlockDevice {
 public:
  Qcow2Device(std::unique_ptr<File> file, ChainContext& ctx);
  ~Qcow2Device() override;

  std::string_view format() const override { return "qcow2"; }
  const std::string& path() const override { return file_->path(); }
  uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;
  BlockSizes block_sizes() const override;

  int read(uint64_t offset, std::span<std::byte> buf) override;
  int map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) override;
  int write(uint64_t offset, std::span<const std::byte> buf, bool fua) override;
  // The data runs of the batch's reads and of its writes that need no
  // allocation go to the data file together; the rest (allocating writes,
  // zeros, backing, compressed clusters) run as they would one by one.
  void run_batch(std::span<BatchIo> ops) override;
  bool runs_batches() const override { return data_file_->runs_batches(); }
  int write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  int trim(uint64_t offset, uint64_t length, bool fua) override;
  int flush() override;
  int extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

  std::vector<std::string> dirty_bitmaps() const override;
  int dirty_extents(std::string_view name, uint64_t offset, uint64_t length,
                    std::vector<DirtyRun>& out) override;

  // ---- the image tool's bitmap verbs (bitmaps.cpp), on an image opened
  // read-write that nothing else uses. Each returns "" or the error.
  struct BitmapStatus {
    BitmapEntry entry;
    std::string problem;  // why it cannot be used ("" when consistent)
  };
  std::vector<BitmapStatus> bitmap_list() const;
  std::string bitmap_add(const std::string& name, uint32_t granularity_bits, bool enabled);
  std::string bitmap_remove(const std::string& name);
  std::string bitmap_clear(const std::string& name);
  std::string bitmap_enable(const std::string& name, bool enabled);

  std::vector<Child> children() const override;
  void describe(nlohmann::json& out) const override;
  void check(CheckReport& report) override;
  std::string stats() const override;
  // Takes the metadata lock shared only: a scrape never stops I/O.
  DeviceCounters counters() const override;

 private:
  std::string stats_locked_free() const REQUIRES_SHARED(mu_);
  friend struct Qcow2Test;

  // ---- open (qcow2.cpp). The constructor holds mu_ (nobody else can).
  void open_children(ChainContext& ctx) REQUIRES(mu_);
  void setup_caches(uint64_t budget) REQUIRES(mu_);
  void prepare_for_writing() REQUIRES(mu_);

  // ---- mapping (qcow2.cpp)
  // Appends runs for [off, off+len) touching at most max_l2 L2 tables; sets
  // `covered` to the bytes mapped.
  // With `missing`, stops at the first L2 table not in the cache and names it
  // there (instead of reading it under the lock). `shared`: mu_ is held
  // shared, so tables are only peeked at (REQUIRES missing); otherwise it is
  // held exclusively.
  int map_locked(uint64_t off, uint64_t len, std::vector<Run>& out, uint64_t max_l2,
                 uint64_t& covered, uint64_t* missing = nullptr, bool shared = false)
      REQUIRES_SHARED(mu_);
  // map_locked's L2 table lookup (see there); nullptr: not cached, and
  // `missing` asks to name it rather than read it.
  int l2_for_map(uint64_t l2_offset, const uint64_t* missing, bool shared, const CachedTable*& out)
      REQUIRES_SHARED(mu_);
  // map_locked for reads and block status: takes mu_ itself and reads missing
  // L2 tables without holding it.
  int map(uint64_t off, uint64_t len, std::vector<Run>& out, uint64_t max_l2, uint64_t& covered)
      EXCLUDES(mu_);
  int load_table(TableCache& cache, uint64_t offset, CachedTable*& out, bool fresh) REQUIRES(mu_);
  int make_room_locked(TableCache& cache) REQUIRES(mu_);  // evicts (writing back) when full
  int get_l2_locked(uint64_t l1_index, CachedTable*& out) REQUIRES(mu_);  // nullptr if unallocated
  bool host_cluster_valid(uint64_t host) const;
  uint64_t entry_at(const CachedTable& t, uint64_t i) const;
  uint64_t bitmap_at(const CachedTable& t, uint64_t i) const;
  // The one classifier of L2 entries (l2_entry.h) with this image's geometry.
  L2Entry classify(uint64_t entry) const { return classify_l2_entry(entry, l2_format_); }
  void set_entry(CachedTable& t, uint64_t i, uint64_t entry, uint64_t bitmap);
  int read_runs(const std::vector<Run>& runs, uint64_t base, std::span<std::byte> buf);
  // One run of a read into `dst`; `cluster`: scratch for a compressed one.
  int read_run(const Run& r, std::span<std::byte> dst, std::vector<uint8_t>& cluster);
  // Reads [offset, offset + buf.size()) as read() does, except that its data
  // runs are appended to `host` (offsets in data_file_) instead of read.
  int read_deferring_data(uint64_t offset, std::span<std::byte> buf, std::vector<BatchIo>& host);
  int read_backing(uint64_t off, std::span<std::byte> buf);
  // How much of [off, off + length) the backing file holds (the rest of an
  // unallocated range reads as zeros); 0 without one.
  uint64_t backing_part(uint64_t off, uint64_t length) const;
  // The one walk of a guest range, shared by read() and map_host():
  // visit(runs, guest offset, bytes covered) for each batch of runs map()
  // returns.
  template <class Visit>
  int for_each_run(uint64_t offset, uint64_t length, Visit&& visit) EXCLUDES(mu_);
  bool data_cannot_move(const Run& r) const;
  int map_runs(const std::vector<Run>& runs, std::vector<HostPiece>& out);
  int map_backing(uint64_t off, uint64_t length, std::vector<HostPiece>& out);
  int read_compressed(uint64_t entry, std::vector<uint8_t>& cluster);

  // ---- writes (write.cpp; the plans in write_plan.h)
  // Marks a guest cluster in inflight_ for its scope, after waiting for the
  // writer that has it: writes that change one L2 entry are serialized.
  class InflightCluster {
   public:
    InflightCluster(Qcow2Device& device, WriterLock& lk, uint64_t gc) REQUIRES(device.mu_);
    ~InflightCluster();
    InflightCluster(const InflightCluster&) = delete;
    InflightCluster& operator=(const InflightCluster&) = delete;
    // The caller has taken the cluster out of inflight_ itself
    // (unlock_cluster()), before the scope ends.
    void dismiss() { held_ = false; }

   private:
    Qcow2Device& device_;
    uint64_t cluster_;
    bool held_ = true;
  };
  // Zeroing or trimming [from, to) of one guest cluster (relative to it).
  struct ZeroRequest {
    uint64_t guest_cluster = 0, cluster_start = 0;
    uint64_t from = 0, to = 0;
    uint64_t whole_from = 0, whole_to = 0;  // the units (subclusters or cluster) covered whole
    bool backing_visible = false;
    ZeroFlags flags;
    bool is_trim = false;
  };
  bool map_in_place_locked(uint64_t offset, uint64_t end, std::vector<Run>& runs) REQUIRES(mu_);
  bool map_in_place(uint64_t offset, uint64_t end, std::vector<Run>& runs) EXCLUDES(mu_);
  // A write that needs no allocation (map_in_place): marks the bitmaps and
  // appends its data runs to `host` (offsets in data_file_), to be written
  // with the batch; the caller sets data_dirty_ once they are. False: the
  // write must go through write() (it allocates, or the image cannot be
  // written: write() says why).
  bool defer_in_place_write(uint64_t offset, std::span<std::byte> buf, std::vector<BatchIo>& host)
      EXCLUDES(mu_);
  int write_cluster(uint64_t guest, std::span<const std::byte> data) EXCLUDES(mu_);
  int plan_write_locked(uint64_t guest, uint64_t length, WritePlan& plan) REQUIRES(mu_);
  int take_host_cluster_locked(WritePlan& plan) REQUIRES(mu_);
  int write_planned_data(const WritePlan& plan, std::span<const std::byte> data) EXCLUDES(mu_);
  int copy_current(const WritePlan& plan, std::span<std::byte> buf, uint64_t a, uint64_t b)
      EXCLUDES(mu_);
  int commit_write_locked(const WritePlan& plan) REQUIRES(mu_);
  int zero_cluster(uint64_t guest, uint64_t length, ZeroFlags flags, bool is_trim) EXCLUDES(mu_);
  ZeroRequest zero_request(uint64_t guest, uint64_t length, ZeroFlags flags, bool is_trim) const;
  int write_zeros(const ZeroRequest& z, uint64_t from, uint64_t to) EXCLUDES(mu_);
  int zero_cluster_v2(const ZeroRequest& z) EXCLUDES(mu_);
  int zero_whole_units(const ZeroRequest& z) EXCLUDES(mu_);
  int get_l2_for_write_locked(uint64_t l1_index, CachedTable*& out) REQUIRES(mu_);
  uint32_t raw_zero_subclusters(uint64_t entry, uint64_t bitmap) const;
  int write_raw_cluster(uint64_t guest, std::span<const std::byte> data) EXCLUDES(mu_);
  int fill_raw_zero_gaps(uint64_t cstart, uint32_t zeros, uint64_t skip_from, uint64_t skip_to);
  void lock_cluster(WriterLock& lk, uint64_t gc) REQUIRES(mu_);
  void unlock_cluster(uint64_t gc) REQUIRES(mu_);
  // Queues the clusters an L2 entry held.
  int free_entry_locked(uint64_t entry) REQUIRES(mu_);
  // Before the first write: unknown autoclear bits cleared, every enabled
  // bitmap marked IN_USE on disk (bitmaps.cpp).
  int begin_writing_once() EXCLUDES(mu_);

  // ---- persistent dirty bitmaps (bitmaps.cpp; the rules in bitmap.h)
  struct TrackedBitmap {
    BitmapEntry entry;
    std::vector<uint64_t> table;        // raw table entries, as on disk
    std::unique_ptr<DirtyBitmap> bits;  // consistent bitmaps only
    std::string problem;                // why it is not usable; "" when consistent
    bool tracking = false;              // writes mark it (set by begin_writing_once)
  };
  // At open: reads and validates the directory, tables and data of every
  // bitmap; refuses none, marks the unusable ones with their problem.
  void load_bitmaps() REQUIRES(mu_);
  std::string load_bitmap(TrackedBitmap& b) REQUIRES(mu_);
  std::string bitmap_overlap_locked(uint64_t offset, uint64_t bytes) const REQUIRES_SHARED(mu_);
  int set_bitmaps_in_use_locked() REQUIRES(mu_);
  // Marks [offset, offset + length) in every tracking bitmap; lock-free.
  void mark_dirty(uint64_t offset, uint64_t length);
  // At a clean close: tables and data written, synced, then IN_USE cleared.
  int store_bitmaps_locked() REQUIRES(mu_);
  int store_bitmap_data_locked(TrackedBitmap& b, bool& table_changed) REQUIRES(mu_);
  int write_bitmap_table_locked(const TrackedBitmap& b) REQUIRES(mu_);
  int write_bitmap_directory_locked() REQUIRES(mu_);
  int write_bitmaps_extension_locked(uint64_t offset, uint64_t size, uint32_t count) REQUIRES(mu_);
  void free_bitmap_data_locked(const std::vector<uint64_t>& table) REQUIRES(mu_);
  void free_bitmap_clusters_locked(const TrackedBitmap& b) REQUIRES(mu_);
  int alloc_zeroed_clusters_locked(uint64_t bytes, uint64_t& offset) REQUIRES(mu_);
  TrackedBitmap* find_bitmap(const std::string& name);
  TrackedBitmap* bitmap_to_edit_locked(const std::string& name, std::string& error) REQUIRES(mu_);

  // ---- refcounts and metadata writeback (refcount.cpp)
  int get_refcount_locked(uint64_t cluster, uint64_t& rc) REQUIRES(mu_);
  int set_refcount_locked(uint64_t cluster, uint64_t rc) REQUIRES(mu_);
  int alloc_cluster_locked(uint64_t& host, bool& fresh) REQUIRES(mu_);
  int grow_reftable_locked(uint64_t needed_index) REQUIRES(mu_);
  int writeback_locked() REQUIRES(mu_);
  int flush_locked() REQUIRES(mu_);
  int apply_frees_locked() REQUIRES(mu_);
  int write_refblock(CachedTable& t) REQUIRES(mu_);
  int write_l2_table(CachedTable& t) REQUIRES(mu_);
  // One past the last cluster with a refcount other than 0 (at open).
  uint64_t refcounted_end() REQUIRES(mu_);
  // Rebuilds all refcounts from the L1/L2 tables (dirty images).
  void rebuild_refcounts() REQUIRES(mu_);

  // ---- overlap check and corruption (overlap.cpp)
  // Refuses a read-write open when refcount structures lie past EOF.
  void refuse_lost_refcounts() REQUIRES(mu_);
  void build_metadata_map() REQUIRES(mu_);
  void update_metadata_ranges() REQUIRES(mu_);  // after the refcount table moved
  void set_l1_entry_locked(uint64_t index, uint64_t entry) REQUIRES(mu_);
  // Data write fast path: does the host cluster hold metadata?
  bool overlaps_metadata(uint64_t host) const REQUIRES_SHARED(mu_);
  // Each returns 0, or EIO after signal_corruption_locked().
  int check_new_clusters_locked(uint64_t first, uint64_t count, const char* purpose) REQUIRES(mu_);
  int check_metadata_write_locked(uint64_t offset, uint64_t length, uint16_t kind) REQUIRES(mu_);
  int check_data_write_locked(uint64_t host) REQUIRES(mu_);
  int check_free_locked(uint64_t cluster, uint64_t refcount) REQUIRES(mu_);
  int write_metadata_locked(uint64_t offset, const void* data, size_t length, uint16_t kind)
      REQUIRES(mu_);
  // Logs `what` once, sets the corrupt bit (v3), makes the device read-only.
  // Returns EIO.
  int signal_corruption_locked(const std::string& what) REQUIRES(mu_);

  // ---- check (check.cpp)
  // Counts the references of every host cluster of the image file.
  // References lying one cluster or more past EOF are counted; with
  // `report_past_eof` they are also reported as errors (as qemu-img check does).
  void count_references(std::vector<uint64_t>& counts, CheckReport& report,
                        bool include_refcount_structures, bool report_past_eof) REQUIRES(mu_);
  void check_bitmaps_locked(CheckReport& report) REQUIRES(mu_);
  // The refcount of cluster `c` against its references (check()); false when
  // its refcount block cannot be read.
  bool check_refcount(uint64_t c, uint64_t used, CheckReport& report, uint64_t& leaked)
      REQUIRES(mu_);

  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_owned_;
  File* data_file_ = nullptr;  // where guest data lives
  std::shared_ptr<BlockDevice> backing_;
  uint64_t backing_size_ = 0;
  std::string backing_name_, backing_format_, data_file_name_;

  // Set at open. Afterwards only the autoclear, incompatible and refcount
  // table fields change, under mu_ (the fields read without it never do).
  Header header_;
  std::vector<SnapshotInfo> snapshots_;
  uint64_t snapshot_table_bytes_ = 0;
  uint64_t cluster_size_ = 0;
  uint32_t cluster_bits_ = 0;
  uint64_t l2_entries_ = 0;
  uint32_t l2_entry_bytes_ = 8;
  bool extended_l2_ = false;
  bool external_data_file_ = false;  // external data file
  bool data_file_raw_ = false;       // data_file_raw
  L2Format l2_format_;               // the three above, for classify()
  uint64_t size_ = 0;
  std::atomic<bool> read_only_{true};  // read without mu_ by every write
  // The corrupt bit is set, or was found this session.
  bool corrupt_ GUARDED_BY(mu_) = false;
  std::string notes_;

  mutable SharedMutex mu_;
  std::condition_variable_any inflight_changed_;  // inflight_ lost a cluster
  std::unordered_set<uint64_t> inflight_ GUARDED_BY(mu_);

  std::vector<uint64_t> l1_table_ GUARDED_BY(mu_);
  std::set<uint64_t> l1_dirty_ GUARDED_BY(mu_);
  // Bumped whenever an L2 table on disk or an L1 entry changes: a table read
  // without mu_ is only cached if no bump happened since its L1 entry was seen.
  uint64_t l2_epoch_ GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> refcount_table_ GUARDED_BY(mu_);
  std::set<uint64_t> refcount_table_dirty_ GUARDED_BY(mu_);
  uint64_t refcount_table_offset_ GUARDED_BY(mu_) = 0;
  uint64_t refcount_table_clusters_ GUARDED_BY(mu_) = 0;
  uint64_t refblock_entries_ = 0;  // refcounts per refcount block
  uint64_t refcount_max_ = 0;
  bool growing_refcount_table_ GUARDED_BY(mu_) = false;

  MetadataMap metadata_map_ GUARDED_BY(mu_);  // built at a read-write open
  std::unique_ptr<TableCache> l2_cache_ GUARDED_BY(mu_);
  std::unique_ptr<TableCache> refblock_cache_ GUARDED_BY(mu_);

  uint64_t first_unused_cluster_ GUARDED_BY(mu_) = 0;    // first never-used cluster index
  uint64_t free_hint_ GUARDED_BY(mu_) = 0;               // lowest cluster index that may be free
  std::vector<uint64_t> pending_frees_ GUARDED_BY(mu_);  // cluster indices to decrement
  std::atomic<bool> data_dirty_{false};
  std::atomic<bool> writing_begun_{false};

  // Bitmaps: the list is fixed at open (the image tool's verbs change it
  // with mu_ held and nothing else running); each bitmap's bits are atomic.
  std::vector<TrackedBitmap> bitmaps_;
  // Why the directory as a whole cannot be used ("" when it can, or there is
  // none): then no bitmap is tracked and the first write clears the bitmaps
  // autoclear bit, so every reader knows they are stale.
  std::string bitmap_directory_problem_;
  bool bitmaps_usable_ = false;  // the extension is valid and its autoclear bit set
  std::atomic<uint64_t> compressed_reads_{0}, cow_allocations_{0}, writebacks_{0};
};

}  // namespace strata::qcow2
