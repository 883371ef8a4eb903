#include "config/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "formats/create.h"
#include "formats/direct_file.h"

namespace strata {

using nlohmann::json;

namespace {

[[noreturn]] void fail(const std::string& key, const std::string& what) {
  throw ConfigError(key + ": " + what);
}

std::string type_name(const json& v) { return v.type_name(); }

void check_keys(const json& obj, const std::string& where, const std::set<std::string>& allowed) {
  if (!obj.is_object()) fail(where, "must be an object, not " + type_name(obj));
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    if (!allowed.count(it.key())) {
      fail(where.empty() ? it.key() : where + "." + it.key(), "unknown key");
    }
  }
}

std::string get_string(const json& obj, const std::string& where, const std::string& key,
                       const std::string& def, bool required = false) {
  const std::string name = where.empty() ? key : where + "." + key;  // top-level keys bare
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (required) fail(name, "is required");
    return def;
  }
  if (!it->is_string()) fail(name, "must be a string, not " + type_name(*it));
  return it->get<std::string>();
}

bool get_bool(const json& obj, const std::string& where, const std::string& key, bool def) {
  auto it = obj.find(key);
  if (it == obj.end()) return def;
  if (!it->is_boolean()) fail(where + "." + key, "must be true or false, not " + type_name(*it));
  return it->get<bool>();
}

uint64_t get_uint(const json& obj, const std::string& where, const std::string& key, uint64_t def,
                  uint64_t min, uint64_t max) {
  auto it = obj.find(key);
  if (it == obj.end()) return def;
  uint64_t v;
  if (it->is_number_unsigned()) {
    v = it->get<uint64_t>();
  } else if (it->is_number_integer()) {
    fail(where + "." + key, "must not be negative");
  } else if (it->is_string()) {  // sizes like "64M"
    try {
      v = parse_size(it->get<std::string>());
    } catch (const std::exception& e) {
      fail(where + "." + key, e.what());
    }
  } else {
    fail(where + "." + key, "must be a number, not " + type_name(*it));
  }
  if (v < min || v > max) {
    fail(where + "." + key,
         std::to_string(v) + " is outside " + std::to_string(min) + ".." + std::to_string(max));
  }
  return v;
}

TlsConfig parse_tls(const json& j, const std::string& where) {
  check_keys(j, where, {"mode", "certificates", "psk_file", "verify_peer", "priority"});
  TlsConfig t;
  const std::string mode = get_string(j, where, "mode", "off");
  auto m = parse_tls_mode(mode);
  if (!m) fail(where + ".mode", "'" + mode + "' is not one of off, on, require");
  t.mode = *m;
  t.certificates = get_string(j, where, "certificates", "");
  t.psk_file = get_string(j, where, "psk_file", "");
  t.verify_peer = get_bool(j, where, "verify_peer", false);
  t.priority = get_string(j, where, "priority", "");
  return t;
}

std::vector<std::string> get_string_list(const json& obj, const std::string& where,
                                         const std::string& key) {
  std::vector<std::string> out;
  auto it = obj.find(key);
  if (it == obj.end()) return out;
  if (!it->is_array()) fail(where + "." + key, "must be an array of strings");
  for (size_t i = 0; i < it->size(); ++i) {
    const auto& v = (*it)[i];
    const std::string k = where + "." + key + "[" + std::to_string(i) + "]";
    if (!v.is_string() || v.get<std::string>().empty()) fail(k, "must be a non-empty string");
    out.push_back(v.get<std::string>());
  }
  return out;
}

ListenerConfig parse_listener(const json& j, const std::string& where, const TlsConfig& tls) {
  check_keys(j, where, {"type", "address", "port", "path", "mode", "group", "tls"});
  ListenerConfig l;
  l.own_tls = j.contains("tls");
  l.tls = l.own_tls ? parse_tls(j["tls"], where + ".tls") : tls;
  std::string type = get_string(j, where, "type", "tcp");
  if (type == "tcp") {
    l.kind = ListenerConfig::Kind::tcp;
    l.address = get_string(j, where, "address", kDefaultListenAddress);
    l.port = static_cast<uint16_t>(get_uint(j, where, "port", 10809, 0, 65535));
    for (const char* key : {"path", "mode", "group"}) {
      if (j.contains(key)) fail(where + "." + key, "only for unix listeners");
    }
  } else if (type == "unix") {
    l.kind = ListenerConfig::Kind::unix_socket;
    l.path = get_string(j, where, "path", "", true);
    if (l.path.empty()) fail(where + ".path", "must not be empty");
    if (l.path.size() >= 108) fail(where + ".path", "longer than a unix socket path may be");
    if (j.contains("port") || j.contains("address")) {
      fail(where, "address/port are only for tcp listeners");
    }
    if (j.contains("mode")) {
      if (!j["mode"].is_string()) {
        fail(where + ".mode",
             "must be a string of octal digits such as \"0660\", not " + type_name(j["mode"]));
      }
      l.mode = parse_socket_mode(j["mode"].get<std::string>(), where + ".mode");
    }
    if (j.contains("group")) {
      l.group = get_string(j, where, "group", "");
      check_socket_group(l.group, where + ".group");
    }
  } else {
    fail(where + ".type", "'" + type + "' is not one of tcp, unix");
  }
  return l;
}

