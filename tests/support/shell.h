// Shell commands for tests: qemu-img and qemu-io are the independent oracles.
#pragma once

#include <string>

namespace strata::test {

// Runs cmd through the shell with its output kept in a log (last_log());
// returns the exit status, -1 if it did not exit.
int sh_status(const std::string& cmd);
// As sh_status, and fails the test (showing the command and its output) unless
// the command exits 0.
void sh(const std::string& cmd);
// The output of the last sh/sh_status command.
std::string last_log();
// Runs cmd and returns its standard output.
std::string capture(const std::string& cmd);

}  // namespace strata::test
