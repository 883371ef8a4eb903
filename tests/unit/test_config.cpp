// Config validation: every error names the key and the problem.
#include <doctest/doctest.h>

#include <string>

#include "config/config.h"

using namespace strata;

namespace {

std::string error_of(const std::string& text) {
  try {
    parse_config_text(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("a full config parses into typed fields") {
  auto c = parse_config_text(R"({
    "listeners": [{"type": "tcp", "address": "::", "port": 10810},
                  {"type": "unix", "path": "/run/strata.sock"}],
    "exports": [{"name": "a", "path": "/img/a.qcow2", "format": "qcow2", "read_only": true,
                 "description": "disk a", "allowed_dirs": ["/img"], "cache_size": "4M"},
                {"name": "b", "path": "/img/b.raw"}],
    "limits": {"max_connections": 8, "workers": 4, "max_inflight_bytes": "128M",
               "max_total_inflight_bytes": "2G", "drain_timeout_ms": 5000},
    "log_level": "debug"})");
  REQUIRE(c.listeners.size() == 2);
  CHECK(c.listeners[0].address == "::");
  CHECK(c.listeners[0].port == 10810);
  CHECK(c.listeners[1].kind == ListenerConfig::Kind::unix_socket);
  REQUIRE(c.exports.size() == 2);
  CHECK(c.exports[0].format == Format::qcow2);
  CHECK(c.exports[0].read_only);
  CHECK(c.exports[0].cache_size == 4u << 20);
  CHECK(c.exports[0].open_options().allowed_dirs == std::vector<std::string>{"/img"});
  CHECK(c.exports[1].format == Format::automatic);
  CHECK(c.limits.max_connections == 8);
  CHECK(c.limits.workers == 4);
  CHECK(c.limits.max_inflight_bytes == 128u << 20);
  CHECK(c.limits.max_total_inflight_bytes == 2ull << 30);
  CHECK(c.limits.drain_timeout_ms == 5000);
  CHECK(c.log_level == "debug");
}

TEST_CASE("defaults: one TCP listener on 10809") {
  auto c = parse_config_text(R"({"exports": [{"name": "x", "path": "/x.raw"}]})");
  REQUIRE(c.listeners.size() == 1);
  CHECK(c.listeners[0].port == 10809);
  CHECK(c.limits.workers == 16);
  CHECK(c.limits.max_io_threads == 256);
  CHECK(c.limits.max_total_inflight_bytes == 1ull << 30);
  CHECK(c.limits.drain_timeout_ms == 30000);
}

TEST_CASE("the total in-flight bound holds at least the largest request") {
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}],
                     "limits": {"max_total_inflight_bytes": "16M"}})") ==
        "limits.max_total_inflight_bytes: 16777216 is outside 33554432..1099511627776");
  Config c = parse_config_text(R"({"exports": [{"name": "x", "path": "/x"}]})");
  c.limits.max_total_inflight_bytes = 1 << 20;  // as --max-total-inflight-bytes 1M would
  try {
    validate(c);
    FAIL("validate accepted a bound below the largest request");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("limits.max_total_inflight_bytes") == 0);
  }
}

TEST_CASE("errors name the key and the problem") {
  CHECK(error_of("{").find("not valid JSON") != std::string::npos);
  CHECK(error_of(R"({})") == "exports: is required");
  CHECK(error_of(R"({"exports": []})") == "exports: at least one export is needed");
  CHECK(error_of(R"({"exports": [{"path": "/x"}]})") == "exports[0].name: is required");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "format": "qcow3"}]})") ==
        "exports[0].format: 'qcow3' is not one of raw, qcow2, vhd, auto");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "readonly": true}]})") ==
        "exports[0].readonly: unknown key");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "read_only": "yes"}]})") ==
        "exports[0].read_only: must be true or false, not string");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}, {"name": "x", "path": "/y"}]})") ==
        "exports[1].name: 'x' is used by another export");
  CHECK(error_of(R"({"listeners": [{"type": "tcp", "port": 70000}],
                     "exports": [{"name": "x", "path": "/x"}]})") ==
        "listeners[0].port: 70000 is outside 0..65535");
  CHECK(error_of(R"({"listeners": [{"type": "udp"}], "exports": [{"name": "x", "path": "/x"}]})") ==
        "listeners[0].type: 'udp' is not one of tcp, unix");
  CHECK(
      error_of(R"({"listeners": [{"type": "unix"}], "exports": [{"name": "x", "path": "/x"}]})") ==
      "listeners[0].path: is required");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}], "limits": {"workers": 0}})") ==
        "limits.workers: 0 is outside 1..256");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}], "limits": {"workers": -1}})") ==
        "limits.workers: must not be negative");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}],
                     "limits": {"max_io_threads": 65537}})") ==
        "limits.max_io_threads: 65537 is outside 0..65536");
  CHECK(parse_config_text(R"({"exports": [{"name": "x", "path": "/x"}],
                              "limits": {"max_io_threads": 0}})")
            .limits.max_io_threads == 0);
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}], "log_level": "loud"})")
            .find("log_level") == 0);
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "vhd_size": 1000}]})") ==
        "exports[0].vhd_size: must be a multiple of 512");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "cache_size": "12Q"}]})")
            .find("exports[0].cache_size:") == 0);
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x"}], "extra": 1})") ==
        "extra: unknown key");
}

