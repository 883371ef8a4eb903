// A BlockDevice with dirty bitmaps and nothing else, for the tests of what
// the server does with them (exports, block status): it answers extents and
// dirty_extents from tables the test fills, records every call, and fails
// where told.
#pragma once

#include <cerrno>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_device.h"

namespace strata::testing {

class FakeBitmapDevice final : public BlockDevice {
 public:
  struct Call {
    std::string bitmap;  // empty for extents()
    uint64_t offset;
    uint64_t length;
  };

  std::string_view format() const override { return "fake"; }
  const std::string& path() const override { return path_; }
  uint64_t size() const override { return 1 << 20; }
  Capabilities capabilities() const override { return {}; }
  int read(uint64_t, std::span<std::byte>) override { return EIO; }
  int write(uint64_t, std::span<const std::byte>, bool) override { return EIO; }
  int write_zeroes(uint64_t, uint64_t, ZeroFlags) override { return EIO; }
  int trim(uint64_t, uint64_t, bool) override { return EIO; }
  int flush() override { return 0; }

  int extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) override {
    extent_calls.push_back({"", offset, length});
    if (extents_error) return extents_error;
    out.insert(out.end(), extent_table.begin(), extent_table.end());
    return 0;
  }

  std::vector<std::string> dirty_bitmaps() const override { return bitmaps; }

  int dirty_extents(std::string_view name, uint64_t offset, uint64_t length,
                    std::vector<DirtyRun>& out) override {
    dirty_calls.push_back({std::string(name), offset, length});
    auto error = dirty_errors.find(std::string(name));
    if (error != dirty_errors.end()) return error->second;
    auto runs = dirty_table.find(std::string(name));
    if (runs == dirty_table.end()) return ENOENT;
    out.insert(out.end(), runs->second.begin(), runs->second.end());
    return 0;
  }

  std::vector<std::string> bitmaps;
  std::vector<Extent> extent_table;
  std::map<std::string, std::vector<DirtyRun>> dirty_table;
  int extents_error = 0;
  std::map<std::string, int> dirty_errors;
  std::vector<Call> extent_calls;
  std::vector<Call> dirty_calls;

 private:
  std::string path_ = "/images/fake.qcow2";
};

}  // namespace strata::testing
