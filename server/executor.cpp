#include "server/executor.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace strata {

void RequestExecutor::execute(const nbd::Request& h, const std::byte* payload, ReplyBatch& out) {
  using namespace nbd;
  stats_.count_request(command_of(h.type));
  int e = 0;
  switch (h.type) {
    case kCmdRead:
      return read(h, out);
    case kCmdBlockStatus:
      return block_status(h, out);
    case kCmdWrite:
      e = device_.write(h.offset, {payload, h.length}, h.flags & kCmdFlagFua);
      if (!e) bump(stats_.bytes_written, h.length);
      break;
    case kCmdFlush:
      e = device_.flush();
      break;
    case kCmdTrim:
      e = device_.trim(h.offset, h.length, h.flags & kCmdFlagFua);
      break;
    case kCmdWriteZeroes:
      e = device_.write_zeroes(h.offset, h.length,
                               ZeroFlags{.may_trim = !(h.flags & kCmdFlagNoHole),
                                         .fast_only = (h.flags & kCmdFlagFastZero) != 0,
                                         .fua = (h.flags & kCmdFlagFua) != 0});
      break;
    case kCmdCache:
      e = device_.cache(h.offset, h.length);
      break;
  }
  if (e) return device_failed(h, e, out);
  reply_ok(h, out);
}

bool RequestExecutor::batchable(const nbd::Request& h) const {
  using namespace nbd;
  if (!runs_batches_) return false;
  if (h.type == kCmdWrite) return !(h.flags & kCmdFlagFua);
  return h.type == kCmdRead && !(has_extents_ && wants_sparse_read(h, session_));
}

void RequestExecutor::execute_batch(std::span<const BatchItem> items, ReplyBatch& out) {
  std::vector<BatchIo> ops(items.size());
  std::vector<IoBuffer> read_buffers(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const nbd::Request& h = *items[i].hdr;
    stats_.count_request(command_of(h.type));
    const bool write = h.type == nbd::kCmdWrite;
    if (!write) read_buffers[i] = make_io_buffer(h.length, buffer_alignment_);
    ops[i] = {.offset = h.offset,
              .data = write ? items[i].payload : read_buffers[i].get(),
              .length = h.length,
              .write = write};
  }
  device_.run_batch(ops);
  for (size_t i = 0; i < items.size(); ++i) {
    const nbd::Request& h = *items[i].hdr;
    const int e = ops[i].result;
    if (h.type == nbd::kCmdWrite) {
      if (e) {
        device_failed(h, e, out);
        continue;
      }
      bump(stats_.bytes_written, h.length);
      reply_ok(h, out);
    } else if (e) {
      read_failed(h, e, h.offset, out);
    } else {
      reply_read(h, std::move(read_buffers[i]), out);
    }
  }
}

void RequestExecutor::reply_ok(const nbd::Request& h, ReplyBatch& out) {
  nbd::Bytes reply;
  nbd::append_ok(reply, h.cookie, session_);
  out.add_header(std::move(reply));
}

void RequestExecutor::refuse(const nbd::Request& h, uint32_t error, std::string_view message,
                             ReplyBatch& out) {
  stats_.count_request(command_of(h.type));
  reply_error(h, error, message, out);
}

void RequestExecutor::reply_error(const nbd::Request& h, uint32_t error, std::string_view message,
                                  ReplyBatch& out) {
  stats_.count_error(error);
  nbd::Bytes reply;
  nbd::append_error(reply, h.cookie, session_, error, message);
  out.add_header(std::move(reply));
}

void RequestExecutor::device_failed(const nbd::Request& h, int host_errno, ReplyBatch& out) {
  // A fast zero the device cannot do is an answer the client asked for.
  if (!(h.type == nbd::kCmdWriteZeroes && host_errno == ENOTSUP)) {
    spdlog::warn("conn {}: command {} offset={} length={} failed: {}", conn_id_, h.type, h.offset,
                 h.length, std::strerror(host_errno));
  }
  reply_error(h, nbd::errno_to_nbd(host_errno), std::strerror(host_errno), out);
}

void RequestExecutor::read_failed(const nbd::Request& h, int host_errno, uint64_t offset,
                                  ReplyBatch& out) {
  spdlog::warn("conn {}: read at offset {} failed: {}", conn_id_, offset,
               std::strerror(host_errno));
  stats_.count_error(nbd::errno_to_nbd(host_errno));
  nbd::Bytes reply;
  nbd::append_read_error(reply, h, session_, nbd::errno_to_nbd(host_errno),
                         std::strerror(host_errno), offset);
  out.add_header(std::move(reply));
}

