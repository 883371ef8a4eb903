#include "formats/direct_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "formats/errors.h"
#include "formats/forwarding_file_system.h"
#include "formats/io_ring.h"
#include "formats/mutex.h"

namespace strata {
namespace {

// Where the kernel does not report the direct I/O alignment (STATX_DIOALIGN,
// Linux 6.1), the largest logical block size in common use.
constexpr size_t kFallbackAlignment = 4096;
// Unaligned I/O goes through bounce buffers of at most this many bytes, so
// one request never doubles its memory.
constexpr size_t kMaxBounce = 1 << 20;
constexpr size_t kStripes = 64;

// Heap memory aligned for O_DIRECT, freed at scope exit.
class AlignedBuffer {
 public:
  AlignedBuffer(size_t alignment, size_t size)
      : data_(static_cast<std::byte*>(std::aligned_alloc(alignment, size))), size_(size) {
    if (!data_) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  std::span<std::byte> first(size_t n) { return {data_, std::min(n, size_)}; }
  std::byte* data() { return data_; }

 private:
  std::byte* data_;
  size_t size_;
};

class DirectFile final : public File {
 public:
  // `meta`: the buffered open of the same file, for everything but data.
  DirectFile(std::unique_ptr<File> meta, int fd, size_t alignment, size_t fs_block)
      : meta_(std::move(meta)),
        fd_(fd),
        align_(alignment),
        zero_align_(std::max(alignment, fs_block)) {}
  ~DirectFile() override { ::close(fd_); }

  const std::string& path() const override { return meta_->path(); }
  bool writable() const override { return meta_->writable(); }

  int read_at(uint64_t offset, std::span<std::byte> buf) override {
    if (is_aligned(offset, buf)) return read_direct(offset, buf);
    const uint64_t end = offset + buf.size();
    AlignedBuffer bounce(align_, std::min<uint64_t>(kMaxBounce, up(end) - down(offset)));
    for (uint64_t pos = offset; pos < end;) {
      const uint64_t lo = down(pos);
      const uint64_t hi = std::min(up(end), lo + kMaxBounce);
      if (int e = read_direct(lo, bounce.first(hi - lo))) return e;
      const uint64_t n = std::min(end, hi) - pos;
      std::memcpy(buf.data() + (pos - offset), bounce.data() + (pos - lo), n);
      pos += n;
    }
    return 0;
  }

  int write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (!writable()) return EPERM;
    if (!unaligned_size_.load(std::memory_order_acquire)) return write_blocks(offset, buf);
    return write_keeping_size(offset, buf);
  }

  bool runs_batches() const override { return true; }

  // The aligned ops go to the kernel together (formats/io_ring.h); the
  // others, and any the ring did not finish, run one at a time.
  void run_batch(std::span<BatchIo> ops) override {
    std::vector<RingOp> ring;
    std::vector<BatchIo*> on_ring;
    ring.reserve(ops.size());
    on_ring.reserve(ops.size());
    for (BatchIo& op : ops) {
      if (!fits_ring(op)) continue;
      ring.push_back({.fd = fd_,
                      .write = op.write,
                      .offset = op.offset,
                      .data = op.data,
                      .length = static_cast<uint32_t>(op.length)});
      on_ring.push_back(&op);
    }
    const bool ran = !ring.empty() && run_on_ring(ring);
    for (size_t i = 0; i < on_ring.size(); ++i) {
      on_ring[i]->result = ran ? finish(*on_ring[i], ring[i].result) : run_one(*on_ring[i]);
    }
    for (BatchIo& op : ops) {
      if (!fits_ring(op)) op.result = run_one(op);
    }
  }

  int sync() override { return meta_->sync(); }

  int punch_hole(uint64_t offset, uint64_t length) override {
    return clear(offset, length,
                 [this](uint64_t o, uint64_t n) { return meta_->punch_hole(o, n); });
  }

  int zero_range(uint64_t offset, uint64_t length) override {
    return clear(offset, length,
                 [this](uint64_t o, uint64_t n) { return meta_->zero_range(o, n); });
  }

  int64_t size() override { return meta_->size(); }
  int truncate(uint64_t size) override {
    MutexLock hold(size_mu_);
    int e = meta_->truncate(size);
    note_size();
    return e;
  }
  int64_t seek_data(uint64_t offset) override { return meta_->seek_data(offset); }
  int64_t seek_hole(uint64_t offset) override { return meta_->seek_hole(offset); }
  dev_t device() const override { return meta_->device(); }
  ino_t inode() const override { return meta_->inode(); }
  int lock() override { return meta_->lock(); }

