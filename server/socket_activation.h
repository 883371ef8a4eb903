// Socket activation as systemd defines it (sd_listen_fds(3)): a service
// manager (systemd, systemd-socket-activate, libnbd's [ CMD ] form) binds the
// listening sockets itself and passes them as fds 3..3+LISTEN_FDS-1, with
// LISTEN_PID naming the process they are meant for and LISTEN_FDNAMES
// (optional, colon-separated) naming each one. The server then accepts on
// those instead of binding its own listeners.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace strata {

// The first fd passed (SD_LISTEN_FDS_START).
inline constexpr int kFirstActivatedFd = 3;
// More than this many is a broken environment, not a deployment.
inline constexpr unsigned kMaxActivatedFds = 64;

struct ActivatedSocket {
  int fd = -1;
  std::string name;  // from LISTEN_FDNAMES; empty when not given
};

// The sockets the environment hands to process `self`. LISTEN_PID unset or
// another process's pid: none (a variable inherited from a parent that was
// activated itself). LISTEN_PID ours with LISTEN_FDS missing, not a number,
// 0 or above kMaxActivatedFds, or LISTEN_FDNAMES with a different count of
// names: throws std::runtime_error saying which. Pure: reads nothing but
// its arguments.
std::vector<ActivatedSocket> parse_listen_env(std::optional<std::string_view> listen_pid,
                                              std::optional<std::string_view> listen_fds,
                                              std::optional<std::string_view> listen_fdnames,
                                              pid_t self);

// Reads LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES for this process, unsets them
// (always, as sd_listen_fds(1) does, so that no child inherits them) and
// marks every fd passed close-on-exec. Throws std::runtime_error for a bad
// environment or an fd that is not open.
std::vector<ActivatedSocket> take_activated_sockets();

}  // namespace strata
