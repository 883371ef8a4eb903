// The HTTP endpoint for metrics and probes (`--http ADDR:PORT`, the config's
// "http" key; docs/OPERATIONS.md): GET /metrics, /healthz, /readyz, /exports
// and POST /reload, served by cpp-httplib.
//
// Threads: its own listener thread and a fixed pool of kThreads handler
// threads, so a slow or hostile HTTP client never holds up the network
// thread or the NBD requests. Handlers never touch the export registry or
// the connection map, which belong to the network thread: what they need is
// gathered there by a function posted to Server::io(), waited for at most
// kNetworkTimeout (then 503). Counters are atomics and are summed on the
// handler's thread.
//
// Bounds: request line and headers are capped by cpp-httplib (8 KiB each),
// bodies at kMaxBody bytes, reads and writes time out after kIoTimeout, and
// a keep-alive connection serves at most kKeepAliveRequests requests.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "config/config.h"
#include "server/reload_result.h"

namespace httplib {
class Server;
}  // namespace httplib

namespace strata {

class Server;

class HttpEndpoint {
 public:
  static constexpr size_t kThreads = 2;
  static constexpr size_t kMaxBody = 4096;
  static constexpr std::chrono::seconds kIoTimeout{5};
  static constexpr std::chrono::seconds kNetworkTimeout{2};
  static constexpr size_t kKeepAliveRequests = 100;

  // Binds config.address:config.port (throws std::runtime_error naming the
  // address when it cannot) and starts serving; logs the bound URL.
  HttpEndpoint(Server& server, const HttpConfig& config);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // Stops accepting and waits for the handlers in progress; idempotent.
  void stop();
  uint16_t port() const { return port_; }
  // POST /reload calls it (loopback peers only); unset: 501.
  void set_reload(std::function<ReloadResult()> reload);

 private:
  void add_routes();

  Server& server_;
  std::unique_ptr<httplib::Server> http_;
  uint16_t port_ = 0;
  std::mutex reload_mu_;
  std::function<ReloadResult()> reload_;  // under reload_mu_
  std::thread thread_;
  std::atomic<bool> listener_done_{false};
};

// True for a peer address on the loopback: 127.0.0.0/8, ::1 and
// ::ffff:127.0.0.0/104.
bool is_loopback_peer(const std::string& address);

}  // namespace strata
