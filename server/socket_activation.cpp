#include "server/socket_activation.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace strata {

namespace {

// A decimal number with nothing around it (no sign, no spaces), as the
// service manager writes it.
std::optional<unsigned long> parse_decimal(std::string_view s) {
  unsigned long v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return v;
}

std::vector<std::string> split_names(std::string_view s) {
  std::vector<std::string> out;
  for (;;) {
    auto colon = s.find(':');
    out.emplace_back(s.substr(0, colon));
    if (colon == std::string_view::npos) return out;
    s.remove_prefix(colon + 1);
  }
}

std::optional<std::string_view> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string_view(v);
}

}  // namespace

std::vector<ActivatedSocket> parse_listen_env(std::optional<std::string_view> listen_pid,
                                              std::optional<std::string_view> listen_fds,
                                              std::optional<std::string_view> listen_fdnames,
                                              pid_t self) {
  if (!listen_pid) return {};
  auto pid = parse_decimal(*listen_pid);
  if (!pid || *pid != static_cast<unsigned long>(self)) return {};
  if (!listen_fds) throw std::runtime_error("socket activation: LISTEN_PID is set, LISTEN_FDS not");
  auto n = parse_decimal(*listen_fds);
  if (!n || *n == 0 || *n > kMaxActivatedFds) {
    throw std::runtime_error("socket activation: LISTEN_FDS='" + std::string(*listen_fds) +
                             "' is not a number of sockets from 1 to " +
                             std::to_string(kMaxActivatedFds));
  }
  std::vector<std::string> names;
  if (listen_fdnames) {
    names = split_names(*listen_fdnames);
    if (names.size() != *n) {
      throw std::runtime_error("socket activation: LISTEN_FDNAMES names " +
                               std::to_string(names.size()) + " sockets, LISTEN_FDS says " +
                               std::to_string(*n));
    }
  }
  std::vector<ActivatedSocket> out;
  for (unsigned long i = 0; i < *n; ++i) {
    out.push_back({kFirstActivatedFd + static_cast<int>(i), names.empty() ? "" : names[i]});
  }
  return out;
}

std::vector<ActivatedSocket> take_activated_sockets() {
  // Copied before the variables are unset: getenv's pointers die with them.
  auto copy = [](std::optional<std::string_view> v) -> std::optional<std::string> {
    if (!v) return std::nullopt;
    return std::string(*v);
  };
  const auto pid = copy(env("LISTEN_PID"));
  const auto fds = copy(env("LISTEN_FDS"));
  const auto names = copy(env("LISTEN_FDNAMES"));
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  auto view = [](const std::optional<std::string>& v) -> std::optional<std::string_view> {
    if (!v) return std::nullopt;
    return std::string_view(*v);
  };
  auto sockets = parse_listen_env(view(pid), view(fds), view(names), ::getpid());
  for (const auto& s : sockets) {
    const int flags = ::fcntl(s.fd, F_GETFD);
    if (flags == -1 || ::fcntl(s.fd, F_SETFD, flags | FD_CLOEXEC) == -1) {
      throw std::runtime_error("socket activation: fd " + std::to_string(s.fd) +
                               " (LISTEN_FDS) is not usable: " + std::strerror(errno));
    }
  }
  return sockets;
}

}  // namespace strata
