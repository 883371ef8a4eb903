// The server: listeners (TCP v4/v6, unix sockets) and handshakes on one
// network io_context, the export registry, the connection limit, the memory
// bound shared by all connections, and graceful shutdown on SIGTERM/SIGINT
// (stop accepting, finish requests being executed, answer the rest
// ESHUTDOWN, give clients limits.drain_timeout_ms to read their replies,
// flush every export, exit 0). Listeners are bound from the config, or, under
// socket activation, adopted from the service manager instead (then the
// configured ones are not bound and the adopted ones take the top-level TLS).
#pragma once

#include <asio.hpp>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "server/exports.h"
#include "server/memory_budget.h"
#include "server/socket_activation.h"
#include "server/tls.h"

namespace strata {

class Connection;

class Server {
 public:
  // `activated`: the sockets passed by socket activation
  // (take_activated_sockets()); when there are any, they are the listeners.
  explicit Server(Config config, std::vector<ActivatedSocket> activated = {});
  ~Server();

  // Binds every configured listener, or adopts the activated sockets (throws
  // std::system_error naming the address or the fd).
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
  asio::io_context& io() { return io_; }
  // Human-readable URIs of the listeners, for the start-up message.
  std::vector<std::string> uris() const;

  // Connection bookkeeping (network thread).
  void connection_closed(uint64_t id);

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

  template <class Acceptor>
  asio::awaitable<void> accept_loop(Acceptor& acceptor, std::string what, ListenerTls tls);
  void begin_shutdown();
  void drain_timed_out();

  Config config_;
  MemoryBudget memory_;
  asio::io_context io_{1};
  asio::steady_timer drain_timer_{io_};
  std::unique_ptr<ExportRegistry> exports_;
  std::vector<ActivatedSocket> activated_;
  // By config_.listeners index; under socket activation one entry, the
  // top-level TLS every adopted socket uses.
  std::vector<ListenerTls> listener_tls_;
  std::vector<std::pair<std::unique_ptr<asio::ip::tcp::acceptor>, ListenerTls>> tcp_;
  std::vector<std::pair<std::unique_ptr<asio::local::stream_protocol::acceptor>, ListenerTls>>
      unix_;
  std::vector<std::string> unix_paths_;  // bound by us: unlinked at exit
  asio::signal_set signals_;
  std::map<uint64_t, std::weak_ptr<Connection>> connections_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  std::atomic<bool> stop_requested_{false};
};

}  // namespace strata
