#include "formats/raw/raw.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "formats/create.h"
#include "formats/errors.h"
#include "formats/open.h"

namespace strata {

RawDevice::RawDevice(std::unique_ptr<File> file) : file_(std::move(file)) {
  int64_t s = file_->size();
  if (s < 0) throw_image_error(file_->path(), "cannot read the file size");
  size_ = static_cast<uint64_t>(s);
}

Capabilities RawDevice::capabilities() const {
  Capabilities c;
  c.read_only = !file_->writable();
  c.can_trim = file_->writable();
  c.can_zero = true;
  c.can_fast_zero = true;
  c.can_multi_conn = true;
  return c;
}

int RawDevice::read(uint64_t offset, std::span<std::byte> buf) {
  return file_->read_at(offset, buf);
}

// The guest's bytes are the file's, wherever they are: a write changes them
// in place and nothing ever moves.
int RawDevice::map_host(uint64_t offset, uint64_t length, std::vector<HostPiece>& out) {
  return map_file(*file_, offset, length, out);
}

int RawDevice::write(uint64_t offset, std::span<const std::byte> buf, bool fua) {
  if (int r = file_->write_at(offset, buf)) return r;
  return fua ? file_->sync() : 0;
}

int RawDevice::write_zero_buffer(uint64_t offset, uint64_t length) {
  static const std::vector<std::byte> zeros(1 << 20);
  while (length > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeros.size()));
    if (int r = file_->write_at(offset, {zeros.data(), n})) return r;
    offset += n;
    length -= n;
  }
  return 0;
}

int RawDevice::write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) {
  int r = ENOTSUP;
  if (flags.may_trim) r = file_->punch_hole(offset, length);
  if (r != 0) r = file_->zero_range(offset, length);
  if (r == ENOTSUP || r == EOPNOTSUPP) {
    if (flags.fast_only) return ENOTSUP;
    r = write_zero_buffer(offset, length);
  }
  if (r != 0) return r;
  return flags.fua ? file_->sync() : 0;
}

int RawDevice::trim(uint64_t offset, uint64_t length, bool fua) {
  int r = file_->punch_hole(offset, length);
  if (r == ENOTSUP) r = 0;  // trim is advisory
  if (r != 0) return r;
  return fua ? file_->sync() : 0;
}

int RawDevice::flush() { return file_->sync(); }

int RawDevice::cache(uint64_t offset, uint64_t length) {
  std::vector<std::byte> buf(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, buf.size()));
    if (int r = file_->read_at(offset, {buf.data(), n})) return r;
    offset += n;
    length -= n;
  }
  return 0;
}

int RawDevice::extents(uint64_t offset, uint64_t length, std::vector<Extent>& out) {
  const uint64_t end = offset + length;
  // A raw file has no lower layer, so its holes are allocated here too
  // (qemu:allocation-depth 1, as qemu reports them; a qcow2 over a raw
  // backing file then reports them at the backing's depth).
  const Extent data{.length = 0, .hole = false, .zero = false, .depth = 1};
  const Extent hole{.length = 0, .hole = true, .zero = true, .depth = 1};
  while (offset < end) {
    int64_t d = file_->seek_data(offset);
    if (d == -ENXIO) {  // no data up to end of file
      Extent e = hole;
      e.length = end - offset;
      append_extent(out, e);
      return 0;
    }
    if (d < 0) {  // unsupported: everything is data
      Extent e = data;
      e.length = end - offset;
      append_extent(out, e);
      return 0;
    }
    uint64_t ud = static_cast<uint64_t>(d);
    if (ud > offset) {
      Extent e = hole;
      e.length = std::min(ud, end) - offset;
      append_extent(out, e);
      offset += e.length;
      continue;
    }
    int64_t h = file_->seek_hole(offset);
    uint64_t uh = h < 0 ? end : static_cast<uint64_t>(h);
    Extent e = data;
    e.length = std::min(std::max(uh, offset + 1), end) - offset;
    append_extent(out, e);
    offset += e.length;
  }
  return 0;
}

std::shared_ptr<BlockDevice> open_raw(std::unique_ptr<File> file, ChainContext& ctx) {
  (void)ctx;
  return std::make_shared<RawDevice>(std::move(file));
}

void create_raw(const CreateOptions& opts) {
  if (!opts.options.empty()) {
    throw_image_error(opts.path,
                      "raw images take no -o options (got '" + opts.options.begin()->first + "')");
  }
  if (opts.backing) throw_image_error(opts.path, "raw images cannot have a backing file");
  if (!opts.size) throw_image_error(opts.path, "a size is required");
  auto f = create_file(opts.path);
  if (int r = f->truncate(*opts.size)) {
    throw_image_error(opts.path, std::string("cannot set size: ") + std::strerror(r));
  }
}

}  // namespace strata
