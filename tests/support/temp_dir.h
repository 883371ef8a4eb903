// Temporary directories and working directories for tests.
#pragma once

#include <filesystem>
#include <string>

namespace strata::test {

// A fresh directory under /tmp, removed with everything in it at scope exit.
// The prefix names the test area, so a leftover says whose it is.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "strata");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string path;
  std::string operator/(const std::string& name) const { return path + "/" + name; }
  std::filesystem::path root() const { return path; }
};

// Runs the enclosing scope in another working directory (QEMU resolves
// relative data-file names against its working directory).
class Chdir {
 public:
  explicit Chdir(const std::string& dir);
  ~Chdir();
  Chdir(const Chdir&) = delete;
  Chdir& operator=(const Chdir&) = delete;

 private:
  std::filesystem::path old_;
};

}  // namespace strata::test
