#include "formats/file_system.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "formats/errors.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

class PosixFile final : public File {
 public:
  PosixFile(std::string path, int fd, bool writable, dev_t dev, ino_t ino)
      : path_(std::move(path)), fd_(fd), writable_(writable), dev_(dev), ino_(ino) {}
  ~PosixFile() override { ::close(fd_); }

  const std::string& path() const override { return path_; }
  bool writable() const override { return writable_; }
  int fd() const override { return fd_; }

  int read_at(uint64_t offset, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n =
          ::pread(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        return 0;
      }
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (!writable_) return EPERM;
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n =
          ::pwrite(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0) return EIO;
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int sync() override {
    if (!writable_) return 0;
    while (::fdatasync(fd_) != 0) {
      if (errno != EINTR) return errno;
    }
    return 0;
  }

  int punch_hole(uint64_t offset, uint64_t length) override {
    if (!writable_) return EPERM;
    return fallocate_errno(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  }

  int zero_range(uint64_t offset, uint64_t length) override {
    if (!writable_) return EPERM;
    return fallocate_errno(FALLOC_FL_ZERO_RANGE, offset, length);
  }

  int64_t size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return -errno;
    return st.st_size;
  }

  int truncate(uint64_t size) override {
    if (!writable_) return EPERM;
    while (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
      if (errno != EINTR) return errno;
    }
    return 0;
  }

  int64_t seek_data(uint64_t offset) override { return seek(offset, SEEK_DATA); }
  int64_t seek_hole(uint64_t offset) override { return seek(offset, SEEK_HOLE); }

  dev_t device() const override { return dev_; }
  ino_t inode() const override { return ino_; }
  int lock() override {
    if (::flock(fd_, (writable_ ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0) return 0;
    return errno;
  }

 private:
  int fallocate_errno(int mode, uint64_t offset, uint64_t length) {
    while (::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
      if (errno == EINTR) continue;
      if (errno == EOPNOTSUPP) return ENOTSUP;
      return errno;
    }
    return 0;
  }

  int64_t seek(uint64_t offset, int whence) {
    off_t r = ::lseek(fd_, static_cast<off_t>(offset), whence);
    if (r < 0) {
      if (errno == EINVAL) return -ENOTSUP;
      return -errno;
    }
    return r;
  }

  std::string path_;
  int fd_;
  bool writable_;
  dev_t dev_;
  ino_t ino_;
};

// The host implementation: what open.cpp, the drivers and image creation did
// directly before the seam existed, unchanged, so behaviour is identical.
class HostFileSystem final : public FileSystem {
 public:
  std::unique_ptr<File> open(const std::string& path, bool writable) override {
    int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) {
      throw_image_error(path, std::string("cannot open") + (writable ? " read-write" : "") + ": " +
                                  std::strerror(errno));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      throw_image_error(path, std::string("cannot stat: ") + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
      ::close(fd);
      throw_image_error(path, "not a regular file or block device");
    }
    return std::make_unique<PosixFile>(path, fd, writable, st.st_dev, st.st_ino);
  }

  std::unique_ptr<File> create(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw_image_error(path, std::string("cannot create: ") + std::strerror(errno));
    ::close(fd);
    return open(path, true);
  }

  int stat(const std::string& path, FileStat& out) override {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return errno;
    out.device = st.st_dev;
    out.inode = st.st_ino;
    out.size = static_cast<uint64_t>(st.st_size);
    out.mtime = static_cast<int64_t>(st.st_mtime);
    return 0;
  }

  std::string absolute(const std::string& path) override { return fs::absolute(path).string(); }

  std::string canonical(const std::string& path, std::error_code& ec) override {
    return fs::canonical(path, ec).string();
  }

  std::string weakly_canonical(const std::string& path, std::error_code& ec) override {
    return fs::weakly_canonical(path, ec).string();
  }
};

}  // namespace

std::shared_ptr<FileSystem> host_file_system() {
  // Stateless and shared by every OpenOptions: built once, never destroyed
  // before the last export closes.
  static const std::shared_ptr<FileSystem> host = std::make_shared<HostFileSystem>();
  return host;
}

int host_descriptor(File& file) {
  auto* posix = dynamic_cast<PosixFile*>(&file);
  return posix ? posix->fd() : -1;
}

std::unique_ptr<File> create_file(const std::string& path) {
  return host_file_system()->create(path);
}

}  // namespace strata
