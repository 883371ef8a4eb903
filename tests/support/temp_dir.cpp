#include "tests/support/temp_dir.h"

#include <doctest/doctest.h>
#include <unistd.h>

#include <system_error>
#include <vector>

namespace strata::test {

TempDir::TempDir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  REQUIRE(::mkdtemp(buf.data()) != nullptr);
  path = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

Chdir::Chdir(const std::string& dir) : old_(std::filesystem::current_path()) {
  std::filesystem::current_path(dir);
}

Chdir::~Chdir() {
  std::error_code ec;
  std::filesystem::current_path(old_, ec);
}

}  // namespace strata::test
