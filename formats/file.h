// File: the one narrow door between the drivers and the host file system.
//
// Every driver does its I/O through a File so that tests can wrap one
// (FaultFile in tests/support/) to inject errors, short writes or crashes.
// Methods return 0 or a positive errno value and never throw. Files are opened
// through a FileSystem (formats/file_system.h), whose open() throws ImageError
// with the path and the reason.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "formats/batch_io.h"
#include "formats/host_piece.h"

namespace strata {

class File {
 public:
  virtual ~File() = default;

  virtual const std::string& path() const = 0;
  virtual bool writable() const = 0;

  // Reads exactly buf.size() bytes at offset; bytes past end of file read as
  // zeros (image tables are not always padded to a full cluster on disk).
  virtual int read_at(uint64_t offset, std::span<std::byte> buf) = 0;
  // Writes exactly buf.size() bytes at offset, extending the file if needed.
  virtual int write_at(uint64_t offset, std::span<const std::byte> buf) = 0;
  // Runs every read and write of `ops`, in any order and possibly at once
  // (ops that overlap have no defined result between them, as NBD leaves
  // overlapping requests in flight); each op's result is what read_at or
  // write_at would return. Default: one at a time.
  virtual void run_batch(std::span<BatchIo> ops);
  // Whether run_batch does better than one call per op.
  virtual bool runs_batches() const { return false; }
  // Makes written data durable (fdatasync).
  virtual int sync() = 0;
  // Deallocates the range; it reads as zeros afterwards. ENOTSUP if the file
  // system cannot.
  virtual int punch_hole(uint64_t offset, uint64_t length) = 0;
  // Makes the range read as zeros, preferably without writing data
  // (FALLOC_FL_ZERO_RANGE). ENOTSUP if the file system cannot.
  virtual int zero_range(uint64_t offset, uint64_t length) = 0;
  // Current size in bytes (fstat); negative errno on failure.
  virtual int64_t size() = 0;
  virtual int truncate(uint64_t size) = 0;
  // SEEK_DATA / SEEK_HOLE. Return the offset, or a negative errno
  // (-ENXIO past the last data, -ENOTSUP where unsupported).
  virtual int64_t seek_data(uint64_t offset) = 0;
  virtual int64_t seek_hole(uint64_t offset) = 0;
  // Device and inode, to detect loops in backing chains.
  virtual dev_t device() const = 0;
  virtual ino_t inode() const = 0;
  // Takes an advisory lock (flock) for the rest of this File's life without
  // waiting: exclusive when writable, shared otherwise. EWOULDBLOCK when
  // another open of the file holds a conflicting lock.
  virtual int lock() { return 0; }
  // The descriptor whose page cache holds exactly what read_at() reads, for
  // replies sent from it (formats/host_piece.h); -1 when there is none: a
  // file that transforms or injects (test wrappers) or bypasses the page
  // cache (O_DIRECT, cache mode none).
  virtual int fd() const { return -1; }
};

// Maps [offset, offset + length) of `file` to pieces of its descriptor; what
// lies past end of file maps to zeros, as read_at() reads it. ENOTSUP when
// the file has no descriptor to send from.
int map_file(File& file, uint64_t offset, uint64_t length, std::vector<HostPiece>& out);

// Locks an image file for an export (File::lock): a file written through one
// open is then never opened by another export or Strata process, and a file
// read as a parent or backing layer is never written by one. Throws
// ImageError naming the path on a conflict; where the file system has no
// locks, goes on without.
void lock_image(File& file);

// Helpers over File for exact-size big-endian structures.
inline int read_bytes(File& f, uint64_t offset, void* buf, size_t len) {
  return f.read_at(offset, {static_cast<std::byte*>(buf), len});
}
inline int write_bytes(File& f, uint64_t offset, const void* buf, size_t len) {
  return f.write_at(offset, {static_cast<const std::byte*>(buf), len});
}

}  // namespace strata
