#include "server/reload_plan.h"

#include <algorithm>

namespace strata {

namespace {

const ExportConfig* find_export(const std::vector<ExportConfig>& exports, const std::string& name) {
  auto it = std::find_if(exports.begin(), exports.end(),
                         [&](const ExportConfig& e) { return e.name == name; });
  return it == exports.end() ? nullptr : &*it;
}

// The socket a listener binds, its TLS left out: TLS is re-read on reload.
bool same_socket(const ListenerConfig& a, const ListenerConfig& b) {
  if (a.kind != b.kind) return false;
  if (a.kind == ListenerConfig::Kind::unix_socket) return a.path == b.path;
  return a.address == b.address && a.port == b.port;
}

bool same_sockets(const std::vector<ListenerConfig>& a, const std::vector<ListenerConfig>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), same_socket);
}

}  // namespace

ReloadPlan plan_reload(const Config& running, const Config& next) {
  ReloadPlan plan;
  for (const ExportConfig& old : running.exports) {
    const ExportConfig* now = find_export(next.exports, old.name);
    if (!now) {
      plan.removed.push_back(old.name);
    } else if (*now == old) {
      plan.unchanged.push_back(old.name);
    }
  }
  for (const ExportConfig& now : next.exports) {
    const ExportConfig* old = find_export(running.exports, now.name);
    if (!old) {
      plan.added.push_back(now.name);
    } else if (!(*old == now)) {
      plan.changed.push_back(now.name);
    }
  }
  if (!same_sockets(running.listeners, next.listeners))
    plan.needs_restart.emplace_back("listeners");
  if (!(running.limits == next.limits)) plan.needs_restart.emplace_back("limits");
  if (!(running.http == next.http)) plan.needs_restart.emplace_back("http");
  if (running.log_format != next.log_format) plan.needs_restart.emplace_back("log_format");
  if (running.pid_file != next.pid_file) plan.needs_restart.emplace_back("pid_file");
  return plan;
}

std::string summary(const ReloadPlan& plan) {
  return std::to_string(plan.added.size()) + " added, " + std::to_string(plan.removed.size()) +
         " removed, " + std::to_string(plan.changed.size()) + " changed, " +
         std::to_string(plan.unchanged.size()) + " unchanged";
}

}  // namespace strata
