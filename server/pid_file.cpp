#include "server/pid_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>

namespace strata {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

}  // namespace

PidFile::PidFile(std::string path, long pid) {
  const std::string tmp = path + ".tmp." + std::to_string(pid);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("pid file " + tmp);
  const std::string text = std::to_string(pid) + "\n";
  const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  const int saved = errno;
  if (::close(fd) != 0 || !written) {
    errno = written ? errno : (saved ? saved : EIO);
    ::unlink(tmp.c_str());
    fail("pid file " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    errno = e;
    fail("pid file " + path);
  }
  path_ = std::move(path);
}

PidFile& PidFile::operator=(PidFile&& other) noexcept {
  if (this != &other) {
    if (!path_.empty()) ::unlink(path_.c_str());
    path_ = std::move(other.path_);
    other.path_.clear();
  }
  return *this;
}

PidFile::~PidFile() {
  if (!path_.empty()) ::unlink(path_.c_str());
}

void signal_reload(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error("cannot read pid file " + path + ": " + std::strerror(errno) +
                             " (is the server running with --pid-file " + path + "?)");
  }
  std::stringstream text;
  text << in.rdbuf();
  long pid = 0;
  char rest = 0;
  if (!(text >> pid) || pid <= 1 || (text >> rest)) {
    throw std::runtime_error("pid file " + path + " does not hold a process id");
  }
  // A stale pid may name another program now, which SIGHUP would end.
  std::ifstream cmdline("/proc/" + std::to_string(pid) + "/cmdline");
  std::string program;
  if (cmdline && std::getline(cmdline, program, '\0') &&
      std::filesystem::path(program).filename().string().find("strata") == std::string::npos) {
    throw std::runtime_error("process " + std::to_string(pid) + " (from " + path + ") is '" +
                             program + "', not a strata server: the pid file is stale");
  }
  if (::kill(static_cast<pid_t>(pid), SIGHUP) == 0) return;
  if (errno == ESRCH) {
    throw std::runtime_error("no process " + std::to_string(pid) + " (from " + path +
                             "): the server is not running, the pid file is stale");
  }
  throw std::system_error(errno, std::generic_category(),
                          "cannot signal process " + std::to_string(pid) + " (from " + path + ")");
}

}  // namespace strata