HttpConfig parse_http(const json& j) {
  check_keys(j, "http", {"address", "port"});
  HttpConfig h;
  h.enabled = true;
  h.address = get_string(j, "http", "address", kDefaultListenAddress);
  if (h.address.empty()) fail("http.address", "must not be empty");
  h.port = static_cast<uint16_t>(get_uint(j, "http", "port", kDefaultHttpPort, 0, 65535));
  return h;
}

ExportConfig parse_export(const json& j, const std::string& where) {
  check_keys(j, where,
             {"name", "path", "format", "read_only", "description", "allowed_dirs", "cache_size",
              "data_file", "allow_raw_backing", "vhd_strict_parent_timestamp", "vhd_size_mode",
              "vhd_size", "max_chain_depth", "tls_required", "allow", "bitmaps", "cache"});
  ExportConfig e;
  e.name = get_string(j, where, "name", "", true);
  if (e.name.size() > 4096) fail(where + ".name", "longer than 4096 bytes");
  e.path = get_string(j, where, "path", "", true);
  if (e.path.empty()) fail(where + ".path", "must not be empty");
  std::string fmt = get_string(j, where, "format", "auto");
  auto f = parse_format(fmt);
  if (!f) fail(where + ".format", "'" + fmt + "' is not one of raw, qcow2, vhd, auto");
  e.format = *f;
  e.read_only = get_bool(j, where, "read_only", false);
  e.description = get_string(j, where, "description", "");
  if (auto it = j.find("allowed_dirs"); it != j.end()) {
    if (!it->is_array()) fail(where + ".allowed_dirs", "must be an array of directories");
    for (size_t i = 0; i < it->size(); ++i) {
      const auto& d = (*it)[i];
      std::string k = where + ".allowed_dirs[" + std::to_string(i) + "]";
      if (!d.is_string() || d.get<std::string>().empty()) fail(k, "must be a directory path");
      e.allowed_dirs.push_back(d.get<std::string>());
    }
  }
  e.cache_size = get_uint(j, where, "cache_size", 0, 0, 1ull << 40);
  e.cache = get_string(j, where, "cache", "writeback");
  if (e.cache != "writeback" && e.cache != "none") {
    fail(where + ".cache", "'" + e.cache + "' is not one of writeback, none");
  }
  if (j.contains("data_file")) e.data_file = get_string(j, where, "data_file", "");
  e.allow_raw_backing = get_bool(j, where, "allow_raw_backing", false);
  e.vhd_strict_parent_timestamp = get_bool(j, where, "vhd_strict_parent_timestamp", false);
  e.vhd_size_mode = get_string(j, where, "vhd_size_mode", "current");
  if (e.vhd_size_mode != "current" && e.vhd_size_mode != "chs") {
    fail(where + ".vhd_size_mode", "'" + e.vhd_size_mode + "' is not one of current, chs");
  }
  if (j.contains("vhd_size")) {
    e.vhd_size = get_uint(j, where, "vhd_size", 0, 512, 2040ull << 30);
    if (*e.vhd_size % 512) fail(where + ".vhd_size", "must be a multiple of 512");
  }
  e.max_chain_depth = static_cast<int>(get_uint(j, where, "max_chain_depth", 16, 1, 256));
  e.tls_required = get_bool(j, where, "tls_required", false);
  e.allow = get_string_list(j, where, "allow");
  if (j.contains("bitmaps")) e.bitmaps = get_string_list(j, where, "bitmaps");
  return e;
}

void validate_tls(const TlsConfig& t, const std::string& where) {
  if (t.mode == TlsMode::off) return;
  if (t.certificates.empty() && t.psk_file.empty()) {
    fail(where, "TLS mode " + std::string(to_string(t.mode)) +
                    " needs certificates (a directory) or psk_file");
  }
  if (t.verify_peer && t.certificates.empty()) {
    fail(where + ".verify_peer", "checks X.509 client certificates: give certificates too");
  }
}

