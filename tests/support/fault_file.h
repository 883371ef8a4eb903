// FaultFile: wraps a File and injects errors, for driver tests.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "tests/support/forwarding_file.h"

namespace strata::test {

class FaultFile final : public ForwardingFile {
 public:
  explicit FaultFile(std::unique_ptr<File> inner) : ForwardingFile(std::move(inner)) {}

  // Errors to inject (0 = none). Reads fail only when they touch
  // [read_fail_from, read_fail_to).
  int read_error = 0;
  uint64_t read_fail_from = 0, read_fail_to = UINT64_MAX;
  int write_error = 0;
  // With write_error: the first `writes_before_error` writes still succeed.
  std::atomic<int> writes_before_error{0};
  int sync_error = 0;
  int punch_error = 0;
  std::atomic<int> syncs{0};

  int read_at(uint64_t off, std::span<std::byte> buf) override {
    if (read_error && off < read_fail_to && off + buf.size() > read_fail_from) return read_error;
    return ForwardingFile::read_at(off, buf);
  }
  int write_at(uint64_t off, std::span<const std::byte> buf) override {
    if (write_error && writes_before_error-- <= 0) return write_error;
    return ForwardingFile::write_at(off, buf);
  }
  int sync() override {
    ++syncs;
    return sync_error ? sync_error : ForwardingFile::sync();
  }
  int punch_hole(uint64_t off, uint64_t len) override {
    return punch_error ? punch_error : ForwardingFile::punch_hole(off, len);
  }
  int zero_range(uint64_t off, uint64_t len) override {
    return punch_error ? punch_error : ForwardingFile::zero_range(off, len);
  }
};

}  // namespace strata::test
