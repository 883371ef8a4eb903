// clang-format off
// First, as in every server file: asio.hpp must come before spdlog's headers.
#include "server/server.h"
// clang-format on

#include "server/http_endpoint.h"

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "server/metrics.h"
#include "server/run_on_io.h"

namespace strata {

namespace {

constexpr const char* kMetricsType = "text/plain; version=0.0.4; charset=utf-8";
constexpr const char* kText = "text/plain; charset=utf-8";

// `f`'s result from the network thread, or nullopt when it did not answer
// within HttpEndpoint::kNetworkTimeout (busy, stuck, or stopped: then at
// once, so a scrape during exit does not hold the stop).
template <class F>
auto on_network_thread(asio::io_context& io, F f) -> std::optional<decltype(f())> {
  return run_on_io(io, std::move(f), HttpEndpoint::kNetworkTimeout);
}

void unavailable(httplib::Response& res, const std::string& why) {
  res.status = 503;
  res.set_content(why + "\n", kText);
}

// The formats of the stack from the top: ["qcow2", "raw"] for a qcow2 on a
// raw backing file.
void append_formats(const BlockDevice& d, nlohmann::json& out, int depth) {
  out.push_back(std::string(d.format()));
  if (depth > 64) return;
  for (const auto& c : d.children()) {
    if (c.device && c.role != ChildRole::file) append_formats(*c.device, out, depth + 1);
  }
}

nlohmann::json exports_json(const std::vector<ExportSample>& samples) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : samples) {
    nlohmann::json formats = nlohmann::json::array();
    if (s.device) append_formats(*s.device, formats, 0);
    out.push_back({{"name", s.name},
                   {"format", formats},
                   {"size", s.size},
                   {"read_only", s.read_only},
                   {"clients", s.metrics ? s.metrics->clients() : 0}});
  }
  return out;
}

// Routes with handlers, by method; any other method on them is 405.
constexpr std::array<std::string_view, 4> kGetPaths = {"/metrics", "/healthz", "/readyz",
                                                       "/exports"};
constexpr std::string_view kPostPath = "/reload";

bool known_path(const std::string& path) {
  if (path == kPostPath) return true;
  return std::find(kGetPaths.begin(), kGetPaths.end(), path) != kGetPaths.end();
}

void not_found_or_not_allowed(const httplib::Request& req, httplib::Response& res) {
  if (known_path(req.path)) {
    res.status = 405;
    res.set_header("Allow", req.path == kPostPath ? "POST" : "GET, HEAD");
    res.set_content("method not allowed\n", kText);
  } else {
    res.status = 404;
    res.set_content("not found\n", kText);
  }
}

}  // namespace

bool is_loopback_peer(const std::string& address) {
  return address == "::1" || address.starts_with("127.") || address.starts_with("::ffff:127.");
}

HttpEndpoint::HttpEndpoint(Server& server, const HttpConfig& config)
    : server_(server), http_(std::make_unique<httplib::Server>()) {
  http_->new_task_queue = [] { return new httplib::ThreadPool(kThreads); };
  http_->set_read_timeout(kIoTimeout);
  http_->set_write_timeout(kIoTimeout);
  http_->set_keep_alive_timeout(kIoTimeout.count());
  http_->set_keep_alive_max_count(kKeepAliveRequests);
  http_->set_payload_max_length(kMaxBody);
  http_->set_logger([](const httplib::Request& req, const httplib::Response& res) {
    // Probes come every few seconds: never above debug.
    spdlog::debug("http: {} {} from {} -> {}", req.method, req.path, req.remote_addr, res.status);
  });
  add_routes();
  const std::string& host = config.address;
  const std::string where = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":";
  if (config.port == 0) {
    const int port = http_->bind_to_any_port(host);
    if (port <= 0) throw std::runtime_error("cannot listen for HTTP on " + where + "0");
    port_ = static_cast<uint16_t>(port);
  } else {
    if (!http_->bind_to_port(host, config.port)) {
      throw std::runtime_error("cannot listen for HTTP on " + where + std::to_string(config.port) +
                               " (address in use or not available)");
    }
    port_ = config.port;
  }
  thread_ = std::thread([this] {
    http_->listen_after_bind();
    listener_done_ = true;
  });
  // stop() only stops a listener that runs: wait until it does (or ended).
  while (!http_->is_running() && !listener_done_) std::this_thread::yield();
  spdlog::info("http endpoint on http://{}{}", where, port_);
}

HttpEndpoint::~HttpEndpoint() { stop(); }

void HttpEndpoint::stop() {
  if (!thread_.joinable()) return;
  http_->stop();
  thread_.join();
}

void HttpEndpoint::set_reload(std::function<ReloadResult()> reload) {
  std::lock_guard lock(reload_mu_);
  reload_ = std::move(reload);
}

void HttpEndpoint::add_routes() {
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    auto samples = on_network_thread(server_.io(), [this] { return server_.export_samples(); });
    if (!samples) return unavailable(res, "the network thread did not answer");
    res.set_content(render_metrics(server_.metrics(), *samples), kMetricsType);
  });
  http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    if (!on_network_thread(server_.io(), [] { return true; })) {
      return unavailable(res, "the network thread did not answer");
    }
    res.set_content("ok\n", kText);
  });
  http_->Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    auto why = on_network_thread(server_.io(), [this] { return server_.not_ready_reason(); });
    if (!why) return unavailable(res, "the network thread did not answer");
    if (!why->empty()) return unavailable(res, *why);
    res.set_content("ready\n", kText);
  });
  http_->Get("/exports", [this](const httplib::Request&, httplib::Response& res) {
    auto samples = on_network_thread(server_.io(), [this] { return server_.export_samples(); });
    if (!samples) return unavailable(res, "the network thread did not answer");
    res.set_content(exports_json(*samples).dump() + "\n", "application/json");
  });
  http_->Post(std::string(kPostPath), [this](const httplib::Request& req, httplib::Response& res) {
    if (!is_loopback_peer(req.remote_addr)) {
      res.status = 403;
      return res.set_content("reload is only taken from the loopback\n", kText);
    }
    std::function<ReloadResult()> reload;
    {
      std::lock_guard lock(reload_mu_);
      reload = reload_;
    }
    if (!reload) {
      res.status = 501;
      return res.set_content("reload is not available\n", kText);
    }
    const ReloadResult r = reload();
    res.status = r.applied ? 200 : 409;
    res.set_content(r.message + "\n", kText);
  });
  http_->Get(".*", not_found_or_not_allowed);
  http_->Post(".*", not_found_or_not_allowed);
  http_->Put(".*", not_found_or_not_allowed);
  http_->Patch(".*", not_found_or_not_allowed);
  http_->Delete(".*", not_found_or_not_allowed);
  http_->Options(".*", not_found_or_not_allowed);
}

}  // namespace strata
