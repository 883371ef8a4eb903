// Metrics: the counters the server keeps about its requests, connections and
// handshakes, and the Prometheus text exposition (format 0.0.4) that the HTTP
// endpoint serves at /metrics (docs/OPERATIONS.md lists every metric).
//
// Cost on the request path: none beyond relaxed atomic adds. Every
// connection counts into its own cache-line-aligned RequestCounters block,
// which only its own threads write. The export's ExportMetrics keeps the list
// of the live blocks under a mutex taken only on attach, detach and scrape; a
// block that detaches is added into the export's totals, so no count is lost
// and none is counted twice. A scrape sums the totals and the live blocks
// (RequestTotals), on whatever thread asks: every field it reads is atomic.
//
// Per-export metrics hang off the Export (server/exports.h): an export that is
// removed or replaced takes its metrics with it.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "formats/block_device.h"
#include "server/io_threads.h"

namespace strata {

// The commands requests are counted by.
enum class Command : uint8_t {
  read,
  write,
  flush,
  trim,
  write_zeroes,
  block_status,
  cache,
  other,
};
inline constexpr size_t kCommands = 8;
std::string_view to_string(Command c);
// The Command of an NBD request type (nbd::kCmd*).
Command command_of(uint16_t nbd_type);

// The NBD error values a reply can carry (protocol/nbd.h), by name.
inline constexpr size_t kErrorNames = 9;  // the eight NBD errors and "other"
// The index of NBD error value `nbd_error` in error_name().
size_t error_index(uint32_t nbd_error);
std::string_view error_name(size_t index);

// Commands that have a latency histogram.
enum class Timed : uint8_t { read, write, flush, block_status };
inline constexpr size_t kTimed = 4;
std::string_view to_string(Timed t);
// The histogram a command's latency goes in, or -1 for none.
int timed_index(Command c);

// Latency bucket upper bounds, in nanoseconds: 50 us to 10 s.
inline constexpr std::array<uint64_t, 17> kLatencyBoundsNs = {
    50'000,      100'000,      250'000,      500'000,      1'000'000,    2'500'000,
    5'000'000,   10'000'000,   25'000'000,   50'000'000,   100'000'000,  250'000'000,
    500'000'000, 1000'000'000, 2500'000'000, 5000'000'000, 10000'000'000};
inline constexpr size_t kLatencyBuckets = kLatencyBoundsNs.size() + 1;  // the last is +Inf

// Relaxed counting: the counts are statistics, nothing is ordered by them.
inline void bump(std::atomic<uint64_t>& a, uint64_t n = 1) {
  a.fetch_add(n, std::memory_order_relaxed);
}
inline uint64_t value(const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); }

// A latency histogram of relaxed atomic buckets (not cumulative: the
// exposition makes them so).
struct LatencyHistogram {
  std::array<std::atomic<uint64_t>, kLatencyBuckets> buckets{};
  std::atomic<uint64_t> sum_ns{0};

  void record(uint64_t ns) {
    size_t i = 0;
    while (i < kLatencyBoundsNs.size() && ns > kLatencyBoundsNs[i]) ++i;
    bump(buckets[i]);
    bump(sum_ns, ns);
  }
};

// One connection's counters. Written by that connection's threads only.
struct alignas(64) RequestCounters {
  std::array<std::atomic<uint64_t>, kCommands> requests{};
  std::array<std::atomic<uint64_t>, kErrorNames> errors{};
  std::atomic<uint64_t> bytes_read{0}, bytes_written{0};
  // Of bytes_read, those sent from the page cache (sendfile), not copied.
  std::atomic<uint64_t> read_copy_free_bytes{0};
  // Gauges: read and not yet answered.
  std::atomic<uint64_t> in_flight{0}, in_flight_bytes{0};
  std::array<LatencyHistogram, kTimed> latency{};