  // Whether the file's size is not a multiple of the alignment (at open).
  void note_size() {
    const int64_t n = meta_->size();
    unaligned_size_.store(n >= 0 && static_cast<uint64_t>(n) % align_ != 0,
                          std::memory_order_release);
  }

 private:
  int run_one(BatchIo& op) {
    return op.write ? write_at(op.offset, {op.data, op.length})
                    : read_at(op.offset, {op.data, op.length});
  }

  // An op the ring can run as it is: aligned, and for a write, one that
  // write_at would also send straight to the file.
  bool fits_ring(const BatchIo& op) const {
    return is_aligned(op.offset, {op.data, op.length}) && op.length <= UINT32_MAX &&
           (!op.write || (writable() && !unaligned_size_.load(std::memory_order_acquire)));
  }

  // The result of an op from what the ring did (`done`: bytes or -errno),
  // by the rules of read_direct and write_direct: a read that stops short
  // at the end of the file reads zeros beyond it; an aligned short transfer
  // goes on where it stopped; an op the ring did not run runs here.
  int finish(BatchIo& op, int32_t done) {
    if (done == -EAGAIN || done == -EINTR || done == -ECANCELED) return run_one(op);
    if (done < 0) return -done;
    const auto n = static_cast<size_t>(done);
    if (n == op.length) return 0;
    const bool aligned_stop = n > 0 && n % align_ == 0;
    if (op.write)
      return aligned_stop ? write_direct(op.offset + n, {op.data + n, op.length - n}) : EIO;
    if (aligned_stop) return read_direct(op.offset + n, {op.data + n, op.length - n});
    std::memset(op.data + n, 0, op.length - n);  // the end of the file
    return 0;
  }

  uint64_t down(uint64_t v) const { return v / align_ * align_; }
  uint64_t up(uint64_t v) const { return down(v + align_ - 1); }
  bool is_aligned(uint64_t offset, std::span<const std::byte> buf) const {
    return offset % align_ == 0 && buf.size() % align_ == 0 &&
           reinterpret_cast<uintptr_t>(buf.data()) % align_ == 0;
  }

  // While the size is not aligned, the last block is partial: writing it
  // whole would make the file longer than a buffered write would (a raw
  // disk would grow at its next open). So writes then run one at a time and
  // cut the file back to the size a buffered write leaves; the first write
  // that ends past an aligned end makes the size aligned for good.
  int write_keeping_size(uint64_t offset, std::span<const std::byte> buf) {
    MutexLock hold(size_mu_);
    const int64_t before = meta_->size();
    if (before < 0) return static_cast<int>(-before);
    int e = write_blocks(offset, buf);
    const uint64_t want = std::max<uint64_t>(static_cast<uint64_t>(before), offset + buf.size());
    const int64_t after = meta_->size();
    if (after > 0 && static_cast<uint64_t>(after) > want) {
      if (int t = meta_->truncate(want); t && !e) e = t;
    }
    note_size();
    return e;
  }

  int write_blocks(uint64_t offset, std::span<const std::byte> buf) {
    while (!buf.empty()) {
      const uint64_t block = down(offset);
      const size_t n = block == offset && buf.size() >= align_
                           ? down(buf.size())
                           : std::min<size_t>(buf.size(), block + align_ - offset);
      int e = block == offset && n >= align_ ? write_whole_blocks(offset, buf.first(n))
                                             : write_in_block(block, offset - block, buf.first(n));
      if (e) return e;
      offset += n;
      buf = buf.subspan(n);
    }
    return 0;
  }

  // REQUIRES: offset and buf aligned. Past the end of the file reads zeros;
  // a short read ends where the file does.
  int read_direct(uint64_t offset, std::span<std::byte> buf) {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n =
          ::pread(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      done += static_cast<size_t>(n);
      if (n == 0 || done % align_ != 0) break;  // the end of the file
    }
    std::memset(buf.data() + done, 0, buf.size() - done);
    return 0;
  }

