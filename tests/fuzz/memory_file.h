// MemoryFile: a File whose bytes live in memory, so a fuzz target opens an
// image straight from its input, without a temporary file per input.
//
// Several MemoryFiles may share one Bytes (the image written through a
// read-write open is then reopened read-only). It behaves like a regular file
// without holes: reads past the end give zeros, writes extend it, punch_hole
// and zero_range write zeros. Growth is capped (kMaxSize): a hostile image
// that asks for a cluster at 1 TiB gets ENOSPC, like a full file system,
// instead of exhausting the fuzzer's memory.
#pragma once

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "formats/file.h"

namespace strata::fuzz {

using Bytes = std::vector<std::byte>;

class MemoryFile final : public File {
 public:
  static constexpr uint64_t kMaxSize = 64ull << 20;

  MemoryFile(std::string path, std::shared_ptr<Bytes> bytes, bool writable, ino_t inode)
      : path_(std::move(path)), bytes_(std::move(bytes)), writable_(writable), inode_(inode) {}

  const std::string& path() const override { return path_; }
  bool writable() const override { return writable_; }

  int read_at(uint64_t offset, std::span<std::byte> buf) override {
    const Bytes& b = *bytes_;
    size_t have = offset < b.size() ? std::min<uint64_t>(buf.size(), b.size() - offset) : 0;
    if (have) std::memcpy(buf.data(), b.data() + offset, have);
    if (buf.size() > have) std::memset(buf.data() + have, 0, buf.size() - have);
    return 0;
  }

  int write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (!writable_) return EPERM;
    if (int e = reserve(offset, buf.size())) return e;
    if (!buf.empty()) std::memcpy(bytes_->data() + offset, buf.data(), buf.size());
    return 0;
  }

  int sync() override { return 0; }

  int punch_hole(uint64_t offset, uint64_t length) override {  // keeps the size
    if (!writable_) return EPERM;
    Bytes& b = *bytes_;
    if (offset >= b.size()) return 0;
    uint64_t n = std::min<uint64_t>(length, b.size() - offset);
    if (n) std::memset(b.data() + offset, 0, n);
    return 0;
  }

  int zero_range(uint64_t offset, uint64_t length) override {  // may grow the file
    if (!writable_) return EPERM;
    if (int e = reserve(offset, length)) return e;
    if (length) std::memset(bytes_->data() + offset, 0, length);
    return 0;
  }

  int64_t size() override { return static_cast<int64_t>(bytes_->size()); }

  int truncate(uint64_t size) override {
    if (!writable_) return EPERM;
    if (size > kMaxSize) return EFBIG;
    bytes_->resize(size);
    return 0;
  }

  // No holes: all of the file is data.
  int64_t seek_data(uint64_t offset) override {
    return offset < bytes_->size() ? static_cast<int64_t>(offset) : -ENXIO;
  }
  int64_t seek_hole(uint64_t offset) override {
    return offset < bytes_->size() ? static_cast<int64_t>(bytes_->size()) : -ENXIO;
  }

  dev_t device() const override { return 0; }
  ino_t inode() const override { return inode_; }

 private:
  // Grows the file to cover [offset, offset + length).
  int reserve(uint64_t offset, uint64_t length) {
    if (offset > kMaxSize || length > kMaxSize - offset) return ENOSPC;
    if (offset + length > bytes_->size()) bytes_->resize(offset + length);
    return 0;
  }

  std::string path_;
  std::shared_ptr<Bytes> bytes_;
  bool writable_;
  ino_t inode_;
};

}  // namespace strata::fuzz