  void count_request(Command c) { bump(requests[static_cast<size_t>(c)]); }
  void count_error(uint32_t nbd_error) { bump(errors[error_index(nbd_error)]); }
  void record_latency(Command c, std::chrono::steady_clock::duration d) {
    const int t = timed_index(c);
    if (t < 0) return;
    latency[static_cast<size_t>(t)].record(
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()));
  }
  uint64_t count(Command c) const { return value(requests[static_cast<size_t>(c)]); }
  // WRITE and WRITE_ZEROES: the requests that change the image.
  uint64_t writes() const { return count(Command::write) + count(Command::write_zeroes); }
  uint64_t total_requests() const;
  uint64_t total_errors() const;
};

struct HistogramTotals {
  std::array<uint64_t, kLatencyBuckets> buckets{};  // not cumulative
  uint64_t sum_ns = 0;
};

// A plain snapshot of RequestCounters, summed over connections.
struct RequestTotals {
  std::array<uint64_t, kCommands> requests{};
  std::array<uint64_t, kErrorNames> errors{};
  uint64_t bytes_read = 0, bytes_written = 0, in_flight = 0, in_flight_bytes = 0;
  uint64_t read_copy_free_bytes = 0;
  std::array<HistogramTotals, kTimed> latency{};

  void add(const RequestCounters& c);
};

// The request counters of one export: the totals of the connections that
// have closed plus the live ones.
class ExportMetrics {
 public:
  // A new connection's counters, registered until detach().
  std::shared_ptr<RequestCounters> attach();
  // Folds the connection's counts into the totals. Its gauges (in flight)
  // are zero by then: the connection has answered everything.
  void detach(const std::shared_ptr<RequestCounters>& c);
  RequestTotals totals() const;
  // Connections attached now.
  size_t clients() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<RequestCounters>> live_;
  RequestCounters closed_;  // only under mu_, atomics for RequestTotals::add
};

// Why a handshake failed or was refused.
enum class HandshakeFailure : uint8_t {
  tls_required,    // an option before STARTTLS where TLS is required
  policy,          // the export refused the client (TLS, identity)
  unknown_export,  // the client asked for an export that does not exist
  timeout,         // limits.handshake_timeout_ms passed
  tls_handshake,   // the TLS handshake itself failed
  protocol,        // malformed or unexpected bytes, limits, disconnects
};
inline constexpr size_t kHandshakeFailures = 6;
std::string_view to_string(HandshakeFailure f);

// Server-wide counters; any thread may add to them.
struct ServerMetrics {
  std::atomic<uint64_t> connections_open{0}, connections_total{0};
  std::atomic<uint64_t> connections_refused{0};  // limits.max_connections reached
  std::array<std::atomic<uint64_t>, kHandshakeFailures> handshake_failures{};
  std::atomic<uint64_t> tls_handshakes{0}, tls_handshakes_failed{0};
  double start_time_seconds = 0;  // set at construction, read-only after
  // The server's transmission threads (strata_io_threads); set by the
  // server at construction, null where there is none.
  const IoThreads* io_threads = nullptr;

  ServerMetrics();
  void count_handshake_failure(HandshakeFailure f) {
    bump(handshake_failures[static_cast<size_t>(f)]);
  }
};

// What a scrape knows about one export, gathered on the network thread.
struct ExportSample {
  std::string name;
  uint64_t size = 0;
  bool read_only = true;
  std::shared_ptr<const ExportMetrics> metrics;
  std::shared_ptr<const BlockDevice> device;
};

// The Prometheus text exposition format 0.0.4: a family's HELP and TYPE lines
// first, then its samples, label values escaped.
class Exposition {
 public:
  using Labels = std::vector<std::pair<std::string_view, std::string_view>>;

  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const Labels& labels, double value);
  void sample(std::string_view name, const Labels& labels, uint64_t value);
  // The _bucket (cumulative, with +Inf), _sum (seconds) and _count samples.
  void histogram(std::string_view name, const Labels& labels, const HistogramTotals& h);
  const std::string& text() const { return out_; }

 private:
  void series(std::string_view name, const Labels& labels);
  std::string out_;
};

// `"` → `\"`, `\` → `\\`, newline → `\n`, as label values need.
std::string escape_label_value(std::string_view v);

// The whole /metrics page.
std::string render_metrics(const ServerMetrics& server, const std::vector<ExportSample>& exports);

}  // namespace strata
