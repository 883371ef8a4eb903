// Strata's configuration: a JSON file (or the `strata serve IMAGE` shortcut)
// turned into a typed, validated Config. Every error names the key and the
// problem, e.g. "exports[1].format: 'qcow3' is not one of raw, qcow2, vhd, auto".
// The reference is docs/CONFIG.md; examples live in config/examples/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "formats/open.h"

namespace strata {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// TLS of a listener (docs/CONFIG.md, "TLS"). off: plain only; on: plain and
// TLS clients, exports with tls_required refuse plain ones; require: no
// export before NBD_OPT_STARTTLS.
enum class TlsMode { off, on, require };
std::optional<TlsMode> parse_tls_mode(std::string_view name);
std::string_view to_string(TlsMode m);

struct TlsConfig {
  TlsMode mode = TlsMode::off;
  // X.509: ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem
  // (the layout qemu and nbdkit read).
  std::string certificates;
  // PSK: psktool's "username:hexkey" lines.
  std::string psk_file;
  // X.509: a client certificate signed by the CA is required; its subject DN
  // is the client's identity.
  bool verify_peer = false;
  // GnuTLS priority string; empty: the system's default.
  std::string priority;

  bool operator==(const TlsConfig&) const = default;
};

// The loopback address a TCP listener binds when none is given: a server
// that serves writable disks must be opened to the network on purpose.
inline constexpr const char* kDefaultListenAddress = "127.0.0.1";

struct ListenerConfig {
  enum class Kind { tcp, unix_socket };
  Kind kind = Kind::tcp;
  std::string address = kDefaultListenAddress;  // tcp: IPv4 or IPv6 literal
  uint16_t port = 10809;                        // tcp
  std::string path;                             // unix
  // unix: permission bits and group the socket gets after bind (the bits
  // gate connect(): a client needs write permission). Unset: as the umask
  // leaves it, the server's own group. The group is a name or a numeric gid,
  // resolved when the socket is bound.
  std::optional<uint32_t> mode;
  std::string group;
  TlsConfig tls;         // the listener's own "tls", else the top-level one
  bool own_tls = false;  // "tls" was given for this listener

  bool operator==(const ListenerConfig&) const = default;
};

// A unix socket's "mode": 3 or 4 octal digits, at most 0777 (set-id and
// sticky bits mean nothing on a socket). Throws ConfigError naming `where`.
uint32_t parse_socket_mode(const std::string& text, const std::string& where);
// A unix socket's "group": a numeric gid (0..4294967294) or a group name
// (1..32 of letters, digits, '_', '-', '.', not starting with '-'). Throws
// ConfigError naming `where`.
void check_socket_group(const std::string& text, const std::string& where);

// True for 127.0.0.0/8 and ::1 (and unix sockets, which never leave the host).
bool is_loopback(const ListenerConfig& l);

// The longest dirty bitmap name an image holds (qcow2's limit).
inline constexpr size_t kMaxBitmapNameBytes = 1023;

struct ExportConfig {
  std::string name;
  std::string path;
  std::string description;
  Format format = Format::automatic;
  bool read_only = false;
  std::vector<std::string> allowed_dirs;
  uint64_t cache_size = 0;  // qcow2 metadata cache; 0 = default
  // Host page cache use: "writeback" (through the page cache) or "none"
  // (O_DIRECT on every file of the chain, formats/direct_file.h).
  std::string cache = "writeback";
  std::optional<std::string> data_file;
  bool allow_raw_backing = false;
  bool vhd_strict_parent_timestamp = false;
  std::string vhd_size_mode = "current";
  std::optional<uint64_t> vhd_size;
  int max_chain_depth = 16;
  // Only clients that started TLS see this export (listeners in mode on).
  bool tls_required = false;
  // Client identities allowed (X.509 subject DN, RFC 4514, or PSK username;
  // exact or fnmatch glob). Empty: everyone.
  std::vector<std::string> allow;
  // Persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME, in this
  // order. Unset: every exportable bitmap of the image; empty: none. A name
  // the image does not have stops the server at start-up.
  std::optional<std::vector<std::string>> bitmaps;

  OpenOptions open_options() const;
  // Every key: a reload replaces an export whose entry differs in any.
  bool operator==(const ExportConfig&) const = default;
};

// The HTTP endpoint for metrics and probes (docs/OPERATIONS.md): off unless
// the config's "http" or --http names it; loopback unless its address says
// otherwise. Port 0 takes a free port (the start-up log line names it).
inline constexpr uint16_t kDefaultHttpPort = 10810;

struct HttpConfig {
  bool enabled = false;
  std::string address = kDefaultListenAddress;  // IPv4 or IPv6 literal
  uint16_t port = kDefaultHttpPort;

  bool operator==(const HttpConfig&) const = default;
};

// "ADDR:PORT", "[IPv6]:PORT" or ":PORT" (loopback), as --http takes it.
// Throws ConfigError.
HttpConfig parse_http_endpoint(std::string_view text);

struct Limits {
  uint32_t max_connections = 128;
  uint32_t handshake_timeout_ms = 10000;
  uint64_t max_inflight_bytes = 64 << 20;          // per connection
  uint64_t max_total_inflight_bytes = 1ull << 30;  // all connections together
  uint32_t workers = 16;                           // I/O threads per connection
  // Transmission threads beyond each connection's first, all connections
  // together (server/io_threads.h).
  uint32_t max_io_threads = 256;
  // On SIGTERM/SIGINT, and for the clients of an export a reload takes out,
  // how long clients get to read the replies still owed to them before their
  // connections are closed.
  uint32_t drain_timeout_ms = 30000;

  bool operator==(const Limits&) const = default;
};

inline constexpr uint32_t kMaxRequestBytes = 32 * 1024 * 1024;

struct Config {
  TlsConfig tls;  // the default of every listener
  std::vector<ListenerConfig> listeners;
  std::vector<ExportConfig> exports;
  Limits limits;
  HttpConfig http;
  std::string log_level = "info";
  std::string log_format = "text";  // text or json (server/log_format.h)
  // Written once the server is ready, removed at exit; empty: none.
  std::string pid_file;
};

// Parses and validates; throws ConfigError.
Config parse_config(const nlohmann::json& j);
Config parse_config_text(const std::string& text);
Config load_config_file(const std::string& path);
// Checks cross-field rules (unique names, at least one listener/export...).
void validate(const Config& c);

}  // namespace strata