TEST_CASE("a number out of JSON's range is a ConfigError, not a library exception") {
  // Found by fuzz_config: the JSON library reports it as out_of_range, not parse_error.
  CHECK(error_of(R"({"exports": [{"name": "d", "path": "/i", "cache_size": 1e999}]})")
            .find("not valid JSON") != std::string::npos);
}

TEST_CASE("load_config_file prefixes the file name") {
  try {
    load_config_file("/nonexistent/strata.json");
    FAIL("expected an error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) == "/nonexistent/strata.json: cannot read the config file");
  }
}

TEST_CASE("every example config in config/examples parses") {
  for (const char* name : {"container.json", "multi.json"}) {
    CAPTURE(name);
    auto c = load_config_file(std::string(STRATA_SOURCE_DIR) + "/config/examples/" + name);
    CHECK_FALSE(c.exports.empty());
    CHECK_FALSE(c.listeners.empty());
  }
}

TEST_CASE("tls: the top-level settings apply to every listener without its own") {
  auto c = parse_config_text(R"({
    "tls": {"mode": "require", "certificates": "/etc/strata/tls", "verify_peer": true,
            "priority": "NORMAL"},
    "listeners": [{"type": "tcp", "port": 1},
                  {"type": "unix", "path": "/run/s.sock", "tls": {"mode": "off"}}],
    "exports": [{"name": "a", "path": "/img/a.raw", "tls_required": true,
                 "allow": ["CN=backup,O=Example", "alice"]}]})");
  REQUIRE(c.listeners.size() == 2);
  CHECK(c.listeners[0].tls.mode == TlsMode::require);
  CHECK(c.listeners[0].tls.certificates == "/etc/strata/tls");
  CHECK(c.listeners[0].tls.verify_peer);
  CHECK(c.listeners[0].tls.priority == "NORMAL");
  CHECK_FALSE(c.listeners[0].own_tls);
  CHECK(c.listeners[1].tls.mode == TlsMode::off);
  CHECK(c.listeners[1].own_tls);
  CHECK(c.exports[0].tls_required);
  CHECK(c.exports[0].allow == std::vector<std::string>{"CN=backup,O=Example", "alice"});
}

TEST_CASE("tls errors name the key") {
  const std::string ex = R"("exports": [{"name": "a", "path": "/a"}])";
  CHECK(error_of(R"({"tls": {"mode": "maybe"}, )" + ex + "}") ==
        "tls.mode: 'maybe' is not one of off, on, require");
  CHECK(error_of(R"({"tls": {"mode": "on"}, )" + ex + "}") ==
        "tls: TLS mode on needs certificates (a directory) or psk_file");
  CHECK(error_of(R"({"tls": {"mode": "require", "psk_file": "/k", "verify_peer": true}, )" + ex +
                 "}") ==
        "tls.verify_peer: checks X.509 client certificates: give certificates too");
  CHECK(error_of(R"({"tls": {"mode": "on", "cert": "/d"}, )" + ex + "}") ==
        "tls.cert: unknown key");
  CHECK(error_of(R"({"listeners": [{"tls": {"mode": "require"}}], )" + ex + "}") ==
        "listeners[0].tls: TLS mode require needs certificates (a directory) or psk_file");
  CHECK(error_of(R"({"exports": [{"name": "a", "path": "/a", "allow": "alice"}]})") ==
        "exports[0].allow: must be an array of strings");
  CHECK(error_of(R"({"exports": [{"name": "a", "path": "/a", "allow": [""]}]})") ==
        "exports[0].allow[0]: must be a non-empty string");
}

TEST_CASE("a TCP listener binds loopback unless told otherwise") {
  auto c = parse_config_text(R"({"listeners": [{"type": "tcp"}],
                                 "exports": [{"name": "a", "path": "/a"}]})");
  CHECK(c.listeners[0].address == "127.0.0.1");
  CHECK(is_loopback(c.listeners[0]));
  ListenerConfig any;
  any.address = "0.0.0.0";
  CHECK_FALSE(is_loopback(any));
  any.address = "::1";
  CHECK(is_loopback(any));
}

