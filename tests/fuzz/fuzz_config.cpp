// fuzz_config: the config loader (config/config.*) from JSON text.
//
// Invariants beyond "no crash":
//  - the loader only ever throws ConfigError (its documented contract: every
//    refusal names a key);
//  - an accepted config satisfies validate() and gives open options without
//    throwing;
//  - an accepted config, written back as JSON by this harness and loaded
//    again, gives the same config (what the loader accepts, it understands
//    the same way every time; no field is lost or altered on the way).
#include <cstddef>
#include <cstdint>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>

#include "config/config.h"
#include "tests/fuzz/fuzz_check.h"

namespace strata::fuzz {
namespace {

using nlohmann::json;

json to_json(const ListenerConfig& l) {
  if (l.kind == ListenerConfig::Kind::unix_socket) return {{"type", "unix"}, {"path", l.path}};
  return {{"type", "tcp"}, {"address", l.address}, {"port", l.port}};
}

json to_json(const ExportConfig& e) {
  json j = {{"name", e.name},
            {"path", e.path},
            {"description", e.description},
            {"format", std::string(to_string(e.format))},
            {"read_only", e.read_only},
            {"allowed_dirs", e.allowed_dirs},
            {"cache_size", e.cache_size},
            {"allow_raw_backing", e.allow_raw_backing},
            {"vhd_strict_parent_timestamp", e.vhd_strict_parent_timestamp},
            {"vhd_size_mode", e.vhd_size_mode},
            {"max_chain_depth", e.max_chain_depth}};
  if (e.data_file) j["data_file"] = *e.data_file;
  if (e.vhd_size) j["vhd_size"] = *e.vhd_size;
  return j;
}

json to_json(const Config& c) {
  json j;
  j["listeners"] = json::array();
  for (const auto& l : c.listeners) j["listeners"].push_back(to_json(l));
  j["exports"] = json::array();
  for (const auto& e : c.exports) j["exports"].push_back(to_json(e));
  j["limits"] = {{"max_connections", c.limits.max_connections},
                 {"handshake_timeout_ms", c.limits.handshake_timeout_ms},
                 {"max_inflight_bytes", c.limits.max_inflight_bytes},
                 {"workers", c.limits.workers}};
  j["log_level"] = c.log_level;
  return j;
}

bool same(const ListenerConfig& a, const ListenerConfig& b) {
  if (a.kind != b.kind) return false;
  if (a.kind == ListenerConfig::Kind::unix_socket) return a.path == b.path;
  return a.address == b.address && a.port == b.port;
}

bool same(const ExportConfig& a, const ExportConfig& b) {
  return a.name == b.name && a.path == b.path && a.description == b.description &&
         a.format == b.format && a.read_only == b.read_only && a.allowed_dirs == b.allowed_dirs &&
         a.cache_size == b.cache_size && a.data_file == b.data_file &&
         a.allow_raw_backing == b.allow_raw_backing &&
         a.vhd_strict_parent_timestamp == b.vhd_strict_parent_timestamp &&
         a.vhd_size_mode == b.vhd_size_mode && a.vhd_size == b.vhd_size &&
         a.max_chain_depth == b.max_chain_depth;
}

bool same(const Config& a, const Config& b) {
  if (a.listeners.size() != b.listeners.size() || a.exports.size() != b.exports.size()) {
    return false;
  }
  for (size_t i = 0; i < a.listeners.size(); ++i) {
    if (!same(a.listeners[i], b.listeners[i])) return false;
  }
  for (size_t i = 0; i < a.exports.size(); ++i) {
    if (!same(a.exports[i], b.exports[i])) return false;
  }
  return a.limits.max_connections == b.limits.max_connections &&
         a.limits.handshake_timeout_ms == b.limits.handshake_timeout_ms &&
         a.limits.max_inflight_bytes == b.limits.max_inflight_bytes &&
         a.limits.workers == b.limits.workers && a.log_level == b.log_level;
}

// Loads `text`; false when the loader refused it with a ConfigError.
bool load(const std::string& text, Config& out) {
  try {
    out = parse_config_text(text);
    return true;
  } catch (const ConfigError&) {
    return false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "exception other than ConfigError: %s\n", e.what());
    FUZZ_CHECK(false, "the config loader threw something other than ConfigError");
  }
}

void check_accepted(const Config& c) {
  FUZZ_CHECK(!c.listeners.empty() && !c.exports.empty(), "accepted without listener or export");
  try {
    validate(c);
    for (const auto& e : c.exports) (void)e.open_options();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    FUZZ_CHECK(false, "an accepted config fails validate() or open_options()");
  }
  Config again;
  FUZZ_CHECK(load(to_json(c).dump(), again), "an accepted config, written back, is refused");
  FUZZ_CHECK(same(c, again), "an accepted config, written back and loaded, differs");
}

}  // namespace
}  // namespace strata::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  strata::fuzz::quiet_logs();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  strata::Config c;
  if (strata::fuzz::load(text, c)) strata::fuzz::check_accepted(c);
  return 0;
}
