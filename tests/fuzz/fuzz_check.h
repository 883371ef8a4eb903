// What every fuzz target shares: an invariant check that stops the fuzzer
// (libFuzzer saves the input as a crash), quiet logs, temporary directories.
//
// Invariants are not assert(): they stay on in every build, print what broke
// and trap, so a violated promise is reported like a crash, with the input.
#pragma once

#include <spdlog/spdlog.h>
#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace strata::fuzz {

[[noreturn]] inline void invariant_failed(const char* file, int line, const char* what) {
  std::fprintf(stderr, "\n==== invariant violated at %s:%d: %s\n", file, line, what);
  std::fflush(stderr);
  __builtin_trap();
}

// Drivers log every refusal; at thousands of inputs a second that is noise and
// time. STRATA_FUZZ_LOG=debug (or info, warn...) turns logs back on to study one input.
inline void quiet_logs() {
  const char* level = std::getenv("STRATA_FUZZ_LOG");
  spdlog::set_level(level ? spdlog::level::from_str(level) : spdlog::level::off);
}

}  // namespace strata::fuzz

// For harness code that loops over data (shadow comparisons, pattern fills):
// left out of the coverage instrumentation, so the fuzzer spends no time in
// it and does not take its branches for progress in the code under test.
#define FUZZ_NO_COVERAGE __attribute__((no_sanitize("coverage")))

#define FUZZ_CHECK(cond, what)                                                 \
  do {                                                                         \
    if (!(cond)) ::strata::fuzz::invariant_failed(__FILE__, __LINE__, (what)); \
  } while (0)

namespace strata::fuzz {

// A new directory under $TMPDIR (else /tmp). A run that crashes leaves it
// behind; .ci/fuzz points TMPDIR into its scratch directory for that reason.
inline std::string make_temp_dir(const char* name) {
  const char* base = std::getenv("TMPDIR");
  std::string t = std::string(base && *base ? base : "/tmp") + "/strata-fuzz-" + name + "-XXXXXX";
  std::vector<char> buf(t.begin(), t.end());
  buf.push_back('\0');
  FUZZ_CHECK(::mkdtemp(buf.data()) != nullptr, "cannot create a temporary directory");
  return buf.data();
}

}  // namespace strata::fuzz