// Each bitmap once, and only names a qcow2 image can hold (1..1023 bytes).
void validate_bitmaps(const ExportConfig& e, const std::string& where) {
  if (!e.bitmaps) return;
  std::set<std::string> seen;
  for (size_t i = 0; i < e.bitmaps->size(); ++i) {
    const std::string& name = (*e.bitmaps)[i];
    const std::string key = where + ".bitmaps[" + std::to_string(i) + "]";
    if (name.empty() || name.size() > kMaxBitmapNameBytes) {
      fail(key, "a bitmap name is 1.." + std::to_string(kMaxBitmapNameBytes) + " bytes");
    }
    if (!seen.insert(name).second) fail(key, "'" + name + "' is listed twice");
  }
}

}  // namespace

std::optional<TlsMode> parse_tls_mode(std::string_view name) {
  if (name == "off") return TlsMode::off;
  if (name == "on") return TlsMode::on;
  if (name == "require") return TlsMode::require;
  return std::nullopt;
}

std::string_view to_string(TlsMode m) {
  switch (m) {
    case TlsMode::off:
      return "off";
    case TlsMode::on:
      return "on";
    case TlsMode::require:
      return "require";
  }
  return "?";
}

uint32_t parse_socket_mode(const std::string& text, const std::string& where) {
  if (text.size() < 3 || text.size() > 4 ||
      text.find_first_not_of("01234567") != std::string::npos) {
    fail(where, "'" + text + "' is not 3 or 4 octal digits such as \"0660\"");
  }
  const auto mode = static_cast<uint32_t>(std::stoul(text, nullptr, 8));
  if (mode > 0777) {
    fail(where, "'" + text + "' sets set-id or sticky bits, which mean nothing on a socket");
  }
  if ((mode & 0222) == 0) {
    fail(where, "'" + text + "' gives no one write permission: no client could connect");
  }
  return mode;
}

void check_socket_group(const std::string& text, const std::string& where) {
  if (text.empty()) fail(where, "must not be empty");
  if (text.find_first_not_of("0123456789") == std::string::npos) {
    // Above 10 digits stoull could overflow; 4294967295 is chown's "unchanged".
    if (text.size() > 10 || std::stoull(text) > 4294967294ull) {
      fail(where, "'" + text + "' is not a gid (0..4294967294)");
    }
    return;
  }
  static constexpr std::string_view name_chars =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.";
  if (text.size() > 32 || text.front() == '-' ||
      text.find_first_not_of(name_chars) != std::string::npos) {
    fail(where, "'" + text + "' is neither a gid nor a group name");
  }
}

bool is_loopback(const ListenerConfig& l) {
  if (l.kind == ListenerConfig::Kind::unix_socket) return true;
  return l.address.rfind("127.", 0) == 0 || l.address == "::1" || l.address == "localhost";
}

HttpConfig parse_http_endpoint(std::string_view text) {
  const std::string where = "--http";
  const size_t colon = text.rfind(':');
  if (colon == std::string_view::npos) fail(where, "'" + std::string(text) + "' is not ADDR:PORT");
  std::string address(text.substr(0, colon));
  const std::string port(text.substr(colon + 1));
  if (address.size() >= 2 && address.front() == '[' && address.back() == ']') {
    address = address.substr(1, address.size() - 2);
  }
  if (address.empty()) address = kDefaultListenAddress;
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535) {
    fail(where, "'" + port + "' is not a port (0..65535)");
  }
  return HttpConfig{
      .enabled = true, .address = address, .port = static_cast<uint16_t>(std::stoul(port))};
}

OpenOptions ExportConfig::open_options() const {
  OpenOptions o;
  o.format = format;
  o.read_only = read_only;
  o.allowed_dirs = allowed_dirs;
  o.max_chain_depth = max_chain_depth;
  o.metadata_cache_bytes = cache_size;
  o.data_file = data_file;
  o.allow_raw_backing_probe = allow_raw_backing;
  o.vhd_strict_parent_timestamp = vhd_strict_parent_timestamp;
  o.vhd_size_mode = vhd_size_mode;
  o.vhd_size_override = vhd_size;
  if (cache == "none") o.file_system = direct_file_system();
  return o;
}

