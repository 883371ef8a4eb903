// What a configuration reload changes, as a pure function of the running
// configuration and the new one (Server::reload applies it).
//
// Exports are matched by name. An export whose entry is equal in every key
// is unchanged: its clients, open image and caches are left alone. One that
// differs in any key (path, format, read_only, cache, allow, description...)
// is changed: it is replaced as a removal followed by an addition. Names only
// in the new config are added, names only in the running one removed.
//
// Some settings are fixed for the life of the process: the listeners' sockets
// (kind, address, port, path; their TLS is re-read), the limits, the HTTP
// endpoint, the log format and the pid file. A new config that changes one of
// them is refused whole, naming them.
#pragma once

#include <string>
#include <vector>

#include "config/config.h"

namespace strata {

struct ReloadPlan {
  // Export names; added and changed in the new config's order, removed and
  // unchanged in the running one's.
  std::vector<std::string> added, removed, changed, unchanged;
  // The settings that differ and only a restart applies, e.g. "limits".
  std::vector<std::string> needs_restart;
};

// `running`: the export entries being served; `next`: the new config.
ReloadPlan plan_reload(const Config& running, const Config& next);

// "2 added, 1 removed, 0 changed, 3 unchanged".
std::string summary(const ReloadPlan& plan);

}  // namespace strata
