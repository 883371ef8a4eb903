#include "server/server.h"

#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/experimental/as_tuple.hpp>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "server/connection.h"
#include "server/http_endpoint.h"

namespace strata {

namespace {

std::string octal(uint32_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", mode);
  return buf;
}

// The gid a listener's "group" names (config/config.h checked its syntax).
gid_t resolve_group(const std::string& group, const std::string& path) {
  if (group.find_first_not_of("0123456789") == std::string::npos) {
    return static_cast<gid_t>(std::stoul(group));
  }
  std::vector<char> buf(16384);
  struct group entry;
  struct group* found = nullptr;
  const int r = ::getgrnam_r(group.c_str(), &entry, buf.data(), buf.size(), &found);
  if (r != 0 || found == nullptr) {
    throw std::runtime_error("unix socket " + path + ": group '" + group +
                             "' is not known on this host (give a numeric gid)");
  }
  return found->gr_gid;
}

// Gives a just-bound socket its configured group, then its mode. The socket
// was created under umask 0177 (owner only), so no client could connect to
// it with wider rights in between. Only the path can carry the rights (a
// socket fd's fchmod does not reach the file), so the path is checked to
// still be a socket and not followed if it became a symlink.
void apply_socket_permissions(const ListenerConfig& l) {
  struct stat st {};
  if (::lstat(l.path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) {
    throw std::runtime_error("unix socket " + l.path +
                             " was removed or replaced right after it was bound");
  }
  if (!l.group.empty()) {
    const gid_t gid = resolve_group(l.group, l.path);
    if (::lchown(l.path.c_str(), static_cast<uid_t>(-1), gid) != 0) {
      const int err = errno;
      std::string hint;
      if (err == EPERM) {
        hint = ": the server's user (uid " + std::to_string(::geteuid()) +
               ") must be a member of that group (podman/docker run --group-add " +
               std::to_string(gid) + "; Kubernetes securityContext.fsGroup or supplementalGroups)";
      }
      throw std::system_error(err, std::generic_category(),
                              "cannot give unix socket " + l.path + " to group '" + l.group +
                                  "' (gid " + std::to_string(gid) + ")" + hint);
    }
  }
  const uint32_t mode = l.mode.value_or(0777 & ~0177);
  if (::chmod(l.path.c_str(), static_cast<mode_t>(mode)) != 0) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot set mode " + octal(mode) + " on unix socket " + l.path);
  }
}

// What to do about a unix socket that cannot be bound, for the errors a
// container meets: a read-only root file system, a directory not mounted,
// a volume owned by someone else.
std::string unix_bind_hint(const std::error_code& ec, const std::string& path) {
  const std::string dir = std::filesystem::path(path).parent_path().string();
  if (ec == std::errc::read_only_file_system) {
    return " (" + dir + " is on a read-only file system: mount a writable directory there, " +
           "e.g. a tmpfs or an emptyDir volume)";
  }
  if (ec == std::errc::no_such_file_or_directory) return " (" + dir + " does not exist)";
  if (ec == std::errc::permission_denied) {
    return " (" + dir + " is not writable by uid " + std::to_string(::geteuid()) + ")";
  }
  return "";
}

// Restores the umask it replaced when it goes (umask is per process: this
// runs before any other thread creates files).
class ScopedUmask {
 public:
  explicit ScopedUmask(mode_t mask) : old_(::umask(mask)) {}
  ~ScopedUmask() { ::umask(old_); }
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

