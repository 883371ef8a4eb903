// BlockDevice: the interface every format driver implements, and the only thing
// the server sees of an export.
//
// A driver stacks on children named by the roles users know from qemu-img:
// `file` (the container it parses), `backing` (qcow2) / `parent` (VHD differencing)
// where unallocated reads fall through, and `data-file` (qcow2 external data).
// Backing files and parents are opened read-only and are never written.
//
// Invariants every driver keeps:
//  - All methods are thread-safe. Reads of allocated data may run in parallel;
//    allocation is serialized per cluster/block, never by one lock held across I/O.
//  - I/O methods return 0 or a positive errno value (EIO, ENOSPC, EINVAL, EPERM,
//    ENOTSUP, ENOMEM, EOVERFLOW). They never throw. Requests are already
//    bounds-checked by the caller (offset + length <= size()).
//  - After flush() returns 0 (or a write with fua=true returns 0), every write
//    acknowledged before it is durable in every file of the stack.
//  - map_host() names host bytes the kernel reads later, when the reply is
//    sent, after any number of other requests ran: a mapped piece must keep
//    holding this guest range's bytes (older or newer, never another range's)
//    for as long as the device is open. A driver maps only what cannot move:
//    raw files, VHD blocks (never freed), read-only qcow2 layers (backing
//    files included) and data_file_raw; a writable qcow2 can free a data
//    cluster and reuse it for another guest offset, so its data clusters are
//    unmappable. Zero runs and read-only layers below are always safe.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/batch_io.h"
#include "formats/extent.h"
#include "formats/host_piece.h"

namespace strata {

// What a child is to the image above it, one name per concept whatever the
// format calls it:
//  - file: the host file the driver parses;
//  - backing: the read-only layer unallocated reads fall through to (the qcow2
//    backing file, the parent of a VHD differencing disk);
//  - data_file: the qcow2 external data file, where guest data lives.
enum class ChildRole { file, backing, data_file };
// The role's name as `info` prints it: "file", "backing", "data-file".
std::string_view to_string(ChildRole role);
// The role as a noun for messages: "file", "backing file", "data file".
std::string_view child_noun(ChildRole role);

struct Capabilities {
  bool read_only = true;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = false;       // trim() does something useful
  bool can_zero = true;        // write_zeroes() supported (may be emulated)
  bool can_fast_zero = false;  // write_zeroes(fast_only) can succeed
  bool can_multi_conn = true;  // consistent across connections (shared state)
  bool can_cache = true;       // cache() supported
  bool has_extents = true;     // extents() says more than "all data"
};

struct BlockSizes {
  uint32_t minimum = 1;
  uint32_t preferred = 4096;
  uint32_t maximum = 32 * 1024 * 1024;
};

struct ZeroFlags {
  bool may_trim = false;   // NBD: no NO_HOLE flag -> may deallocate
  bool fast_only = false;  // NBD FAST_ZERO: fail with ENOTSUP unless cheap
  bool fua = false;
};

class BlockDevice;

// Counters of one metadata cache of a driver (for metrics).
struct CacheCounters {
  std::string_view cache;  // "l2", "refcount", "bitmap"
  uint64_t hits = 0, misses = 0, evictions = 0;
};

// What a layer counts about itself, for metrics; read from any thread.
struct DeviceCounters {
  std::vector<CacheCounters> caches;
  std::string_view allocation_unit;  // "cluster", "block"; empty: does not allocate
  uint64_t allocations = 0;
};

struct Child {
  ChildRole role;
  std::shared_ptr<BlockDevice> device;
  // The format's own word for the child where users read it (`info`, as in
  // qemu-img info: a VHD's backing layer is its "parent"). Empty: the role's.
  std::string_view label = {};
};
// The key `info` shows the child under: its label, else to_string(role).
std::string_view label(const Child& child);

// Result of a structural check (`strata check`).
struct CheckReport {
  std::vector<std::string> errors;  // corruption
  std::vector<std::string> leaks;   // allocated but unreferenced space
  std::vector<std::string> notes;   // informational
  bool clean() const { return errors.empty(); }
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // "raw", "vhd", "qcow2".
  virtual std::string_view format() const = 0;
  // Path of the image file this driver parses.
  virtual const std::string& path() const = 0;
  // Virtual size in bytes.
  virtual uint64_t size() const = 0;
  virtual Capabilities capabilities() const = 0;
  virtual BlockSizes block_sizes() const { return {}; }

  virtual int read(uint64_t offset, std::span<std::byte> buf) = 0;
  virtual int write(uint64_t offset, std::span<const std::byte> buf, bool fua) = 0;
  // Runs the reads and writes (without FUA) of `ops` in any order and
  // possibly at once; each op's result is what read() or write() would
  // return. Ops that overlap have no defined result between them, as NBD
  // leaves overlapping requests in flight. Default: one at a time.
  virtual void run_batch(std::span<BatchIo> ops);
  // Whether run_batch does better than one call per request (cache none
  // submits a batch to the kernel at once, formats/io_ring.h).
  virtual bool runs_batches() const { return false; }
  virtual int write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) = 0;
  // Hint that the range is unused. Must never make a backing/parent show through
  // where the guest wrote data; returning 0 without doing anything is allowed.
  virtual int trim(uint64_t offset, uint64_t length, bool fua) = 0;
  virtual int flush() = 0;
  // Prefetch hint (NBD_CMD_CACHE).
  virtual int cache(uint64_t offset, uint64_t length) {
    (void)offset;
    (void)length;
    return 0;
  }
  // Appends host pieces covering exactly [offset, offset + length) in order
  // (formats/host_piece.h), whose bytes are those read() would read. ENOTSUP:
  // some of the range cannot be mapped (compressed or transformed data,
  // clusters that may move, files without a page-cache descriptor); the
  // caller reads it instead. `out` holds garbage after an error.
  virtual int map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
    (void)offset;
    (void)length;
    (void)out;
    return ENOTSUP;
  }
  // Appends extents covering [offset, offset + length) in order (the last one
  // may be clipped by the caller). Must cover at least one byte on success.
  virtual int extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) = 0;

  // Persistent dirty bitmaps of this layer that can be exported (NBD meta
  // context qemu:dirty-bitmap:NAME): consistent ones only, enabled or not.
  // Only the top layer's count: a backing file's bitmaps describe it, not
  // the export.
  virtual std::vector<std::string> dirty_bitmaps() const { return {}; }
  // Appends runs of bitmap `name` covering [offset, offset + length) in order
  // (at least one byte on success; the caller clips the last). ENOENT: no
  // such exportable bitmap.
  virtual int dirty_extents(std::string_view name, uint64_t offset, uint64_t length,
                            std::vector<DirtyRun>& out) {
    (void)name;
    (void)offset;
    (void)length;
    (void)out;
    return ENOENT;
  }

  virtual std::vector<Child> children() const { return {}; }
  // Format-specific facts for `strata info` (this layer only).
  virtual void describe(nlohmann::json& out) const;
  // Structural check of this layer (`strata check`).
  virtual void check(CheckReport& report) { (void)report; }
  // Counters for logs (cache hits/misses and the like); empty by default.
  virtual std::string stats() const { return {}; }
  // The same counters as numbers (this layer only); none by default.
  virtual DeviceCounters counters() const { return {}; }
};

// Appends `e` to `out`, merging with the last extent when they are of one kind.
void append_extent(std::vector<Extent>& out, const Extent& e);

}  // namespace strata