Config parse_config(const json& j) {
  check_keys(
      j, "",
      {"listeners", "exports", "limits", "log_level", "log_format", "pid_file", "tls", "http"});
  Config c;
  if (auto it = j.find("tls"); it != j.end()) c.tls = parse_tls(*it, "tls");
  if (auto it = j.find("listeners"); it != j.end()) {
    if (!it->is_array()) fail("listeners", "must be an array");
    for (size_t i = 0; i < it->size(); ++i) {
      c.listeners.push_back(
          parse_listener((*it)[i], "listeners[" + std::to_string(i) + "]", c.tls));
    }
  } else {
    c.listeners.push_back(ListenerConfig{.tls = c.tls});
  }
  auto ex = j.find("exports");
  if (ex == j.end()) fail("exports", "is required");
  if (!ex->is_array()) fail("exports", "must be an array");
  for (size_t i = 0; i < ex->size(); ++i) {
    c.exports.push_back(parse_export((*ex)[i], "exports[" + std::to_string(i) + "]"));
  }
  if (auto it = j.find("limits"); it != j.end()) {
    check_keys(*it, "limits",
               {"max_connections", "handshake_timeout_ms", "max_inflight_bytes",
                "max_total_inflight_bytes", "workers", "max_io_threads", "drain_timeout_ms"});
    Limits& l = c.limits;
    l.max_connections = static_cast<uint32_t>(
        get_uint(*it, "limits", "max_connections", l.max_connections, 1, 65536));
    l.handshake_timeout_ms = static_cast<uint32_t>(
        get_uint(*it, "limits", "handshake_timeout_ms", l.handshake_timeout_ms, 100, 3600000));
    l.max_inflight_bytes = get_uint(*it, "limits", "max_inflight_bytes", l.max_inflight_bytes,
                                    kMaxRequestBytes, 1ull << 32);
    l.max_total_inflight_bytes = get_uint(*it, "limits", "max_total_inflight_bytes",
                                          l.max_total_inflight_bytes, kMaxRequestBytes, 1ull << 40);
    l.drain_timeout_ms = static_cast<uint32_t>(
        get_uint(*it, "limits", "drain_timeout_ms", l.drain_timeout_ms, 0, 3600000));
    l.workers = static_cast<uint32_t>(get_uint(*it, "limits", "workers", l.workers, 1, 256));
    l.max_io_threads = static_cast<uint32_t>(
        get_uint(*it, "limits", "max_io_threads", l.max_io_threads, 0, 65536));
  }
  if (auto it = j.find("http"); it != j.end()) c.http = parse_http(*it);
  c.log_level = get_string(j, "", "log_level", "info");
  c.log_format = get_string(j, "", "log_format", "text");
  c.pid_file = get_string(j, "", "pid_file", "");
  if (j.contains("pid_file") && c.pid_file.empty()) fail("pid_file", "must not be empty");
  validate(c);
  return c;
}

void validate(const Config& c) {
  static const std::set<std::string> levels{"trace", "debug", "info", "warn", "error", "off"};
  if (!levels.count(c.log_level)) {
    fail("log_level", "'" + c.log_level + "' is not one of trace, debug, info, warn, error, off");
  }
  if (c.log_format != "text" && c.log_format != "json") {
    fail("log_format", "'" + c.log_format + "' is not one of text, json");
  }
  if (c.limits.max_total_inflight_bytes < kMaxRequestBytes) {
    fail("limits.max_total_inflight_bytes", std::to_string(c.limits.max_total_inflight_bytes) +
                                                " is below the largest request (" +
                                                std::to_string(kMaxRequestBytes) + ")");
  }
  if (c.listeners.empty()) fail("listeners", "at least one listener is needed");
  validate_tls(c.tls, "tls");
  for (size_t i = 0; i < c.listeners.size(); ++i) {
    validate_tls(c.listeners[i].tls, "listeners[" + std::to_string(i) + "].tls");
  }
  if (c.exports.empty()) fail("exports", "at least one export is needed");
  std::set<std::string> names;
  for (size_t i = 0; i < c.exports.size(); ++i) {
    const std::string where = "exports[" + std::to_string(i) + "]";
    if (!names.insert(c.exports[i].name).second) {
      fail(where + ".name", "'" + c.exports[i].name + "' is used by another export");
    }
    validate_bitmaps(c.exports[i], where);
  }
  std::set<std::string> socks;
  for (size_t i = 0; i < c.listeners.size(); ++i) {
    const auto& l = c.listeners[i];
    std::string key =
        l.kind == ListenerConfig::Kind::tcp ? l.address + ":" + std::to_string(l.port) : l.path;
    if (!socks.insert(key).second) {
      fail("listeners[" + std::to_string(i) + "]", "'" + key + "' is listed twice");
    }
  }
}

Config parse_config_text(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for huge numbers
    throw ConfigError(std::string("not valid JSON: ") + e.what());
  }
  return parse_config(j);
}

Config load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot read the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return parse_config_text(ss.str());
  } catch (const ConfigError& e) {
    throw ConfigError(path + ": " + e.what());
  }
}

}  // namespace strata
