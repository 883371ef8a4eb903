// The reload plan (server/reload_plan.h): which exports a new config adds,
// removes, changes or leaves alone, and which settings it would need a
// restart for.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "config/config.h"
#include "server/reload_plan.h"

using namespace strata;

namespace {

using Names = std::vector<std::string>;

ExportConfig disk(const std::string& name, const std::string& path) {
  ExportConfig e;
  e.name = name;
  e.path = path;
  return e;
}

Config with_exports(std::vector<ExportConfig> exports) {
  Config c;
  ListenerConfig l;
  l.port = 0;
  c.listeners.push_back(l);
  c.exports = std::move(exports);
  return c;
}

}  // namespace

TEST_CASE("the same config changes nothing") {
  const Config c = with_exports({disk("a", "/i/a.raw"), disk("b", "/i/b.raw")});
  const ReloadPlan p = plan_reload(c, c);
  CHECK(p.added.empty());
  CHECK(p.removed.empty());
  CHECK(p.changed.empty());
  CHECK(p.unchanged == Names{"a", "b"});
  CHECK(p.needs_restart.empty());
  CHECK(summary(p) == "0 added, 0 removed, 0 changed, 2 unchanged");
}

TEST_CASE("exports are matched by name, whatever their order") {
  const Config running = with_exports({disk("a", "/i/a.raw"), disk("b", "/i/b.raw")});
  const Config next = with_exports({disk("c", "/i/c.raw"), disk("b", "/i/b.raw")});
  const ReloadPlan p = plan_reload(running, next);
  CHECK(p.added == Names{"c"});
  CHECK(p.removed == Names{"a"});
  CHECK(p.changed.empty());
  CHECK(p.unchanged == Names{"b"});
}

TEST_CASE("a rename is a removal and an addition") {
  const ReloadPlan p =
      plan_reload(with_exports({disk("a", "/i/a.raw")}), with_exports({disk("z", "/i/a.raw")}));
  CHECK(p.added == Names{"z"});
  CHECK(p.removed == Names{"a"});
}

TEST_CASE("any key of an export entry that differs makes it changed") {
  const Config running = with_exports({disk("a", "/i/a.raw"), disk("b", "/i/b.raw")});
  auto changed_by = [&](auto edit) {
    Config next = running;
    edit(next.exports[0]);
    const ReloadPlan p = plan_reload(running, next);
    CHECK(p.unchanged == Names{"b"});
    return p.changed == Names{"a"} && p.added.empty() && p.removed.empty();
  };
  CHECK(changed_by([](ExportConfig& e) { e.path = "/i/other.raw"; }));
  CHECK(changed_by([](ExportConfig& e) { e.format = Format::qcow2; }));
  CHECK(changed_by([](ExportConfig& e) { e.read_only = true; }));
  CHECK(changed_by([](ExportConfig& e) { e.cache = "none"; }));
  CHECK(changed_by([](ExportConfig& e) { e.description = "new"; }));
  CHECK(changed_by([](ExportConfig& e) { e.allow = {"CN=client"}; }));
  CHECK(changed_by([](ExportConfig& e) { e.tls_required = true; }));
  CHECK(changed_by([](ExportConfig& e) { e.bitmaps = Names{}; }));
  CHECK(changed_by([](ExportConfig& e) { e.cache_size = 1 << 20; }));
}

TEST_CASE("TLS and the log level are applied, the rest needs a restart") {
  const Config running = with_exports({disk("a", "/i/a.raw")});
  auto restart_for = [&](auto edit) {
    Config next = running;
    edit(next);
    return plan_reload(running, next).needs_restart;
  };
  CHECK(restart_for([](Config& c) {
          c.tls.mode = TlsMode::require;
          c.tls.certificates = "/etc/pki/strata-new";
          c.listeners[0].tls = c.tls;
          c.log_level = "debug";
        }).empty());
  CHECK(restart_for([](Config& c) { c.listeners[0].port = 10811; }) == Names{"listeners"});
  CHECK(restart_for([](Config& c) { c.listeners[0].address = "0.0.0.0"; }) == Names{"listeners"});
  CHECK(restart_for([](Config& c) {
          ListenerConfig u;
          u.kind = ListenerConfig::Kind::unix_socket;
          u.path = "/run/s.sock";
          c.listeners.push_back(u);
        }) == Names{"listeners"});
  CHECK(restart_for([](Config& c) { c.limits.workers = 4; }) == Names{"limits"});
  CHECK(restart_for([](Config& c) { c.limits.max_io_threads = 8; }) == Names{"limits"});
  CHECK(restart_for([](Config& c) { c.http.enabled = true; }) == Names{"http"});
  CHECK(restart_for([](Config& c) { c.log_format = "json"; }) == Names{"log_format"});
  CHECK(restart_for([](Config& c) { c.pid_file = "/run/s.pid"; }) == Names{"pid_file"});
}
