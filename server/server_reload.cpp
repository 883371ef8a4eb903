// Server::reload and the retirement of the exports it takes out (the rules
// are in server/server.h and docs/OPERATIONS.md, "Reload").
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "formats/errors.h"
#include "server/connection.h"
#include "server/reload_plan.h"
#include "server/run_on_io.h"
#include "server/server.h"

namespace strata {

namespace {

// How long request_reload() waits for the network thread: opening images
// can take a while, a stopped loop never answers.
constexpr auto kReloadWait = std::chrono::seconds(60);
// How often a deferred open looks again for a retired image a scrape still
// holds.
constexpr auto kImageClosedPoll = std::chrono::milliseconds(10);

const ExportConfig& entry(const Config& c, const std::string& name) {
  return *std::find_if(c.exports.begin(), c.exports.end(),
                       [&](const ExportConfig& e) { return e.name == name; });
}

// The open that checks an export whose image a retiring export still locks:
// read-only and without locks (like qemu-img -U), so it changes nothing.
OpenOptions check_only(const ExportConfig& cfg) {
  OpenOptions o = cfg.open_options();
  o.read_only = true;
  o.lock = false;
  return o;
}

}  // namespace

ReloadResult Server::refuse_reload(const std::string& why) {
  spdlog::warn("reload refused: {}; the running configuration stays", why);
  return {.applied = false, .message = "refused: " + why};
}

Config Server::running_exports() const {
  Config c = config_;
  c.exports.clear();
  for (const auto& e : exports_->exports()) c.exports.push_back(e->config);
  c.exports.insert(c.exports.end(), deferred_.begin(), deferred_.end());
  return c;
}

ReloadResult Server::request_reload() {
  auto result = run_on_io(
      io_, [this] { return reload(); }, kReloadWait);
  if (!result) return {.applied = false, .message = "refused: the server did not run the reload"};
  return *result;
}

void Server::wait_for_sighup() {
  reload_signals_.async_wait([this](std::error_code ec, int) {
    if (ec || stopping_) return;
    spdlog::info("received SIGHUP: reloading the configuration");
    reload();
    wait_for_sighup();
  });
}

ReloadResult Server::reload() {
  if (!config_source_) {
    return refuse_reload(
        "the server was started without --config, there is no configuration file to re-read");
  }
  if (stopping_) return refuse_reload("the server is shutting down");
  if (!retiring_.empty() || !deferred_.empty()) {
    return refuse_reload("the previous reload is still draining " +
                         std::to_string(retiring_.size()) + " export(s)");
  }
  Config next;
  try {
    next = config_source_();
  } catch (const std::exception& e) {
    return refuse_reload(std::string("config: ") + e.what());
  }
  const ReloadPlan plan = plan_reload(running_exports(), next);
  if (!plan.needs_restart.empty()) {
    std::string what;
    for (const auto& n : plan.needs_restart) what += (what.empty() ? "" : ", ") + n;
    return refuse_reload(what + " changed, which only a restart applies");
  }
  std::vector<ListenerTls> tls;
  try {
    tls = load_listener_tls(next);
  } catch (const std::exception& e) {
    return refuse_reload(std::string("TLS: ") + e.what());
  }

  // Every new image is opened (or, where a retiring export holds its lock,
  // checked) before anything changes: a bad one refuses the whole reload.
  const bool retires = !plan.removed.empty() || !plan.changed.empty();
  std::vector<std::shared_ptr<Export>> opened;
  std::vector<ExportConfig> deferred;
  std::vector<std::string> fresh = plan.added;
  fresh.insert(fresh.end(), plan.changed.begin(), plan.changed.end());
  for (const std::string& name : fresh) {
    const ExportConfig& cfg = entry(next, name);
    try {
      try {
        opened.push_back(open_export(cfg));
      } catch (const ImageInUseError&) {
        if (!retires) throw;
        open_export(cfg, check_only(cfg));
        deferred.push_back(cfg);
      }
    } catch (const std::exception& e) {
      return refuse_reload(e.what());
    }
  }

  // Commit. Only the fields a reload may change are assigned: connections
  // read the limits through a reference from other threads.
  config_.exports = next.exports;
  config_.tls = next.tls;
  config_.listeners = next.listeners;
  config_.log_level = next.log_level;
  listener_tls_ = std::move(tls);
  spdlog::set_level(spdlog::level::from_str(next.log_level));
  std::vector<std::shared_ptr<Export>> keep = opened;
  for (const std::string& name : plan.unchanged) keep.push_back(exports_->by_name(name));
  std::vector<std::shared_ptr<Export>> out;
  for (const std::string& name : plan.removed) out.push_back(exports_->by_name(name));
  for (const std::string& name : plan.changed) out.push_back(exports_->by_name(name));
  deferred_ = std::move(deferred);
  failed_.clear();
  order_registry(std::move(keep));
  for (const auto& e : opened) log_opened(*e);
  spdlog::info("reload applied: {}{}", summary(plan),
               deferred_.empty() ? ""
                                 : "; " + std::to_string(deferred_.size()) +
                                       " export(s) open once their old image has closed");
  if (!plan.added.empty() || !plan.changed.empty()) warn_if_exposed_listeners();
  for (auto& e : out) retire(std::move(e));
  // Clients that do not read their replies are not waited for forever.
  retire_timer_.expires_after(std::chrono::milliseconds(config_.limits.drain_timeout_ms));
  retire_timer_.async_wait([this](std::error_code ec) {
    if (!ec) abort_retiring_clients();
  });
  finish_retirements();
  return {.applied = true, .message = "applied: " + summary(plan)};
}

void Server::warn_if_exposed_listeners() const {
  if (!activated_.empty()) return;  // adopted sockets were warned about at start-up
  for (const auto& [acceptor, index] : tcp_) {
    std::error_code ec;
    const auto ep = acceptor->local_endpoint(ec);
    if (!ec) warn_if_exposed(config_.listeners[index], ep.port());
  }
}

void Server::order_registry(std::vector<std::shared_ptr<Export>> open) {
  std::vector<std::shared_ptr<Export>> ordered;
  for (const ExportConfig& cfg : config_.exports) {
    auto it = std::find_if(open.begin(), open.end(),
                           [&](const auto& e) { return e->config.name == cfg.name; });
    if (it != open.end()) ordered.push_back(*it);
  }
  exports_->replace(std::move(ordered));
}

std::vector<std::shared_ptr<Connection>> Server::clients_of(const Export& e) const {
  std::vector<std::shared_ptr<Connection>> out;
  for (const auto& [id, weak] : connections_) {
    auto c = weak.lock();
    if (c && c->chosen_export() == &e) out.push_back(std::move(c));
  }
  return out;
}

void Server::retire(std::shared_ptr<Export> e) {
  const auto clients = clients_of(*e);
  for (const auto& c : clients) c->shutdown();
  spdlog::info("export '{}': no longer offered, {} client(s) to drain", e->config.name,
               clients.size());
  retiring_images_.push_back(e->device);
  retiring_.push_back(std::move(e));
}

void Server::abort_retiring_clients() {
  for (const auto& e : retiring_) {
    for (const auto& c : clients_of(*e)) c->abort();
  }
}

void Server::finish_retirements() {
  std::erase_if(retiring_, [this](const std::shared_ptr<Export>& e) {
    if (!clients_of(*e).empty()) return false;
    if (!e->caps.read_only) {
      if (int r = e->device->flush()) {
        spdlog::error("export '{}': flush before closing failed: {}", e->config.name,
                      std::strerror(r));
      }
    }
    auto stats = e->device->stats();
    if (!stats.empty()) spdlog::info("export '{}': {}", e->config.name, stats);
    spdlog::info("export '{}': closed", e->config.name);
    return true;
  });
  if (!retiring_.empty()) return;
  retire_timer_.cancel();
  open_deferred();
}

void Server::open_deferred() {
  std::erase_if(retiring_images_, [](const auto& w) { return w.expired(); });
  if (deferred_.empty() || stopping_) {
    if (!stopping_) retiring_images_.clear();
    return;
  }
  if (!retiring_images_.empty()) {
    // A scrape still reads an old image's counters; it lets go soon.
    deferred_timer_.expires_after(kImageClosedPoll);
    deferred_timer_.async_wait([this](std::error_code ec) {
      if (!ec) open_deferred();
    });
    return;
  }
  std::vector<std::shared_ptr<Export>> open = exports_->exports();
  for (const ExportConfig& cfg : deferred_) {
    try {
      open.push_back(open_export(cfg));
      log_opened(*open.back());
    } catch (const std::exception& e) {
      failed_.push_back(std::string("reload: ") + e.what());
      spdlog::error(
          "reload: export '{}' cannot be opened now that its old image has closed, it "
          "is not served: {}",
          cfg.name, e.what());
    }
  }
  deferred_.clear();
  order_registry(std::move(open));
}

}  // namespace strata
