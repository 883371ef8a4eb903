// RequestExecutor: runs one validated request on the export's BlockDevice
// and queues its reply in a ReplyBatch. The rules for what a reply looks
// like are protocol/transmission.h's; this file only connects them to the
// device: which device call a command is, how a sparse read is read, which
// errors are logged.
//
// Copy-free reads: on a transport that sends files (copy_free), a read of at
// least kCopyFreeMinBytes that the device maps whole to host pieces
// (BlockDevice::map_host) queues the pieces instead of reading them; the
// kernel reads the page cache when the batch is sent. Whatever does not map
// (and every smaller read) is read into a buffer as before.
//
// Threads: execute() runs on every transmission thread of the connection at
// once; the device is thread-safe and the counters are relaxed atomics
// (server/metrics.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "formats/block_device.h"
#include "protocol/transmission.h"
#include "server/metrics.h"
#include "server/reply_batch.h"

namespace strata {

// Reads shorter than this are copied even where they could be sent from the
// page cache: for small reads the copy costs less than what a copy-free reply
// adds (the mapping walk, a sendmsg and a sendfile instead of one gather
// write). A starting point, to be tuned by measurement.
constexpr uint32_t kCopyFreeMinBytes = 64 * 1024;

class RequestExecutor {
 public:
  RequestExecutor(uint64_t conn_id, BlockDevice& device, bool has_extents,
                  const nbd::Session& session, RequestCounters& stats, size_t buffer_alignment = 0,
                  bool copy_free = false)
      : conn_id_(conn_id),
        device_(device),
        has_extents_(has_extents),
        session_(session),
        stats_(stats),
        buffer_alignment_(buffer_alignment),
        copy_free_(copy_free),
        runs_batches_(device.runs_batches()) {}

  // A request and its WRITE payload, for execute_batch.
  struct BatchItem {
    const nbd::Request* hdr;
    std::byte* payload;
  };

  // REQUIRES: validate_request(h) == 0; `payload` holds a WRITE's data.
  void execute(const nbd::Request& h, const std::byte* payload, ReplyBatch& out);
  // Whether `h` may run in a batch with others (execute_batch): a read or a
  // write without FUA, on a device whose batches beat one request at a time.
  bool batchable(const nbd::Request& h) const;
  // REQUIRES: validate_request and batchable of every item. Runs them at
  // once (BlockDevice::run_batch) and queues their replies in order.
  void execute_batch(std::span<const BatchItem> items, ReplyBatch& out);
  // Answers a request that will not run with `error` (an NBD error value).
  void refuse(const nbd::Request& h, uint32_t error, std::string_view message, ReplyBatch& out);

 private:
  // The error reply of a request, counted by its error.
  void reply_error(const nbd::Request& h, uint32_t error, std::string_view message,
                   ReplyBatch& out);
  void read(const nbd::Request& h, ReplyBatch& out);
  // The chunks of a sparse read, empty when the read goes out whole.
  std::vector<nbd::ReadChunk> sparse_plan(const nbd::Request& h);
  // Queues the read as host pieces; false (nothing queued) when some of it
  // does not map.
  bool read_copy_free(const nbd::Request& h, std::span<const nbd::ReadChunk> chunks,
                      ReplyBatch& out);
  // Appends the pieces of exactly [offset, offset + length); false when the
  // device cannot map it.
  bool map_exactly(uint64_t offset, uint64_t length, std::vector<HostPiece>& pieces);
  // The reply of a read whose data is in `data`.
  void reply_read(const nbd::Request& h, IoBuffer data, ReplyBatch& out);
  void reply_ok(const nbd::Request& h, ReplyBatch& out);
  // A sparse read along `chunks`; false when a data chunk failed to read
  // (its error is queued).
  bool read_chunks(const nbd::Request& h, std::span<const nbd::ReadChunk> chunks, std::byte* buf,
                   ReplyBatch& out);
  void block_status(const nbd::Request& h, ReplyBatch& out);
  void read_failed(const nbd::Request& h, int host_errno, uint64_t offset, ReplyBatch& out);
  void device_failed(const nbd::Request& h, int host_errno, ReplyBatch& out);

  const uint64_t conn_id_;
  BlockDevice& device_;
  const bool has_extents_;
  const nbd::Session& session_;
  RequestCounters& stats_;
  const size_t buffer_alignment_;  // of read buffers (server/io_buffer.h)
  const bool copy_free_;           // the transport sends files
  const bool runs_batches_;
};

}  // namespace strata