TEST_CASE("bitmaps: absent is every bitmap of the image, a list those, [] none") {
  auto c = parse_config_text(R"({"exports": [
    {"name": "a", "path": "/a.qcow2"},
    {"name": "b", "path": "/b.qcow2", "bitmaps": ["weekly", "backup-0"]},
    {"name": "c", "path": "/c.qcow2", "bitmaps": []}]})");
  REQUIRE(c.exports.size() == 3);
  CHECK_FALSE(c.exports[0].bitmaps.has_value());
  REQUIRE(c.exports[1].bitmaps.has_value());
  CHECK(*c.exports[1].bitmaps == std::vector<std::string>{"weekly", "backup-0"});
  REQUIRE(c.exports[2].bitmaps.has_value());
  CHECK(c.exports[2].bitmaps->empty());
}

TEST_CASE("bitmaps errors name the key") {
  auto with = [](const std::string& bitmaps) {
    return error_of(R"({"exports": [{"name": "a", "path": "/a", "bitmaps": )" + bitmaps + "}]}");
  };
  CHECK(with(R"("backup-0")") == "exports[0].bitmaps: must be an array of strings");
  CHECK(with(R"(["a", 7])") == "exports[0].bitmaps[1]: must be a non-empty string");
  CHECK(with(R"([""])") == "exports[0].bitmaps[0]: must be a non-empty string");
  CHECK(with(R"(["a", "b", "a"])") == "exports[0].bitmaps[2]: 'a' is listed twice");
  CHECK(with("[\"" + std::string(1024, 'n') + "\"]") ==
        "exports[0].bitmaps[0]: a bitmap name is 1..1023 bytes");
  CHECK(with("[\"" + std::string(1023, 'n') + "\"]").empty());
}

TEST_CASE("bitmaps given on the command line are checked like the config's") {
  Config c = parse_config_text(R"({"exports": [{"name": "x", "path": "/x"}]})");
  c.exports[0].bitmaps = std::vector<std::string>{"daily", "daily"};  // --bitmap daily twice
  try {
    validate(c);
    FAIL("validate accepted a bitmap listed twice");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) == "exports[0].bitmaps[1]: 'daily' is listed twice");
  }
}

TEST_CASE("pid_file and log_format: the process keys") {
  auto c = parse_config_text(R"({"exports": [{"name": "x", "path": "/x.raw"}]})");
  CHECK(c.pid_file.empty());
  CHECK(c.log_format == "text");
  c = parse_config_text(
      R"({"pid_file": "/run/strata.pid", "log_format": "json",
          "exports": [{"name": "x", "path": "/x.raw"}]})");
  CHECK(c.pid_file == "/run/strata.pid");
  CHECK(c.log_format == "json");
  CHECK(error_of(R"({"log_format": "xml", "exports": [{"name": "x", "path": "/x"}]})") ==
        "log_format: 'xml' is not one of text, json");
  CHECK(error_of(R"({"pid_file": "", "exports": [{"name": "x", "path": "/x"}]})") ==
        "pid_file: must not be empty");
  CHECK(error_of(R"({"pid_file": 1, "exports": [{"name": "x", "path": "/x"}]})") ==
        "pid_file: must be a string, not number");
}

TEST_CASE("http: off by default, on with the key, loopback and 10810 unless told") {
  auto c = parse_config_text(R"({"exports": [{"name": "x", "path": "/x.raw"}]})");
  CHECK_FALSE(c.http.enabled);
  c = parse_config_text(R"({"http": {}, "exports": [{"name": "x", "path": "/x.raw"}]})");
  CHECK(c.http.enabled);
  CHECK(c.http.address == "127.0.0.1");
  CHECK(c.http.port == 10810);
  c = parse_config_text(
      R"({"http": {"address": "0.0.0.0", "port": 9100},
          "exports": [{"name": "x", "path": "/x.raw"}]})");
  CHECK(c.http.address == "0.0.0.0");
  CHECK(c.http.port == 9100);
  CHECK(error_of(R"({"http": {"port": 70000}, "exports": [{"name": "x", "path": "/x"}]})") ==
        "http.port: 70000 is outside 0..65535");
  CHECK(error_of(R"({"http": {"path": "/m"}, "exports": [{"name": "x", "path": "/x"}]})") ==
        "http.path: unknown key");
  CHECK(error_of(R"({"http": {"address": ""}, "exports": [{"name": "x", "path": "/x"}]})") ==
        "http.address: must not be empty");
}

