#include "tests/support/shell.h"

#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>

namespace strata::test {
namespace {

std::string log_path() { return "/tmp/strata-test-last-" + std::to_string(getpid()) + ".log"; }

// Removes the log when the test binary exits.
struct LogCleanup {
  ~LogCleanup() { std::remove(log_path().c_str()); }
} log_cleanup;

}  // namespace

int sh_status(const std::string& cmd) {
  int st = std::system((cmd + " >" + log_path() + " 2>&1").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void sh(const std::string& cmd) {
  int st = sh_status(cmd);
  INFO(cmd << "\n" << last_log());
  REQUIRE(st == 0);
}

std::string last_log() {
  std::ifstream f(log_path());
  return {std::istreambuf_iterator<char>(f), {}};
}

std::string capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

}  // namespace strata::test