void RequestExecutor::read(const nbd::Request& h, ReplyBatch& out) {
  const std::vector<nbd::ReadChunk> chunks = sparse_plan(h);
  if (copy_free_ && h.length >= kCopyFreeMinBytes && read_copy_free(h, chunks, out)) return;
  IoBuffer owned = make_io_buffer(h.length, buffer_alignment_);
  std::byte* buf = owned.get();
  if (!chunks.empty()) {
    if (!read_chunks(h, chunks, buf, out)) return;
    out.keep(std::move(owned));
    out.read_bytes += h.length;
    return;
  }
  if (int e = device_.read(h.offset, {buf, h.length})) return read_failed(h, e, h.offset, out);
  reply_read(h, std::move(owned), out);
}

void RequestExecutor::reply_read(const nbd::Request& h, IoBuffer data, ReplyBatch& out) {
  nbd::Bytes header;
  nbd::append_read_reply(header, h, session_);
  out.add_header(std::move(header));
  if (h.length > 0) out.add_data(data.get(), h.length);
  out.keep(std::move(data));
  out.read_bytes += h.length;
}

std::vector<nbd::ReadChunk> RequestExecutor::sparse_plan(const nbd::Request& h) {
  if (!has_extents_ || !nbd::wants_sparse_read(h, session_)) return {};
  std::vector<Extent> extents;
  if (device_.extents(h.offset, h.length, extents) != 0) return {};
  return nbd::plan_sparse_read(extents, h.length);
}

bool RequestExecutor::map_exactly(uint64_t offset, uint64_t length,
                                  std::vector<HostPiece>& pieces) {
  const size_t first = pieces.size();
  if (device_.map_host(offset, length, pieces) != 0) return false;
  // A mapping that does not cover the range would desynchronize the stream:
  // read it instead.
  uint64_t mapped = 0;
  for (size_t i = first; i < pieces.size(); ++i) mapped += pieces[i].length;
  return mapped == length;
}

bool RequestExecutor::read_copy_free(const nbd::Request& h, std::span<const nbd::ReadChunk> chunks,
                                     ReplyBatch& out) {
  // Everything is mapped before anything is queued: a reply goes out
  // copy-free whole, or is read.
  std::vector<HostPiece> pieces;
  if (chunks.empty()) {
    if (!map_exactly(h.offset, h.length, pieces)) return false;
    nbd::Bytes header;
    nbd::append_read_reply(header, h, session_);
    out.add_header(std::move(header));
    out.add_pieces(pieces);
    out.read_bytes += h.length;
    return true;
  }
  std::vector<size_t> ends;  // the pieces of chunk i end at ends[i]
  ends.reserve(chunks.size());
  for (const auto& c : chunks) {
    if (!c.hole && !map_exactly(h.offset + c.pos, c.length, pieces)) return false;
    ends.push_back(pieces.size());
  }
  size_t begin = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    nbd::Bytes header;
    nbd::append_read_chunk(header, h, chunks[i], i + 1 == chunks.size());
    out.add_header(std::move(header));
    out.add_pieces(std::span(pieces).subspan(begin, ends[i] - begin));
    begin = ends[i];
  }
  out.read_bytes += h.length;
  return true;
}

bool RequestExecutor::read_chunks(const nbd::Request& h, std::span<const nbd::ReadChunk> chunks,
                                  std::byte* buf, ReplyBatch& out) {
  for (const auto& c : chunks) {
    if (c.hole) continue;
    if (int e = device_.read(h.offset + c.pos, {buf + c.pos, c.length})) {
      read_failed(h, e, h.offset + c.pos, out);
      return false;
    }
  }
  for (size_t i = 0; i < chunks.size(); ++i) {
    nbd::Bytes header;
    nbd::append_read_chunk(header, h, chunks[i], i + 1 == chunks.size());
    out.add_header(std::move(header));
    if (!chunks[i].hole) out.add_data(buf + chunks[i].pos, chunks[i].length);
  }
  return true;
}

void RequestExecutor::block_status(const nbd::Request& h, ReplyBatch& out) {
  // Each selected context asks the device once; extents only for the
  // contexts made of them, so a client of bitmaps alone never maps the image.
  std::vector<Extent> extents;
  if (session_.wants_extents()) {
    if (int e = device_.extents(h.offset, h.length, extents)) {
      return reply_error(h, nbd::errno_to_nbd(e), std::strerror(e), out);
    }
  }
  std::vector<std::vector<DirtyRun>> runs(session_.bitmaps.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string& name = session_.bitmaps[i].name;
    if (int e = device_.dirty_extents(name, h.offset, h.length, runs[i])) {
      spdlog::warn("conn {}: dirty bitmap '{}' offset={} length={}: {}", conn_id_, name, h.offset,
                   h.length, std::strerror(e));
      return reply_error(h, nbd::errno_to_nbd(e), std::strerror(e), out);
    }
  }
  nbd::Bytes reply;
  // False: a context's runs covered nothing; a device must describe what it
  // was asked.
  if (!nbd::append_block_status(reply, h, session_, extents, runs)) {
    return reply_error(h, nbd::kEIO, std::strerror(EIO), out);
  }
  out.add_header(std::move(reply));
}

}  // namespace strata