TEST_CASE("--http ADDR:PORT, [IPv6]:PORT and :PORT") {
  auto h = parse_http_endpoint("0.0.0.0:9100");
  CHECK(h.enabled);
  CHECK(h.address == "0.0.0.0");
  CHECK(h.port == 9100);
  h = parse_http_endpoint("[::1]:0");
  CHECK(h.address == "::1");
  CHECK(h.port == 0);
  h = parse_http_endpoint(":10811");
  CHECK(h.address == "127.0.0.1");
  CHECK(h.port == 10811);
  for (const char* bad : {"127.0.0.1", "127.0.0.1:", "1.2.3.4:65536", "x:1a", "h:123456"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(parse_http_endpoint(bad), ConfigError);
  }
}

TEST_CASE("cache: writeback unless an export says none") {
  auto c = parse_config_text(
      R"({"exports": [{"name": "x", "path": "/x.raw"},
                      {"name": "y", "path": "/y.raw", "cache": "none"}]})");
  CHECK(c.exports[0].cache == "writeback");
  CHECK(c.exports[1].cache == "none");
  CHECK(error_of(R"({"exports": [{"name": "x", "path": "/x", "cache": "directsync"}]})") ==
        "exports[0].cache: 'directsync' is not one of writeback, none");
}

TEST_CASE("unix listener mode and group: unset unless given, octal and a gid or name") {
  auto c = parse_config_text(R"({
    "listeners": [{"type": "unix", "path": "/run/a.sock"},
                  {"type": "unix", "path": "/run/b.sock", "mode": "0660", "group": "10809"},
                  {"type": "unix", "path": "/run/c.sock", "mode": "666", "group": "vm-users"}],
    "exports": [{"name": "a", "path": "/img/a.raw"}]})");
  REQUIRE(c.listeners.size() == 3);
  CHECK_FALSE(c.listeners[0].mode);
  CHECK(c.listeners[0].group.empty());
  CHECK(c.listeners[1].mode == 0660u);
  CHECK(c.listeners[1].group == "10809");
  CHECK(c.listeners[2].mode == 0666u);
  CHECK(c.listeners[2].group == "vm-users");
}

TEST_CASE("unix listener mode and group: hostile values name the key") {
  const auto with = [](const std::string& extra) {
    return error_of(R"({"listeners": [{"type": "unix", "path": "/run/s.sock", )" + extra +
                    R"(}], "exports": [{"name": "a", "path": "/a"}]})");
  };
  CHECK(with(R"("mode": 660)").find("listeners[0].mode: must be a string of octal") == 0);
  CHECK(with(R"("mode": "0860")").find("listeners[0].mode: '0860' is not 3 or 4 octal") == 0);
  CHECK(with(R"("mode": "rw-rw----")").find("is not 3 or 4 octal") != std::string::npos);
  CHECK(with(R"("mode": "06")").find("is not 3 or 4 octal") != std::string::npos);
  CHECK(with(R"("mode": "00660")").find("is not 3 or 4 octal") != std::string::npos);
  CHECK(with(R"("mode": "-660")").find("is not 3 or 4 octal") != std::string::npos);
  CHECK(with(R"("mode": "4660")").find("set-id or sticky") != std::string::npos);
  CHECK(with(R"("mode": "0444")").find("no client could connect") != std::string::npos);
  CHECK(with(R"("group": "")").find("listeners[0].group: must not be empty") == 0);
  CHECK(with(R"("group": 10809)").find("listeners[0].group: must be a string") == 0);
  CHECK(with(R"("group": "4294967295")").find("is not a gid") != std::string::npos);
  CHECK(with(R"("group": "99999999999999999999999")").find("is not a gid") != std::string::npos);
  CHECK(with(R"("group": "-rf")").find("neither a gid nor a group name") != std::string::npos);
  CHECK(with(R"("group": "a:b")").find("neither a gid nor a group name") != std::string::npos);
  CHECK(with(R"("group": "a b")").find("neither a gid nor a group name") != std::string::npos);
  CHECK(with(R"("group": "../etc")").find("neither a gid nor a group name") != std::string::npos);
  CHECK(with(R"("group": "a\nb")").find("neither a gid nor a group name") != std::string::npos);
  CHECK(
      with(R"("group": ")" + std::string(33, 'g') + "\"").find("neither a gid nor a group name") !=
      std::string::npos);
  CHECK(error_of(R"({"listeners": [{"type": "tcp", "mode": "0660"}],
                     "exports": [{"name": "a", "path": "/a"}]})") ==
        "listeners[0].mode: only for unix listeners");
  CHECK(error_of(R"({"listeners": [{"type": "tcp", "group": "0"}],
                     "exports": [{"name": "a", "path": "/a"}]})") ==
        "listeners[0].group: only for unix listeners");
}
