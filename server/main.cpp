// strata: NBD server (`strata serve`, `strata reload`) and image tool (`create`, `info`,
// `check`, `map`).
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <system_error>

#include "config/config.h"
#include "formats/create.h"
#include "formats/errors.h"
#include "server/log_format.h"
#include "server/pid_file.h"
#include "server/server.h"
#include "server/socket_activation.h"
#include "server/tool.h"

namespace fs = std::filesystem;
using namespace strata;

namespace {

constexpr const char* kDefaultImage = "data/default.raw";
constexpr uint64_t kDefaultImageSize = 1ull << 30;

struct ServeArgs {
  std::string image;
  std::string config;
  std::string format = "auto";
  std::string export_name = "default";
  std::string description;
  int port = -1;
  std::string bind = kDefaultListenAddress;
  std::vector<std::string> sockets;
  bool read_only = false;
  std::vector<std::string> allowed_dirs;
  std::string cache_size;
  std::string cache;
  std::string data_file;
  bool allow_raw_backing = false;
  std::vector<std::string> bitmaps;
  std::string log_level;
  std::string log_format;
  std::string pid_file;
  bool exit_with_parent = false;
  uint32_t max_connections = 0;
  uint32_t handshake_timeout_ms = 0;
  uint32_t workers = 0;
  std::optional<uint32_t> max_io_threads;  // 0 is a value: no threads beyond the first
  std::string max_total_inflight;
  std::string tls;
  std::string tls_certificates;
  std::string tls_psk;
  bool tls_verify_peer = false;
  std::string tls_priority;
  std::string http;
};

// The --tls* options, over the config file's top-level "tls" when both are
// given (then every listener without its own "tls" takes them).
void apply_tls_args(const ServeArgs& a, Config& c) {
  const bool given = !a.tls.empty() || !a.tls_certificates.empty() || !a.tls_psk.empty() ||
                     a.tls_verify_peer || !a.tls_priority.empty();
  if (!given) return;
  TlsConfig t = c.tls;
  if (!a.tls.empty()) {
    auto m = parse_tls_mode(a.tls);
    if (!m) throw ConfigError("--tls: '" + a.tls + "' is not one of off, on, require");
    t.mode = *m;
  } else if (t.mode == TlsMode::off) {
    t.mode = TlsMode::require;  // credentials alone mean TLS, as in qemu-nbd
  }
  if (!a.tls_certificates.empty()) t.certificates = a.tls_certificates;
  if (!a.tls_psk.empty()) t.psk_file = a.tls_psk;
  if (a.tls_verify_peer) t.verify_peer = true;
  if (!a.tls_priority.empty()) t.priority = a.tls_priority;
  for (auto& l : c.listeners) {
    if (!l.own_tls) l.tls = t;
  }
  c.tls = t;
}

// CLI11 lets an option that fills a vector swallow every following word, so
// `serve --allowed-dir /srv IMAGE` took IMAGE for a second directory and
// served the default export instead. Every option takes exactly one value;
// a list is given by repeating the option.
template <class T>
CLI::Option* add_repeatable(CLI::App* app, const std::string& name, std::vector<T>& into,
                            const std::string& help) {
  return app->add_option(name, into, help + " (repeat the option for more)")
      ->allow_extra_args(false);
}

// Serves data/default.raw (created sparse on first use) when the command line
// names neither an image nor a config; says so, so that nobody writes to the
// blank default believing their image is served.
void use_embedded_default(ServeArgs& a) {
  a.image = kDefaultImage;
  a.format = "raw";
  if (fs::exists(a.image)) {
    spdlog::info("no IMAGE and no --config given: serving the embedded default export {}", a.image);
    return;
  }
  fs::create_directories(fs::path(a.image).parent_path());
  CreateOptions co;
  co.format = Format::raw;
  co.path = a.image;
  co.size = kDefaultImageSize;
  create_image(co);
  spdlog::info(
      "no IMAGE and no --config given: created and serving the embedded default export {} "
      "(1 GiB, sparse)",
      a.image);
}

Config config_from_args(ServeArgs& a) {
  Config c;
  if (!a.config.empty()) {
    if (!a.image.empty()) throw ConfigError("give either IMAGE or --config, not both");
    if (!a.bitmaps.empty()) {
      throw ConfigError(
          "--bitmap is for IMAGE; with --config, list them in the export's \"bitmaps\"");
    }
    if (!a.cache.empty()) {
      throw ConfigError("--cache is for IMAGE; with --config, set the export's \"cache\"");
    }
    c = load_config_file(a.config);
  } else {
    ExportConfig e;
    if (a.image.empty()) use_embedded_default(a);
    e.name = a.export_name;
    e.path = a.image;
    e.description = a.description;
    auto f = parse_format(a.format);
    if (!f) throw ConfigError("--format: '" + a.format + "' is not one of raw, qcow2, vhd, auto");
    e.format = *f;
    e.read_only = a.read_only;
    e.allowed_dirs = a.allowed_dirs;
    if (!a.cache_size.empty()) {
      try {
        e.cache_size = parse_size(a.cache_size);
      } catch (const std::exception& ex) {
        throw ConfigError(std::string("--cache-size: ") + ex.what());
      }
    }
    if (!a.cache.empty()) e.cache = a.cache;
    if (!a.data_file.empty()) e.data_file = a.data_file;
    e.allow_raw_backing = a.allow_raw_backing;
    if (!a.bitmaps.empty()) e.bitmaps = a.bitmaps;
    c.exports.push_back(e);
    for (const auto& s : a.sockets) {
      ListenerConfig l;
      l.kind = ListenerConfig::Kind::unix_socket;
      l.path = s;
      c.listeners.push_back(l);
    }
    if (a.port >= 0 || a.sockets.empty()) {
      ListenerConfig l;
      l.address = a.bind;
      l.port = static_cast<uint16_t>(a.port >= 0 ? a.port : 10809);
      c.listeners.push_back(l);
    }
  }
  apply_tls_args(a, c);
  if (!a.log_level.empty()) c.log_level = a.log_level;
  if (!a.log_format.empty()) c.log_format = a.log_format;
  if (!a.pid_file.empty()) c.pid_file = a.pid_file;
  if (!a.http.empty()) c.http = parse_http_endpoint(a.http);
  if (a.max_connections) c.limits.max_connections = a.max_connections;
  if (a.handshake_timeout_ms) c.limits.handshake_timeout_ms = a.handshake_timeout_ms;
  if (a.workers) c.limits.workers = a.workers;
  if (a.max_io_threads) c.limits.max_io_threads = *a.max_io_threads;
  if (!a.max_total_inflight.empty()) {
    try {
      c.limits.max_total_inflight_bytes = parse_size(a.max_total_inflight);
    } catch (const std::exception& ex) {
      throw ConfigError(std::string("--max-total-inflight-bytes: ") + ex.what());
    }
  }
  validate(c);
  return c;
}

// Holds SIGTERM and SIGINT back from the moment --exit-with-parent asks for
// a SIGTERM until the server's handlers exist: a parent that dies during
// start-up then stops the server cleanly instead of killing it mid-open.
class HeldStopSignals {
 public:
  explicit HeldStopSignals(bool hold) : held_(hold) {
    if (!held_) return;
    sigemptyset(&set_);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
  }
  ~HeldStopSignals() { release(); }
  HeldStopSignals(const HeldStopSignals&) = delete;
  HeldStopSignals& operator=(const HeldStopSignals&) = delete;
  void release() {
    if (held_) pthread_sigmask(SIG_UNBLOCK, &set_, nullptr);
    held_ = false;
  }

