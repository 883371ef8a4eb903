// The outcome of a configuration reload (Server::reload), as the HTTP
// endpoint and the log report it: applied, or refused with the reason while
// the running configuration stays.
#pragma once

#include <string>

namespace strata {

struct ReloadResult {
  bool applied = false;
  std::string message;
};

}  // namespace strata
