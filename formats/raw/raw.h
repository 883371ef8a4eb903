// The raw driver: the guest disk is the file, byte for byte.
#pragma once

#include <memory>

#include "formats/block_device.h"
#include "formats/file.h"

namespace strata {

class RawDevice final : public BlockDevice {
 public:
  explicit RawDevice(std::unique_ptr<File> file);

  std::string_view format() const override { return "raw"; }
  const std::string& path() const override { return file_->path(); }
  uint64_t size() const override { return size_; }
  Capabilities capabilities() const override;

  int read(uint64_t offset, std::span<std::byte> buf) override;
  int map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) override;
  int write(uint64_t offset, std::span<const std::byte> buf, bool fua) override;
  // The guest's offsets are the file's: the batch goes to the file as it is.
  void run_batch(std::span<BatchIo> ops) override { file_->run_batch(ops); }
  bool runs_batches() const override { return file_->runs_batches(); }
  int write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  int trim(uint64_t offset, uint64_t length, bool fua) override;
  int flush() override;
  int cache(uint64_t offset, uint64_t length) override;
  int extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override;

  File& file() { return *file_; }

 private:
  int write_zero_buffer(uint64_t offset, uint64_t length);

  std::unique_ptr<File> file_;
  uint64_t size_;
};

}  // namespace strata
