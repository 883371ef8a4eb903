// FileSystem: the seam through which the stack builder and the drivers reach
// the host file system at open time: opening and creating files, stat, and
// turning names into absolute and canonical paths.
//
// Invariants:
//  - Everything in formats/ that opens an image or one of its children
//    (backing file, VHD parent, qcow2 data file) does it through the
//    FileSystem in OpenOptions (ChainContext::files()), never through a free
//    function, so that a test FileSystem sees and can fail every open of a
//    chain, not only the I/O on files already open.
//  - The seam is used at open time only. The request path does its I/O on the
//    File objects it returned, which are unchanged, so it costs nothing there.
//  - open() and create() throw ImageError naming the path and the reason; the
//    other methods never throw and report errors as values, the way the
//    std::filesystem calls they replace do.
//  - A FileSystem outlives every File it opened only as far as the caller
//    needs: Files own their descriptors and do not refer back to it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <system_error>

#include "formats/file.h"

namespace strata {

// What the drivers need to know of a file they have not opened: the VHD parent
// time stamp (mtime), and identity and size for tests.
struct FileStat {
  dev_t device = 0;
  ino_t inode = 0;
  uint64_t size = 0;
  int64_t mtime = 0;  // seconds since the Unix epoch
};

class FileSystem {
 public:
  virtual ~FileSystem() = default;

  // Opens an existing regular file or block device. Throws ImageError naming
  // the path when it cannot.
  virtual std::unique_ptr<File> open(const std::string& path, bool writable) = 0;
  // Creates (or truncates) a file for a new image and opens it read-write.
  // Throws ImageError naming the path when it cannot.
  virtual std::unique_ptr<File> create(const std::string& path) = 0;
  // stat(2) of a path: 0, or a positive errno value.
  virtual int stat(const std::string& path, FileStat& out) = 0;
  // The path made absolute against the working directory, lexically: links
  // are not followed (std::filesystem::absolute).
  virtual std::string absolute(const std::string& path) = 0;
  // The absolute path with every link, "." and ".." resolved; every component
  // must exist, else ec is set (std::filesystem::canonical).
  virtual std::string canonical(const std::string& path, std::error_code& ec) = 0;
  // As canonical(), but a missing tail is kept as it is written
  // (std::filesystem::weakly_canonical).
  virtual std::string weakly_canonical(const std::string& path, std::error_code& ec) = 0;
};

// The host file system: POSIX open/fstat/flock and std::filesystem. One
// process-wide instance without state, the default of OpenOptions.
std::shared_ptr<FileSystem> host_file_system();

// The descriptor of a File opened by host_file_system(); -1 for any other
// File. For reopening the same file with other flags (direct_file.h).
int host_descriptor(File& file);

// Creates a file for a new image on the host file system (image creation,
// `strata create`, is not part of opening a chain and has no OpenOptions).
std::unique_ptr<File> create_file(const std::string& path);

}  // namespace strata