 private:
  bool held_;
  sigset_t set_{};
};

// --exit-with-parent: SIGTERM when the parent exits (Linux sends it when the
// thread that forked us ends). A parent that died before prctl() took
// effect sends nothing, and we are reparented: the pid changed. Returns
// false then.
bool exit_with_parent() {
  const pid_t parent = ::getppid();
  if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) {
    throw std::system_error(errno, std::generic_category(), "--exit-with-parent: prctl");
  }
  if (::getppid() != parent) {
    spdlog::info("--exit-with-parent: the parent process has already exited, stopping");
    return false;
  }
  return true;
}

int serve(ServeArgs& args) {
  HeldStopSignals held(args.exit_with_parent);
  if (args.exit_with_parent && !exit_with_parent()) return 0;
  // Read (and unset) before anything else runs: the variables are for this
  // process only.
  std::vector<ActivatedSocket> activated = take_activated_sockets();
  Config config = config_from_args(args);
  set_log_format(*parse_log_format(config.log_format));
  spdlog::set_level(spdlog::level::from_str(config.log_level));
  Server server(std::move(config), std::move(activated));
  if (!args.config.empty()) {
    // A reload reads the file again with the same command-line options over it.
    server.set_config_source([args]() mutable { return config_from_args(args); });
  }
  held.release();  // the server's signal handlers are in place
  server.listen();
  // Under socket activation stdout is often the activator's own
  // (`nbdcopy -- [ strata serve ... ] -` writes the image there): the URIs
  // go to the log instead.
  for (const auto& uri : server.uris()) {
    if (server.activated()) {
      spdlog::info("serving {}", uri);
    } else {
      std::cout << "serving " << uri << std::endl;
    }
  }
  PidFile pid_file;
  if (!server.config().pid_file.empty()) pid_file = PidFile(server.config().pid_file, ::getpid());
  return server.run();
}

