// FaultFile: wraps a File and injects errors, for driver tests.
#pragma once

#include <atomic>
#include <memory>

#include "formats/file.h"

namespace strata::test {

class FaultFile final : public File {
 public:
  explicit FaultFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}

  // Errors to inject (0 = none). Reads fail only when they touch
  // [read_fail_from, read_fail_to).
  int read_error = 0;
  uint64_t read_fail_from = 0, read_fail_to = UINT64_MAX;
  int write_error = 0;
  int sync_error = 0;
  int punch_error = 0;
  std::atomic<int> syncs{0};

  const std::string& path() const override { return inner_->path(); }
  bool writable() const override { return inner_->writable(); }
  int read_at(uint64_t off, std::span<std::byte> buf) override {
    if (read_error && off < read_fail_to && off + buf.size() > read_fail_from) return read_error;
    return inner_->read_at(off, buf);
  }
  int write_at(uint64_t off, std::span<const std::byte> buf) override {
    return write_error ? write_error : inner_->write_at(off, buf);
  }
  int sync() override {
    ++syncs;
    return sync_error ? sync_error : inner_->sync();
  }
  int punch_hole(uint64_t off, uint64_t len) override {
    return punch_error ? punch_error : inner_->punch_hole(off, len);
  }
  int zero_range(uint64_t off, uint64_t len) override {
    return punch_error ? punch_error : inner_->zero_range(off, len);
  }
  int64_t size() override { return inner_->size(); }
  int truncate(uint64_t size) override { return inner_->truncate(size); }
  int64_t seek_data(uint64_t off) override { return inner_->seek_data(off); }
  int64_t seek_hole(uint64_t off) override { return inner_->seek_hole(off); }
  dev_t device() const override { return inner_->device(); }
  ino_t inode() const override { return inner_->inode(); }

 private:
  std::unique_ptr<File> inner_;
};

}  // namespace strata::test
