// The server: listeners (TCP v4/v6, unix sockets) and handshakes on one
// network io_context, the export registry, the connection limit, the memory
// bound shared by all connections, and graceful shutdown on SIGTERM/SIGINT
// (stop accepting, finish requests being executed, answer the rest
// ESHUTDOWN, give clients limits.drain_timeout_ms to read their replies,
// flush every export, exit 0). Listeners are bound from the config, or, under
// socket activation, adopted from the service manager instead (then the
// configured ones are not bound and the adopted ones take the top-level TLS).
// With config.http enabled, the HTTP endpoint for metrics and probes
// (server/http_endpoint.h) is bound next to the listeners and stopped when
// the network thread has finished.
//
// Reload (SIGHUP, POST /reload; docs/OPERATIONS.md "Reload"): runs on the
// network thread, which owns the registry, the connection map and the
// listeners' TLS, so none of them needs a lock. The new config is read
// through the config source, checked whole (reload_plan.h), its TLS
// credentials loaded and its new and changed exports opened before anything
// is committed; any failure refuses it and the running config stays.
// Exports taken out (removed or changed) retire: their connections drain as
// on SIGTERM, each flushes, and once the last has closed the export is
// flushed and dropped, which closes its image and releases its locks. A new
// image that cannot be locked while an export that retires still holds it
// (same path, read-only flipped) is checked by an unlocked read-only open
// before the commit and opened for real once every retiring image has
// closed: never two writers of one image, at the price of a short window in
// which that export is not offered. Transmission threads see none of this:
// their connection holds its Export.
#pragma once

#include <asio.hpp>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "server/exports.h"
#include "server/io_threads.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/reload_result.h"
#include "server/socket_activation.h"
#include "server/tls.h"

namespace strata {

class Connection;
class HttpEndpoint;

class Server {
 public:
  // `activated`: the sockets passed by socket activation
  // (take_activated_sockets()); when there are any, they are the listeners.
  explicit Server(Config config, std::vector<ActivatedSocket> activated = {});
  ~Server();

  // Binds every configured listener, or adopts the activated sockets (throws
  // std::system_error naming the address or the fd), then the HTTP endpoint
  // (throws std::runtime_error naming its address).
  void listen();
  // Runs until a signal (or stop()) and every connection has finished.
  // Returns the process exit status.
  int run();
  // Starts a graceful stop; safe from any thread.
  void stop();

  const Config& config() const { return config_; }
  // True when the listeners are sockets passed in by socket activation.
  bool activated() const { return !activated_.empty(); }
  ExportRegistry& exports() { return *exports_; }
  // Payload bytes held by all connections (limits.max_total_inflight_bytes).
  MemoryBudget& memory() { return memory_; }
  // Transmission threads of all connections (limits.max_io_threads).
  IoThreads& io_threads() { return io_threads_; }
  asio::io_context& io() { return io_; }
  // Human-readable URIs of the listeners, for the start-up message.
  std::vector<std::string> uris() const;

  // Connection bookkeeping (network thread).
  void connection_closed(uint64_t id);

  // Counters any thread may read and add to.
  ServerMetrics& metrics() { return metrics_; }
  // The HTTP endpoint's port, 0 when it is off.
  uint16_t http_port() const;
  // What a scrape needs of every export. Network thread.
  std::vector<ExportSample> export_samples() const;
  // Empty when every export is open, every listener bound and the server is
  // not stopping; else why not. Network thread.
  std::string not_ready_reason() const;
  // What POST /reload on the HTTP endpoint calls; set before listen().
  // Unset: request_reload().
  void set_reload_hook(std::function<ReloadResult()> hook) { reload_hook_ = std::move(hook); }
  // How a reload re-reads the config (the --config file with the command
  // line's options over it); throws ConfigError. Unset: reloads are refused.
  // Set before run(); called on the network thread.
  void set_config_source(std::function<Config()> source) { config_source_ = std::move(source); }
  // Re-reads the config and applies it, or refuses it; logs one line either
  // way. Network thread.
  ReloadResult reload();
  // reload() from any other thread: waits for the network thread to run it.
  ReloadResult request_reload();

