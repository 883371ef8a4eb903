#include "tests/support/fault_file_system.h"

#include <cstring>
#include <filesystem>

#include "formats/errors.h"

namespace strata::test {

bool FaultFileSystem::matches(const std::string& path, const std::string& name) const {
  if (path == name) return true;
  if (std::filesystem::path(path).filename() == name) return true;
  std::error_code ec;
  return inner().canonical(path, ec) == name && !ec;
}

void FaultFileSystem::fail_open(const std::string& name, int error) {
  std::lock_guard lk(mu_);
  fail_[name] = error;
}

std::vector<std::string> FaultFileSystem::opened() const {
  std::lock_guard lk(mu_);
  return opened_;
}

FaultFile* FaultFileSystem::file(const std::string& name) const {
  std::lock_guard lk(mu_);
  for (const auto& [path, f] : files_) {
    if (matches(path, name)) return f;
  }
  return nullptr;
}

std::unique_ptr<File> FaultFileSystem::open(const std::string& path, bool writable) {
  {
    std::lock_guard lk(mu_);
    opened_.push_back(path);
    for (const auto& [name, error] : fail_) {
      // Same words as the host file system, so messages look the same.
      if (matches(path, name)) {
        throw_image_error(path, std::string("cannot open") + (writable ? " read-write" : "") +
                                    ": " + std::strerror(error));
      }
    }
  }
  auto f = std::make_unique<FaultFile>(inner().open(path, writable));
  std::lock_guard lk(mu_);
  files_[path] = f.get();
  return f;
}

}  // namespace strata::test
