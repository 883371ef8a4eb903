// FaultFileSystem: the host file system with faults at open time. It fails
// the open of chosen files with an errno (the way the host one fails: an
// ImageError naming the path) and wraps every file it does open in a
// FaultFile, which a test can reach to inject I/O errors afterwards.
//
// Install it with OpenOptions::file_system; every open of a chain (top image,
// backing file, VHD parent, qcow2 data file) then goes through it.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "formats/forwarding_file_system.h"
#include "tests/support/fault_file.h"

namespace strata::test {

class FaultFileSystem final : public ForwardingFileSystem {
 public:
  explicit FaultFileSystem(std::shared_ptr<FileSystem> inner = host_file_system())
      : ForwardingFileSystem(std::move(inner)) {}

  // Opens of a file whose canonical path or file name is `name` fail with
  // errno `error` (EACCES, EIO, ...) from now on.
  void fail_open(const std::string& name, int error);
  // Every path opened so far, in order.
  std::vector<std::string> opened() const;
  // The FaultFile of the last open of a file with this path or file name, or
  // nullptr. It lives as long as the device that opened it.
  FaultFile* file(const std::string& name) const;

  std::unique_ptr<File> open(const std::string& path, bool writable) override;

 private:
  bool matches(const std::string& path, const std::string& name) const;

  mutable std::mutex mu_;
  std::map<std::string, int> fail_;  // name -> errno
  std::vector<std::string> opened_;
  // Not owned: the devices own their files. Entries are only read while the
  // device is alive (see file()).
  std::map<std::string, FaultFile*> files_;
};

}  // namespace strata::test