 private:
  mode_t old_;
};

}  // namespace

Server::Server(Config config, std::vector<ActivatedSocket> activated)
    : config_(std::move(config)),
      memory_(config_.limits.max_total_inflight_bytes),
      io_threads_(config_.limits.max_io_threads),
      activated_(std::move(activated)),
      signals_(io_, SIGINT, SIGTERM),
      reload_signals_(io_, SIGHUP) {
  // Credentials first: a bad key or certificate is refused before any
  // image is opened.
  listener_tls_ = load_listener_tls(config_);
  exports_ = std::make_unique<ExportRegistry>(config_.exports);
  metrics_.io_threads = &io_threads_;
}

std::vector<Server::ListenerTls> Server::load_listener_tls(const Config& config) const {
  // Listeners that inherit the top-level settings share one set of
  // credentials: each file is read and checked once.
  std::vector<ListenerTls> out;
  if (!activated_.empty()) {
    out.push_back(load_tls(config.tls));
    return out;
  }
  for (size_t i = 0; i < config.listeners.size(); ++i) {
    size_t same = 0;
    while (config.listeners[same].tls != config.listeners[i].tls) ++same;
    out.push_back(same < i ? out[same] : load_tls(config.listeners[i].tls));
  }
  return out;
}

Server::ListenerTls Server::load_tls(const TlsConfig& config) {
  ListenerTls t;
  switch (config.mode) {
    case TlsMode::off:
      return t;
    case TlsMode::on:
      t.policy = nbd::TlsPolicy::kOptional;
      break;
    case TlsMode::require:
      t.policy = nbd::TlsPolicy::kRequired;
      break;
  }
  t.credentials = TlsCredentials::load(config);
  return t;
}

void Server::warn_if_exposed(const ListenerConfig& l, uint16_t port) const {
  // Under TLS mode "on", exports without tls_required are open to plain
  // clients too.
  if (is_loopback(l) || l.tls.mode == TlsMode::require) return;
  std::string writable;
  for (const auto& e : config_.exports) {
    if (e.read_only || (l.tls.mode == TlsMode::on && e.tls_required)) continue;
    writable += (writable.empty() ? "'" : ", '") + e.name + "'";
  }
  if (writable.empty()) return;
  spdlog::warn(
      "listening on {}:{} without TLS for writable exports {} (plain-text clients may use "
      "them): anyone who can reach this address can read and write them. Require TLS "
      "(--tls=require with --tls-certificates DIR or --tls-psk FILE, or tls_required on the "
      "export) or bind to 127.0.0.1",
      l.address, port, writable);
}

Server::~Server() {
  http_.reset();
  for (const auto& p : unix_paths_) ::unlink(p.c_str());
}

void Server::listen() {
  if (activated_.empty()) {
    bind_configured();
  } else {
    adopt_activated();
  }
  if (config_.http.enabled) {
    http_ = std::make_unique<HttpEndpoint>(*this, config_.http);
    http_->set_reload(reload_hook_ ? reload_hook_ : [this] { return request_reload(); });
  }
  listening_ = true;
}

uint16_t Server::http_port() const { return http_ ? http_->port() : 0; }

std::vector<ExportSample> Server::export_samples() const {
  std::vector<ExportSample> out;
  for (const auto& e : exports_->exports()) {
    out.push_back({.name = e->config.name,
                   .size = e->view.size,
                   .read_only = e->caps.read_only,
                   .metrics = e->metrics,
                   .device = e->device});
  }
  return out;
}

std::string Server::not_ready_reason() const {
  if (stopping_) {
    return "shutting down: " + std::to_string(connections_.size()) + " connection(s) to finish";
  }
  if (!listening_) return "the listeners are not bound yet";
  if (exports_->exports().empty()) return "no export is open";
  if (!deferred_.empty()) {
    return "export '" + deferred_.front().name + "' is being replaced by a reload";
  }
  if (!failed_.empty()) return failed_.front();
  return {};
}

void Server::bind_configured() {
  for (size_t i = 0; i < config_.listeners.size(); ++i) {
    const auto& l = config_.listeners[i];
    if (l.kind == ListenerConfig::Kind::tcp) {
      std::error_code ec;
      auto addr = asio::ip::make_address(l.address, ec);
      if (ec) throw std::system_error(ec, "listener address '" + l.address + "'");
      asio::ip::tcp::endpoint ep(addr, l.port);
      auto a = std::make_unique<asio::ip::tcp::acceptor>(io_);
      a->open(ep.protocol());
      a->set_option(asio::socket_base::reuse_address(true));
      if (addr.is_v6()) a->set_option(asio::ip::v6_only(false), ec);
      a->bind(ep, ec);
      if (ec) {
        throw std::system_error(ec, "cannot listen on " + l.address + ":" + std::to_string(l.port));
      }
      a->listen(asio::socket_base::max_listen_connections);
      spdlog::info("listening on {}:{} (TLS {})", l.address, a->local_endpoint().port(),
                   to_string(l.tls.mode));
      warn_if_exposed(l, a->local_endpoint().port());
      tcp_.emplace_back(std::move(a), i);
    } else {
      std::error_code ec;
      struct stat st;
      if (::stat(l.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(l.path.c_str());
      auto a = std::make_unique<asio::local::stream_protocol::acceptor>(io_);
      asio::local::stream_protocol::endpoint ep(l.path);
      a->open(ep.protocol());
      const bool own_permissions = l.mode || !l.group.empty();
      {
        std::optional<ScopedUmask> owner_only;
        if (own_permissions) owner_only.emplace(0177);
        a->bind(ep, ec);
      }
      if (ec) {
        throw std::system_error(
            ec, "cannot listen on unix socket " + l.path + unix_bind_hint(ec, l.path));
      }
      unix_paths_.push_back(l.path);
      if (own_permissions) apply_socket_permissions(l);
      a->listen(asio::socket_base::max_listen_connections);
      if (own_permissions) {
        struct stat bound {};
        ::lstat(l.path.c_str(), &bound);
        spdlog::info("listening on unix socket {} (mode {}, gid {}, TLS {})", l.path,
                     octal(bound.st_mode & 07777), bound.st_gid, to_string(l.tls.mode));
      } else {
        spdlog::info("listening on unix socket {} (TLS {})", l.path, to_string(l.tls.mode));
      }
      unix_.emplace_back(std::move(a), i);
    }
  }
}

void Server::adopt_activated() {
  std::string skipped;
  for (const auto& l : config_.listeners) {
    skipped += skipped.empty() ? "" : ", ";
    skipped += l.kind == ListenerConfig::Kind::tcp ? l.address + ":" + std::to_string(l.port)
                                                   : "unix socket " + l.path;
  }
  spdlog::info(
      "socket activation: {} listening socket(s) passed in; the configured listeners ({}) are "
      "not bound",
      activated_.size(), skipped);
  for (const auto& s : activated_) {
    const std::string what =
        "fd " + std::to_string(s.fd) + (s.name.empty() ? "" : " (" + s.name + ")");
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int type = 0;
    int listening = 0;
    socklen_t optlen = sizeof type;
    if (::getsockname(s.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        ::getsockopt(s.fd, SOL_SOCKET, SO_TYPE, &type, &optlen) != 0) {
      throw std::system_error(errno, std::generic_category(),
                              "socket activation: " + what + " is not a socket");
    }
    optlen = sizeof listening;
    if (type != SOCK_STREAM ||
        ::getsockopt(s.fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || !listening) {
      throw std::runtime_error("socket activation: " + what +
                               " is not a listening stream socket (use Accept=no)");
    }
    if (addr.ss_family == AF_INET || addr.ss_family == AF_INET6) {
      auto a = std::make_unique<asio::ip::tcp::acceptor>(io_);
      a->assign(addr.ss_family == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), s.fd);
      const auto ep = a->local_endpoint();
      ListenerConfig l;
      l.address = ep.address().to_string();
      l.port = ep.port();
      l.tls = config_.tls;
      spdlog::info("listening on {}:{} ({}, TLS {})", l.address, l.port, what,
                   to_string(l.tls.mode));
      warn_if_exposed(l, l.port);
      tcp_.emplace_back(std::move(a), 0);
    } else if (addr.ss_family == AF_UNIX) {
      auto a = std::make_unique<asio::local::stream_protocol::acceptor>(io_);
      a->assign(asio::local::stream_protocol(), s.fd);
      std::string path = a->local_endpoint().path();
      if (path.empty() || path.front() == '\0') path = "(unnamed)";
      spdlog::info("listening on unix socket {} ({}, TLS {})", path, what,
                   to_string(config_.tls.mode));
      unix_.emplace_back(std::move(a), 0);
    } else {
      throw std::runtime_error("socket activation: " + what +
                               " is neither a TCP nor a unix socket");
    }
  }
}

std::vector<std::string> Server::uris() const {
  std::vector<std::string> out;
  std::string name = config_.exports.front().name;
  for (const auto& [a, tls] : tcp_) {
    auto ep = a->local_endpoint();
    std::string host = ep.address().to_string();
    if (ep.address().is_unspecified()) host = "localhost";
    if (ep.address().is_v6() && host != "localhost") host = "[" + host + "]";
    const char* scheme =
        listener_tls_[tls].policy == nbd::TlsPolicy::kRequired ? "nbds://" : "nbd://";
    out.push_back(scheme + host + ":" + std::to_string(ep.port()) + "/" + name);
  }
  for (const auto& [a, tls] : unix_) {
    std::error_code ec;
    const std::string p = a->local_endpoint(ec).path();
    if (ec || p.empty() || p.front() == '\0') continue;  // abstract or unnamed
    out.push_back("nbd+unix:///" + name + "?socket=" + p);
  }
  return out;
}

template <class Acceptor>
asio::awaitable<void> Server::accept_loop(Acceptor& acceptor, std::string what, size_t tls_index) {
  for (;;) {
    auto [ec, sock] =
        co_await acceptor.async_accept(asio::experimental::as_tuple(asio::use_awaitable));
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping_) co_return;
      spdlog::warn("accept on {} failed: {}", what, ec.message());
      continue;
    }
    std::string peer = what;
    if constexpr (std::is_same_v<Acceptor, asio::ip::tcp::acceptor>) {
      std::error_code ignored;
      sock.set_option(asio::ip::tcp::no_delay(true), ignored);
      auto ep = sock.remote_endpoint(ignored);
      peer = ep.address().to_string() + ":" + std::to_string(ep.port());
    }
    if (connections_.size() >= config_.limits.max_connections) {
      bump(metrics_.connections_refused);
      spdlog::warn("refusing connection from {}: limit of {} connections reached", peer,
                   config_.limits.max_connections);
      std::error_code ignored;
      sock.close(ignored);
      continue;
    }
    uint64_t id = next_id_++;
    const ListenerTls& tls = listener_tls_[tls_index];
    auto conn = std::make_shared<Connection>(*this, Connection::Socket(std::move(sock)), id, peer,
                                             tls.policy, tls.credentials);
    connections_[id] = conn;
    bump(metrics_.connections_total);
    bump(metrics_.connections_open);
    asio::co_spawn(io_, Connection::run(conn), asio::detached);
  }
}

void Server::connection_closed(uint64_t id) {
  if (connections_.erase(id)) metrics_.connections_open.fetch_sub(1, std::memory_order_relaxed);
  if (!retiring_.empty()) finish_retirements();
  if (stopping_ && connections_.empty()) io_.stop();
}

void Server::stop() {
  stop_requested_ = true;
  asio::post(io_, [this] { begin_shutdown(); });
}

void Server::begin_shutdown() {
  if (stopping_) return;
  stopping_ = true;
  spdlog::info("shutting down: {} connection(s) to finish", connections_.size());
  std::error_code ec;
  for (auto& [a, tls] : tcp_) a->close(ec);
  for (auto& [a, tls] : unix_) a->close(ec);
  signals_.cancel(ec);
  reload_signals_.cancel(ec);
  deferred_timer_.cancel();
  retire_timer_.cancel();
  for (auto& [id, weak] : connections_) {
    if (auto c = weak.lock()) c->shutdown();
  }
  if (connections_.empty()) {
    io_.stop();
    return;
  }
  drain_timer_.expires_after(std::chrono::milliseconds(config_.limits.drain_timeout_ms));
  drain_timer_.async_wait([this](std::error_code ec) {
    if (!ec) drain_timed_out();
  });
}

void Server::drain_timed_out() {
  spdlog::warn(
      "shutting down: {} connection(s) still owed replies after the drain timeout of {} ms, "
      "closing them",
      connections_.size(), config_.limits.drain_timeout_ms);
  for (auto& [id, weak] : connections_) {
    if (auto c = weak.lock()) c->abort();
  }
}

int Server::run() {
  signals_.async_wait([this](std::error_code ec, int sig) {
    if (ec) return;
    spdlog::info("received signal {}", sig);
    begin_shutdown();
  });
  wait_for_sighup();
  for (auto& [a, tls] : tcp_) asio::co_spawn(io_, accept_loop(*a, "tcp", tls), asio::detached);
  for (auto& [a, tls] : unix_) asio::co_spawn(io_, accept_loop(*a, "unix", tls), asio::detached);
  io_.run();
  // Probes would only time out from here on.
  if (http_) http_->stop();
  int status = 0;
  std::vector<std::shared_ptr<Export>> open = exports_->exports();
  open.insert(open.end(), retiring_.begin(), retiring_.end());
  for (auto& e : open) {
    if (e->caps.read_only) continue;
    if (int r = e->device->flush()) {
      spdlog::error("export '{}': final flush failed: {}", e->config.name, std::strerror(r));
      status = 1;
    }
    auto stats = e->device->stats();
    if (!stats.empty()) spdlog::info("export '{}': {}", e->config.name, stats);
  }
  spdlog::info("stopped");
  return status;
}

}  // namespace strata
