// ForwardingFileSystem: a FileSystem that passes every call to another one.
// A file system that changes only how files are opened (cache none's direct
// I/O, the tests' fault injection) derives from it and overrides open().
#pragma once

#include <memory>
#include <string>
#include <system_error>

#include "formats/file_system.h"

namespace strata {

class ForwardingFileSystem : public FileSystem {
 public:
  explicit ForwardingFileSystem(std::shared_ptr<FileSystem> inner) : inner_(std::move(inner)) {}

  std::unique_ptr<File> open(const std::string& path, bool writable) override {
    return inner_->open(path, writable);
  }
  std::unique_ptr<File> create(const std::string& path) override { return inner_->create(path); }
  int stat(const std::string& path, FileStat& out) override { return inner_->stat(path, out); }
  std::string absolute(const std::string& path) override { return inner_->absolute(path); }
  std::string canonical(const std::string& path, std::error_code& ec) override {
    return inner_->canonical(path, ec);
  }
  std::string weakly_canonical(const std::string& path, std::error_code& ec) override {
    return inner_->weakly_canonical(path, ec);
  }

 protected:
  FileSystem& inner() const { return *inner_; }

 private:
  std::shared_ptr<FileSystem> inner_;
};

}  // namespace strata
