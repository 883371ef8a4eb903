// The transmission phase as pure logic: what to do with each request header,
// how a read's reply is cut into chunks, how block status is described for
// each selected meta context, and the bytes of every reply. The server feeds
// it headers and the device's extents and sends what it returns; no sockets,
// threads or devices here, so every rule of doc/proto.md it implements is
// unit-tested byte for byte (tests/unit/test_transmission.cpp).
//
// A Session is fixed when the handshake ends: nothing here changes it, so
// the functions may be called from any number of threads at once.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/extent.h"
#include "protocol/nbd.h"

namespace strata::nbd {

// A qemu:dirty-bitmap:NAME meta context the client selected.
struct SessionBitmap {
  uint32_t id = 0;   // kMetaIdDirtyBitmapBase + the bitmap's index in the export
  std::string name;  // the bitmap's name, without the context prefix
};

// What the transmission rules depend on: the export and what the client
// negotiated for it.
struct Session {
  uint64_t size = 0;         // bytes of the export
  uint16_t tx_flags = 0;     // as sent to the client (SEND_TRIM, SEND_WRITE_ZEROES...)
  bool read_only = false;    // writes are refused with EPERM
  uint32_t max_payload = 0;  // longest READ or WRITE accepted
  bool structured = false;
  bool base_allocation = false;        // meta context selected
  bool allocation_depth = false;       // meta context selected
  std::vector<SessionBitmap> bitmaps;  // dirty bitmap contexts selected, ids ascending

  // base:allocation or qemu:allocation-depth: block status needs the
  // device's extents.
  bool wants_extents() const { return base_allocation || allocation_depth; }
  bool any_meta_context() const { return wants_extents() || !bitmaps.empty(); }
};

// ---- Requests ---------------------------------------------------------------

// A refused WRITE's payload is read and dropped up to twice max_payload; a
// longer one cannot be skipped in bounded time and closes the connection.
inline uint64_t max_skipped_payload(const Session& s) { return 2ull * s.max_payload; }

// What the reader does with a request header.
enum class Next {
  kExecute,     // valid: read its payload (WRITE), then run it
  kRefuse,      // reply `error`, skip its payload, read on
  kRefuseLast,  // reply `error`, then close: the payload is too long to skip
  kDisconnect,  // NBD_CMD_DISC: stop reading, finish what is in flight
  kClose,       // not a request (bad magic): close without a reply
};

struct Verdict {
  Next next = Next::kExecute;
  uint32_t error = 0;  // with kRefuse and kRefuseLast
};

// The NBD error for a request that breaks a rule (flags the command does not
// take, out of range, too long, writes on a read-only export, commands the
// client was not offered), or 0 when it may run.
uint32_t validate_request(const Request& r, const Session& s);

// The verdict on a request header; `stopping`: the server is shutting down,
// and every request read from now on is answered ESHUTDOWN.
Verdict judge_request(const Request& r, const Session& s, bool stopping);

// Bytes that follow the header on the wire (a WRITE's data).
inline uint64_t payload_length(const Request& r) { return r.type == kCmdWrite ? r.length : 0; }

// Bytes the request holds in memory while in flight: its payload, or the
// buffer its reply's data is read into.
inline uint64_t buffer_length(const Request& r) {
  return (r.type == kCmdWrite || r.type == kCmdRead) ? r.length : 0;
}

// ---- Read replies -----------------------------------------------------------

// Reads at least this long look for holes, so sparse regions send no zeros.
inline constexpr uint32_t kSparseReadThreshold = 64 * 1024;

// One chunk of a read's structured reply, relative to the request.
struct ReadChunk {
  uint32_t pos = 0;
  uint32_t length = 0;
  bool hole = false;  // sent as OFFSET_HOLE, not read from the device
};

// Whether a read should ask the device's extents for holes: structured
// replies, no DF flag, and long enough to be worth it.
bool wants_sparse_read(const Request& r, const Session& s);

// Plans a read of `length` bytes from the extents that start at its offset:
// adjacent runs of the same kind (zero or data) become one chunk. Empty when
// nothing reads as zeros, or the extents do not cover the read: then the
// read goes out as one data chunk.
std::vector<ReadChunk> plan_sparse_read(std::span<const Extent> extents, uint32_t length);

// A planned chunk's bytes: an OFFSET_HOLE chunk, or the OFFSET_DATA header
// its `length` bytes of data follow.
void append_read_chunk(Bytes& out, const Request& r, const ReadChunk& c, bool last);

// The header of a read sent whole: OFFSET_DATA (done) when structured, else a
// simple reply; the data follows. A structured read of 0 bytes gets NONE.
void append_read_reply(Bytes& out, const Request& r, const Session& s);

// A failed read: ERROR_OFFSET naming the first failing byte when
// structured, else a simple reply with the error.
void append_read_error(Bytes& out, const Request& r, const Session& s, uint32_t error,
                       std::string_view message, uint64_t offset);

// ---- Other replies ----------------------------------------------------------

void append_ok(Bytes& out, uint64_t cookie, const Session& s);
// The message goes into a structured ERROR chunk; simple replies carry none.
void append_error(Bytes& out, uint64_t cookie, const Session& s, uint32_t error,
                  std::string_view message = {});

// The descriptors of one context: runs clipped to the request's length,
// runs of 0 bytes skipped, adjacent runs with equal flags merged, only the
// first with REQ_ONE. Empty when the runs cover no byte.
using ContextFlags = uint32_t (*)(const Extent&);
std::vector<BlockStatusDescriptor> describe_extents(std::span<const Extent> extents,
                                                    uint32_t length, bool req_one,
                                                    ContextFlags flags_of);
// The same for a dirty bitmap's runs: flags kStateDirty or 0.
std::vector<BlockStatusDescriptor> describe_dirty_runs(std::span<const DirtyRun> runs,
                                                       uint32_t length, bool req_one);

// base:allocation flags (HOLE, ZERO) and qemu:allocation-depth values.
uint32_t base_allocation_flags(const Extent& e);
uint32_t allocation_depth(const Extent& e);

// The reply to BLOCK_STATUS: one chunk per selected context, in id order
// (base:allocation, qemu:allocation-depth, then s.bitmaps), the last one
// flagged done. `extents` (read only when s.wants_extents()) and
// `bitmap_runs[i]` (the runs of s.bitmaps[i], one entry per selected bitmap)
// start at the request's offset. False, with nothing appended, when a
// context's runs cover no byte of the request (every chunk must make
// progress: the device failed), or when no context is selected.
bool append_block_status(Bytes& out, const Request& r, const Session& s,
                         std::span<const Extent> extents,
                         std::span<const std::vector<DirtyRun>> bitmap_runs);

}  // namespace strata::nbd