 private:
  // What a listener's connections need to know about TLS.
  struct ListenerTls {
    nbd::TlsPolicy policy = nbd::TlsPolicy::kOff;
    std::shared_ptr<const TlsCredentials> credentials;  // null when off
  };
  static ListenerTls load_tls(const TlsConfig& config);
  // The start-up warning for a listener that lets plain-text clients from
  // other hosts write.
  void warn_if_exposed(const ListenerConfig& l, uint16_t port) const;
  void bind_configured();
  void adopt_activated();

  // listener_tls_ for `config`: one entry per listener, or the top-level
  // one under socket activation. Throws naming the file that is bad.
  std::vector<ListenerTls> load_listener_tls(const Config& config) const;

  // `tls`: index into listener_tls_, read at every accept so that a reload's
  // credentials take the next connection.
  template <class Acceptor>
  asio::awaitable<void> accept_loop(Acceptor& acceptor, std::string what, size_t tls);
  void begin_shutdown();
  void drain_timed_out();
  void wait_for_sighup();

  // Reload steps (server/server_reload.cpp), network thread.
  ReloadResult refuse_reload(const std::string& why);
  // The export entries now served or about to be (opened after a retirement).
  Config running_exports() const;
  // The open connections attached to `e`.
  std::vector<std::shared_ptr<Connection>> clients_of(const Export& e) const;
  // Stops the connections of `e` and gives them limits.drain_timeout_ms.
  void retire(std::shared_ptr<Export> e);
  // Drops the retiring exports that no connection uses any more; then, once
  // every retiring image has closed, opens the deferred exports.
  void finish_retirements();
  // The drain timeout of a reload passed: close what still drains.
  void abort_retiring_clients();
  void open_deferred();
  // warn_if_exposed for every bound TCP listener, after exports changed.
  void warn_if_exposed_listeners() const;
  // The registry in config_.exports order, from what is open.
  void order_registry(std::vector<std::shared_ptr<Export>> open);

  Config config_;
  MemoryBudget memory_;
  IoThreads io_threads_;
  asio::io_context io_{1};
  asio::steady_timer drain_timer_{io_};
  std::unique_ptr<ExportRegistry> exports_;
  std::vector<ActivatedSocket> activated_;
  // By config_.listeners index; under socket activation one entry, the
  // top-level TLS every adopted socket uses.
  std::vector<ListenerTls> listener_tls_;
  std::vector<std::pair<std::unique_ptr<asio::ip::tcp::acceptor>, size_t>> tcp_;
  std::vector<std::pair<std::unique_ptr<asio::local::stream_protocol::acceptor>, size_t>> unix_;
  std::vector<std::string> unix_paths_;  // bound by us: unlinked at exit
  asio::signal_set signals_;
  asio::signal_set reload_signals_;  // SIGHUP
  std::map<uint64_t, std::weak_ptr<Connection>> connections_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  bool listening_ = false;
  std::atomic<bool> stop_requested_{false};
  ServerMetrics metrics_;
  std::function<ReloadResult()> reload_hook_;
  std::function<Config()> config_source_;
  // Exports a reload took out whose connections have not all closed yet.
  std::vector<std::shared_ptr<Export>> retiring_;
  // Their images: a deferred export opens once all have expired (a scrape
  // may hold one a moment longer than the export).
  std::vector<std::weak_ptr<BlockDevice>> retiring_images_;
  // Exports whose image opens after the retiring ones closed.
  std::vector<ExportConfig> deferred_;
  // Exports a reload could not open after all; why, for /readyz.
  std::vector<std::string> failed_;
  asio::steady_timer deferred_timer_{io_};
  asio::steady_timer retire_timer_{io_};
  // Last: its handler threads post to io_, so it stops before io_ goes.
  std::unique_ptr<HttpEndpoint> http_;
};

}  // namespace strata