int run_command_line(int argc, char** argv) {
  auto logger = spdlog::stderr_color_mt("strata");
  spdlog::set_default_logger(logger);
  set_log_format(LogFormat::text);

  CLI::App app{"Strata: a network block device server for raw, VHD and qcow2 images"};
  app.require_subcommand(1);

  ServeArgs sa;
  auto* serve_cmd = app.add_subcommand("serve", "Serve images over NBD");
  serve_cmd->add_option("image", sa.image,
                        "Image to serve as one export (default: data/default.raw, 1 GiB)");
  serve_cmd->add_option("-c,--config", sa.config, "JSON config file (see docs/CONFIG.md)");
  serve_cmd->add_option("-f,--format", sa.format, "raw, qcow2, vhd or auto")
      ->check(CLI::IsMember({"raw", "qcow2", "vhd", "vpc", "auto"}));
  serve_cmd->add_option("-x,--export", sa.export_name, "Export name");
  serve_cmd->add_option("--description", sa.description, "Export description");
  serve_cmd->add_option("-p,--port", sa.port, "TCP port (default 10809)")
      ->check(CLI::Range(0, 65535));
  serve_cmd->add_option("-b,--bind", sa.bind, "TCP address to bind (IPv4 or IPv6)");
  add_repeatable(serve_cmd, "-k,--socket", sa.sockets, "Unix socket path");
  serve_cmd->add_flag("-r,--read-only", sa.read_only, "Serve read-only");
  add_repeatable(serve_cmd, "--allowed-dir", sa.allowed_dirs,
                 "Directory child images (backing, parent, data file) may live in");
  serve_cmd->add_option("--cache-size", sa.cache_size, "qcow2 metadata cache size (e.g. 4M)");
  serve_cmd
      ->add_option("--cache", sa.cache,
                   "writeback (default: through the host page cache) or none (O_DIRECT)")
      ->check(CLI::IsMember({"writeback", "none"}));
  serve_cmd->add_option("--data-file", sa.data_file, "qcow2 external data file override");
  serve_cmd->add_flag("--allow-raw-backing", sa.allow_raw_backing,
                      "Treat a backing file without a recorded format as raw");
  add_repeatable(serve_cmd, "-B,--bitmap", sa.bitmaps,
                 "Export only this persistent dirty bitmap as qemu:dirty-bitmap:NAME "
                 "(default: every exportable bitmap of the image)");
  serve_cmd->add_option("--log-level", sa.log_level, "trace, debug, info, warn, error, off");
  serve_cmd->add_option("--log-format", sa.log_format, "text (default) or json (one object a line)")
      ->check(CLI::IsMember({"text", "json"}));
  serve_cmd->add_option("--pid-file", sa.pid_file,
                        "Write the server's pid here once it is ready; removed at exit");
  serve_cmd->add_option("--http", sa.http,
                        "Serve /metrics, /healthz, /readyz and /exports on ADDR:PORT (e.g. "
                        "127.0.0.1:10810; off by default)");
  serve_cmd->add_flag("--exit-with-parent", sa.exit_with_parent,
                      "Stop (as on SIGTERM) when the parent process exits (Linux)");
  serve_cmd->add_option("--max-connections", sa.max_connections, "Connection limit");
  serve_cmd->add_option("--handshake-timeout-ms", sa.handshake_timeout_ms,
                        "Drop clients that do not finish the handshake in time");
  serve_cmd->add_option("--workers", sa.workers, "I/O threads per connection (default 16)");
  serve_cmd
      ->add_option("--max-io-threads", sa.max_io_threads,
                   "I/O threads beyond each connection's first, all connections together "
                   "(default 256)")
      ->check(CLI::Range(0, 65536));
  serve_cmd->add_option("--max-total-inflight-bytes", sa.max_total_inflight,
                        "Request and reply payload held in memory by all connections "
                        "together (default 1G)");
  serve_cmd->add_option("--tls", sa.tls, "off, on (plain and TLS clients) or require")
      ->check(CLI::IsMember({"off", "on", "require"}));
  serve_cmd->add_option("--tls-certificates", sa.tls_certificates,
                        "Directory with ca-cert.pem, server-cert.pem, server-key.pem "
                        "(and ca-crl.pem)");
  serve_cmd->add_option("--tls-psk", sa.tls_psk, "PSK file (psktool's username:hexkey lines)");
  serve_cmd->add_flag("--tls-verify-peer", sa.tls_verify_peer,
                      "Require a client certificate signed by the CA");
  serve_cmd->add_option("--tls-priority", sa.tls_priority,
                        "GnuTLS priority string (default: the system's)");

  std::string reload_pid_file;
  auto* reload_cmd = app.add_subcommand(
      "reload", "Make a running server re-read its --config file (sends it SIGHUP)");
  reload_cmd->add_option("--pid-file", reload_pid_file, "The server's --pid-file")->required();

  ToolOptions topt;
  std::string tool_format = "auto";
  std::string output = "human";
  std::string tool_image;
  auto add_tool = [&](const char* name, const char* help) {
    auto* c = app.add_subcommand(name, help);
    c->add_option("image", tool_image, "Image file")->required();
    c->add_option("-f,--format", tool_format, "raw, qcow2, vhd or auto")
        ->check(CLI::IsMember({"raw", "qcow2", "vhd", "vpc", "auto"}));
    c->add_option("--output", output, "human or json")->check(CLI::IsMember({"human", "json"}));
    add_repeatable(c, "--allowed-dir", topt.allowed_dirs, "Confine child images to this directory");
    c->add_flag("-U,--force-share", topt.force_share,
                "Open the image even while a server has it open read-write (results may be "
                "inconsistent)");
    return c;
  };
  auto* info_cmd = add_tool("info", "Show an image and its whole chain");
  auto* check_cmd = add_tool("check", "Check an image for structural errors and leaks");
  auto* map_cmd = add_tool("map", "List extents and the layer that holds them");

  BitmapArgs ba;
  std::string granularity_text;
  auto* bitmap_cmd = app.add_subcommand(
      "bitmap", "Add, remove, clear, enable, disable or list the dirty bitmaps of a qcow2 image");
  bitmap_cmd->add_option("verb", ba.verb, "add, remove, clear, enable, disable or list")
      ->required()
      ->check(CLI::IsMember({"add", "remove", "clear", "enable", "disable", "list"}));
  bitmap_cmd->add_option("image", ba.image, "qcow2 image")->required();
  bitmap_cmd->add_option("name", ba.name, "Bitmap name (all verbs but list)");
  bitmap_cmd->add_option("-g,--granularity", granularity_text,
                         "add: bytes per bit, a power of two from 512 to 2G (default 64K)");
  bitmap_cmd->add_flag("--disable", ba.disabled, "add: create it disabled");
  bitmap_cmd->add_option("--output", output, "list: human or json")
      ->check(CLI::IsMember({"human", "json"}));
  add_repeatable(bitmap_cmd, "--allowed-dir", topt.allowed_dirs,
                 "Confine child images to this directory");

  CreateOptions co;
  std::string create_format, create_opts, backing, backing_format = "auto", size_text;
  auto* create_cmd = app.add_subcommand("create", "Create an image");
  create_cmd->add_option("-f,--format", create_format, "raw, qcow2 or vhd")
      ->required()
      ->check(CLI::IsMember({"raw", "qcow2", "vhd", "vpc"}));
  create_cmd->add_option("-o,--options", create_opts, "key=value[,key=value...]");
  create_cmd->add_option("-b,--backing", backing, "Backing file / parent image");
  create_cmd->add_option("-F,--backing-format", backing_format, "Format of the backing file");
  create_cmd->add_option("file", co.path, "Image file to create")->required();
  create_cmd->add_option("size", size_text, "Virtual size (e.g. 64M, 1G)");

  CLI11_PARSE(app, argc, argv);

  // Before the config is read, so that its errors come in the format asked for.
  if (!sa.log_format.empty()) set_log_format(*parse_log_format(sa.log_format));

  try {
    if (serve_cmd->parsed()) return serve(sa);
    if (reload_cmd->parsed()) {
      signal_reload(reload_pid_file);
      return 0;
    }
    topt.format = *parse_format(tool_format);
    topt.json_output = output == "json";
    if (info_cmd->parsed()) return tool_info(tool_image, topt);
    if (check_cmd->parsed()) return tool_check(tool_image, topt);
    if (map_cmd->parsed()) return tool_map(tool_image, topt);
    if (bitmap_cmd->parsed()) {
      if (!granularity_text.empty()) {
        try {
          ba.granularity = parse_size(granularity_text);
        } catch (const std::exception& e) {
          throw ConfigError("--granularity: " + std::string(e.what()));
        }
      }
      return tool_bitmap(ba, topt);
    }
    if (create_cmd->parsed()) {
      co.format = *parse_format(create_format);
      if (!size_text.empty()) {
        try {
          co.size = parse_size(size_text);
        } catch (const std::exception& e) {
          throw ConfigError("size: " + std::string(e.what()));
        }
      }
      if (!backing.empty()) co.backing = backing;
      auto bf = parse_format(backing_format);
      if (!bf) throw ConfigError("-F: unknown format '" + backing_format + "'");
      co.backing_format = *bf;
      std::string rest = create_opts;
      while (!rest.empty()) {
        auto comma = rest.find(',');
        std::string kv = rest.substr(0, comma);
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
        auto eq = kv.find('=');
        if (eq == std::string::npos) throw ConfigError("-o: '" + kv + "' is not key=value");
        co.options[kv.substr(0, eq)] = kv.substr(eq + 1);
      }
      return tool_create(co);
    }
  } catch (const ConfigError& e) {
    spdlog::error("config: {}", e.what());
    return 1;
  } catch (const ImageError& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const std::system_error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Everything is caught inside, except a failure to set up logging or the
  // parser itself: that still gets a message and an exit code, not an abort.
  try {
    return run_command_line(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "strata: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "strata: unexpected error\n");
  }
  return 1;
}
