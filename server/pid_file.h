// The pid file (--pid-file, "pid_file"): written once the server is ready
// (every listener bound or adopted, every export open), so that whoever
// waits for the file may connect at once; removed when the server exits
// cleanly. Written to a temporary name in the same directory and renamed,
// so a reader sees either no file or the whole pid.
#pragma once

#include <string>

namespace strata {

class PidFile {
 public:
  PidFile() = default;
  // Writes `pid` and a newline to `path` (throws std::system_error naming it).
  PidFile(std::string path, long pid);
  ~PidFile();
  PidFile(const PidFile&) = delete;
  PidFile& operator=(const PidFile&) = delete;
  PidFile(PidFile&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  PidFile& operator=(PidFile&& other) noexcept;

  const std::string& path() const { return path_; }

 private:
  std::string path_;  // empty: nothing to remove
};

// `strata reload --pid-file F`: sends SIGHUP to the server whose pid `path`
// holds. Throws std::runtime_error saying what is wrong: no file, not a pid,
// no such process or a process that is not strata (a stale file), not
// allowed to signal it.
void signal_reload(const std::string& path);

}  // namespace strata