  // REQUIRES: offset and buf aligned.
  int write_direct(uint64_t offset, std::span<const std::byte> buf) {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n =
          ::pwrite(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      if (n == 0 || n % static_cast<ssize_t>(align_) != 0) return EIO;
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  // Whole blocks from a buffer that may not be aligned in memory.
  int write_whole_blocks(uint64_t offset, std::span<const std::byte> buf) {
    if (reinterpret_cast<uintptr_t>(buf.data()) % align_ == 0) return write_direct(offset, buf);
    AlignedBuffer bounce(align_, std::min(kMaxBounce, buf.size()));
    for (size_t done = 0; done < buf.size();) {
      const size_t n = std::min(kMaxBounce, buf.size() - done);
      std::memcpy(bounce.data(), buf.data() + done, n);
      if (int e = write_direct(offset + done, bounce.first(n))) return e;
      done += n;
    }
    return 0;
  }

  // Part of one block, by read-modify-write under the block's stripe lock.
  int write_in_block(uint64_t block, uint64_t at, std::span<const std::byte> data) {
    AlignedBuffer b(align_, align_);
    MutexLock hold(stripes_[(block / align_) % kStripes]);
    if (int e = read_direct(block, b.first(align_))) return e;
    std::memcpy(b.data() + at, data.data(), data.size());
    return write_direct(block, b.first(align_));
  }

  // Zeros [offset, offset+length): `whole` (fallocate) over the file-system
  // blocks inside it, zeros written into the partial blocks at its edges.
  template <class Whole>
  int clear(uint64_t offset, uint64_t length, Whole whole) {
    if (!writable()) return EPERM;
    const uint64_t end = offset + length;
    const uint64_t lo = (offset + zero_align_ - 1) / zero_align_ * zero_align_;
    const uint64_t hi = end / zero_align_ * zero_align_;
    if (lo >= hi) return write_zeros(offset, end);
    if (int e = write_zeros(offset, lo)) return e;
    {
      MutexLock hold(size_mu_);  // may extend the file to an unaligned end
      if (int e = whole(lo, hi - lo)) return e;
      note_size();
    }
    return write_zeros(hi, end);
  }

  int write_zeros(uint64_t from, uint64_t to) {
    static const std::array<std::byte, 4096> zeros{};
    for (uint64_t pos = from; pos < to;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(to - pos, zeros.size()));
      if (int e = write_at(pos, {zeros.data(), n})) return e;
      pos += n;
    }
    return 0;
  }

  std::unique_ptr<File> meta_;
  int fd_;
  const size_t align_;
  const size_t zero_align_;  // file-system blocks: fallocate zeroes partial ones in the page cache
  std::array<Mutex, kStripes> stripes_;
  Mutex size_mu_;  // writes while the size is unaligned; size changes
  std::atomic<bool> unaligned_size_{false};
};

// The O_DIRECT alignment of an open file: memory and offset alike.
size_t direct_alignment(int fd) {
  struct statx st {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) == 0 && (st.stx_mask & STATX_DIOALIGN) &&
      st.stx_dio_offset_align != 0) {
    return std::max<size_t>({st.stx_dio_offset_align, st.stx_dio_mem_align, 512});
  }
  return kFallbackAlignment;
}

class DirectFileSystem final : public ForwardingFileSystem {
 public:
  DirectFileSystem() : ForwardingFileSystem(host_file_system()) {}

  std::unique_ptr<File> open(const std::string& path, bool writable) override {
    auto meta = inner().open(path, writable);
    // By the open file, not the name: the same inode even if the name moved.
    const int meta_fd = host_descriptor(*meta);
    if (meta_fd < 0) throw_image_error(path, "cache none: not a host file");
    const std::string self = "/proc/self/fd/" + std::to_string(meta_fd);
    int fd = ::open(self.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_DIRECT);
    if (fd < 0) {
      const int e = errno;
      throw_image_error(
          path, e == EINVAL
                    ? std::string("cache none: this file system cannot do "
                                  "direct I/O (O_DIRECT)")
                    : std::string("cache none: cannot open for direct I/O: ") + std::strerror(e));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || st.st_dev != meta->device() || st.st_ino != meta->inode()) {
      ::close(fd);
      throw_image_error(path, "cache none: the file changed while it was being opened");
    }
    auto file =
        std::make_unique<DirectFile>(std::move(meta), fd, direct_alignment(fd),
                                     static_cast<size_t>(std::max<blksize_t>(st.st_blksize, 1)));
    file->note_size();
    return file;
  }
};

}  // namespace

std::shared_ptr<FileSystem> direct_file_system() {
  static const std::shared_ptr<FileSystem> direct = std::make_shared<DirectFileSystem>();
  return direct;
}

}  // namespace strata
