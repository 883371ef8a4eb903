// ForwardingFile: a File that passes every call to the File it wraps; test
// wrappers (FaultFile, the VHD journal) derive from it and override only what
// they change.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "formats/file.h"

namespace strata::test {

class ForwardingFile : public File {
 public:
  explicit ForwardingFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}

  const std::string& path() const override { return inner_->path(); }
  bool writable() const override { return inner_->writable(); }
  int read_at(uint64_t off, std::span<std::byte> buf) override { return inner_->read_at(off, buf); }
  int write_at(uint64_t off, std::span<const std::byte> buf) override {
    return inner_->write_at(off, buf);
  }
  int sync() override { return inner_->sync(); }
  int punch_hole(uint64_t off, uint64_t len) override { return inner_->punch_hole(off, len); }
  int zero_range(uint64_t off, uint64_t len) override { return inner_->zero_range(off, len); }
  int64_t size() override { return inner_->size(); }
  int truncate(uint64_t size) override { return inner_->truncate(size); }
  int64_t seek_data(uint64_t off) override { return inner_->seek_data(off); }
  int64_t seek_hole(uint64_t off) override { return inner_->seek_hole(off); }
  dev_t device() const override { return inner_->device(); }
  ino_t inode() const override { return inner_->inode(); }
  int lock() override { return inner_->lock(); }

 private:
  std::unique_ptr<File> inner_;
};

}  // namespace strata::test
