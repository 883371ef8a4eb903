#include "server/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <utility>

#include "formats/io_ring.h"
#include "protocol/nbd.h"

#ifndef STRATA_VERSION
#define STRATA_VERSION "unknown"
#endif

namespace strata {

namespace {

constexpr std::array<std::string_view, kCommands> kCommandNames = {
    "read", "write", "flush", "trim", "write_zeroes", "block_status", "cache", "other"};

// The NBD error values (protocol/nbd.h) in the order of kErrorNameStrings.
constexpr std::array<uint32_t, kErrorNames - 1> kNbdErrors = {
    nbd::kEPERM,  nbd::kEIO,       nbd::kENOMEM,  nbd::kEINVAL,
    nbd::kENOSPC, nbd::kEOVERFLOW, nbd::kENOTSUP, nbd::kESHUTDOWN};
constexpr std::array<std::string_view, kErrorNames> kErrorNameStrings = {
    "EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN", "other"};

constexpr std::array<std::string_view, kTimed> kTimedNames = {"read", "write", "flush",
                                                              "block_status"};
constexpr std::array<Command, kTimed> kTimedCommands = {Command::read, Command::write,
                                                        Command::flush, Command::block_status};

constexpr std::array<std::string_view, kHandshakeFailures> kHandshakeFailureNames = {
    "tls_required", "policy", "unknown_export", "timeout", "tls_handshake", "protocol"};

void add(std::atomic<uint64_t>& to, const std::atomic<uint64_t>& from) { bump(to, value(from)); }

// Adds every counter of `from` into `to` (gauges excepted).
void add_counters(RequestCounters& to, const RequestCounters& from) {
  for (size_t i = 0; i < kCommands; ++i) add(to.requests[i], from.requests[i]);
  for (size_t i = 0; i < kErrorNames; ++i) add(to.errors[i], from.errors[i]);
  add(to.bytes_read, from.bytes_read);
  add(to.read_copy_free_bytes, from.read_copy_free_bytes);
  add(to.bytes_written, from.bytes_written);
  for (size_t t = 0; t < kTimed; ++t) {
    for (size_t b = 0; b < kLatencyBuckets; ++b) {
      add(to.latency[t].buckets[b], from.latency[t].buckets[b]);
    }
    add(to.latency[t].sum_ns, from.latency[t].sum_ns);
  }
}

// The shortest text that reads back as `v` (Prometheus parses it as a Go
// float).
std::string format_double(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  // Plain decimals read best (le="0.0005", not "5e-04"); exponents only for
  // what would not fit.
  std::array<char, 64> buf{};
  auto r = std::to_chars(buf.data(), buf.data() + buf.size(), v, std::chars_format::fixed);
  if (r.ec != std::errc()) r = std::to_chars(buf.data(), buf.data() + buf.size(), v);
  return std::string(buf.data(), r.ptr);
}

std::string bound_seconds(uint64_t ns) { return format_double(static_cast<double>(ns) / 1e9); }

}  // namespace

std::string_view to_string(Command c) { return kCommandNames[static_cast<size_t>(c)]; }

Command command_of(uint16_t nbd_type) {
  switch (nbd_type) {
    case nbd::kCmdRead:
      return Command::read;
    case nbd::kCmdWrite:
      return Command::write;
    case nbd::kCmdFlush:
      return Command::flush;
    case nbd::kCmdTrim:
      return Command::trim;
    case nbd::kCmdWriteZeroes:
      return Command::write_zeroes;
    case nbd::kCmdBlockStatus:
      return Command::block_status;
    case nbd::kCmdCache:
      return Command::cache;
    default:
      return Command::other;
  }
}

size_t error_index(uint32_t nbd_error) {
  const auto* it = std::find(kNbdErrors.begin(), kNbdErrors.end(), nbd_error);
  return static_cast<size_t>(it - kNbdErrors.begin());  // kErrorNames - 1 ("other") if absent
}

std::string_view error_name(size_t index) { return kErrorNameStrings.at(index); }

std::string_view to_string(Timed t) { return kTimedNames[static_cast<size_t>(t)]; }

int timed_index(Command c) {
  const auto* it = std::find(kTimedCommands.begin(), kTimedCommands.end(), c);
  return it == kTimedCommands.end() ? -1 : static_cast<int>(it - kTimedCommands.begin());
}

std::string_view to_string(HandshakeFailure f) {
  return kHandshakeFailureNames[static_cast<size_t>(f)];
}

uint64_t RequestCounters::total_requests() const {
  uint64_t n = 0;
  for (const auto& r : requests) n += value(r);
  return n;
}

uint64_t RequestCounters::total_errors() const {
  uint64_t n = 0;
  for (const auto& e : errors) n += value(e);
  return n;
}

void RequestTotals::add(const RequestCounters& c) {
  for (size_t i = 0; i < kCommands; ++i) requests[i] += value(c.requests[i]);
  for (size_t i = 0; i < kErrorNames; ++i) errors[i] += value(c.errors[i]);
  bytes_read += value(c.bytes_read);
  read_copy_free_bytes += value(c.read_copy_free_bytes);
  bytes_written += value(c.bytes_written);
  in_flight += value(c.in_flight);
  in_flight_bytes += value(c.in_flight_bytes);
  for (size_t t = 0; t < kTimed; ++t) {
    for (size_t b = 0; b < kLatencyBuckets; ++b) {
      latency[t].buckets[b] += value(c.latency[t].buckets[b]);
    }
    latency[t].sum_ns += value(c.latency[t].sum_ns);
  }
}

std::shared_ptr<RequestCounters> ExportMetrics::attach() {
  auto c = std::make_shared<RequestCounters>();
  std::lock_guard lock(mu_);
  live_.push_back(c);
  return c;
}

void ExportMetrics::detach(const std::shared_ptr<RequestCounters>& c) {
  std::lock_guard lock(mu_);
  auto it = std::find(live_.begin(), live_.end(), c);
  if (it == live_.end()) return;
  add_counters(closed_, *c);
  live_.erase(it);
}

RequestTotals ExportMetrics::totals() const {
  RequestTotals t;
  std::lock_guard lock(mu_);
  t.add(closed_);
  for (const auto& c : live_) t.add(*c);
  return t;
}

size_t ExportMetrics::clients() const {
  std::lock_guard lock(mu_);
  return live_.size();
}

ServerMetrics::ServerMetrics()
    : start_time_seconds(
          std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
              .count()) {}

std::string escape_label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void Exposition::family(std::string_view name, std::string_view type, std::string_view help) {
  // HELP text escapes backslash and newline (not quotes).
  std::string h;
  for (char c : help) {
    if (c == '\\') {
      h += "\\\\";
    } else if (c == '\n') {
      h += "\\n";
    } else {
      h += c;
    }
  }
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  out_ += h;
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void Exposition::series(std::string_view name, const Labels& labels) {
  out_ += name;
  if (!labels.empty()) {
    out_ += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      if (i) out_ += ',';
      out_ += labels[i].first;
      out_ += "=\"";
      out_ += escape_label_value(labels[i].second);
      out_ += '"';
    }
    out_ += '}';
  }
  out_ += ' ';
}

void Exposition::sample(std::string_view name, const Labels& labels, double value) {
  series(name, labels);
  out_ += format_double(value);
  out_ += '\n';
}

void Exposition::sample(std::string_view name, const Labels& labels, uint64_t value) {
  series(name, labels);
  out_ += std::to_string(value);
  out_ += '\n';
}

void Exposition::histogram(std::string_view name, const Labels& labels, const HistogramTotals& h) {
  const std::string bucket = std::string(name) + "_bucket";
  uint64_t cumulative = 0;
  for (size_t b = 0; b < kLatencyBuckets; ++b) {
    cumulative += h.buckets[b];
    const std::string le =
        b < kLatencyBoundsNs.size() ? bound_seconds(kLatencyBoundsNs[b]) : "+Inf";
    Labels with_le = labels;
    with_le.emplace_back("le", le);
    sample(bucket, with_le, cumulative);
  }
  sample(std::string(name) + "_sum", labels, static_cast<double>(h.sum_ns) / 1e9);
  sample(std::string(name) + "_count", labels, cumulative);
}

namespace {

struct ExportTotals {
  const ExportSample* sample;
  RequestTotals requests;
  size_t clients;
  // Summed over the layers of the stack, by (driver, cache).
  std::map<std::pair<std::string, std::string>, CacheCounters> caches;
  std::map<std::pair<std::string, std::string>, uint64_t> allocations;  // (driver, unit)
};

void add_device_counters(const BlockDevice& d, ExportTotals& t, int depth) {
  if (depth > 64) return;  // chains are bounded when opened; this only guards the walk
  const DeviceCounters c = d.counters();
  const std::string driver(d.format());
  for (const auto& cache : c.caches) {
    auto& sum = t.caches[{driver, std::string(cache.cache)}];
    sum.hits += cache.hits;
    sum.misses += cache.misses;
    sum.evictions += cache.evictions;
  }
  if (!c.allocation_unit.empty()) {
    t.allocations[{driver, std::string(c.allocation_unit)}] += c.allocations;
  }
  for (const auto& child : d.children()) {
    if (child.device) add_device_counters(*child.device, t, depth + 1);
  }
}

void render_server(Exposition& x, const ServerMetrics& s) {
  x.family("strata_build_info", "gauge", "Always 1; the version label names the build.");
  x.sample("strata_build_info", {{"version", STRATA_VERSION}}, uint64_t{1});
  x.family("strata_start_time_seconds", "gauge", "When the server started, in Unix seconds.");
  x.sample("strata_start_time_seconds", {}, s.start_time_seconds);
  x.family("strata_connections_open", "gauge",
           "Client connections open now (in the handshake or attached to an export).");
  x.sample("strata_connections_open", {}, value(s.connections_open));
  x.family("strata_connections_total", "counter", "Client connections accepted.");
  x.sample("strata_connections_total", {}, value(s.connections_total));
  x.family("strata_connections_refused_total", "counter",
           "Client connections closed at once because limits.max_connections was reached.");
  x.sample("strata_connections_refused_total", {}, value(s.connections_refused));
  if (s.io_threads) {
    x.family("strata_io_threads", "gauge",
             "Transmission threads running now: one per connection in transmission, plus those "
             "started on demand (limits.max_io_threads bounds these).");
    x.sample("strata_io_threads", {}, s.io_threads->threads());
  }
  x.family("strata_handshakes_failed_total", "counter",
           "Handshakes that ended without an export, by reason.");
  for (size_t i = 0; i < kHandshakeFailures; ++i) {
    x.sample("strata_handshakes_failed_total",
             {{"reason", to_string(static_cast<HandshakeFailure>(i))}},
             value(s.handshake_failures[i]));
  }
  x.family("strata_tls_handshakes_total", "counter", "TLS handshakes started (STARTTLS).");
  x.sample("strata_tls_handshakes_total", {}, value(s.tls_handshakes));
  x.family("strata_tls_handshakes_failed_total", "counter", "TLS handshakes that failed.");
  x.sample("strata_tls_handshakes_failed_total", {}, value(s.tls_handshakes_failed));
  x.family("strata_io_uring_ops_total", "counter",
           "Reads and writes submitted to the kernel in batches through io_uring (cache none).");
  x.sample("strata_io_uring_ops_total", {}, ring_ops_submitted());
}

void render_requests(Exposition& x, const std::vector<ExportTotals>& all) {
  x.family("strata_export_clients", "gauge", "Connections attached to the export now.");
  for (const auto& e : all) {
    x.sample("strata_export_clients", {{"export", e.sample->name}}, uint64_t{e.clients});
  }
  x.family("strata_requests_total", "counter", "Requests received, by command.");
  for (const auto& e : all) {
    for (size_t i = 0; i < kCommands; ++i) {
      x.sample("strata_requests_total", {{"export", e.sample->name}, {"command", kCommandNames[i]}},
               e.requests.requests[i]);
    }
  }
  x.family("strata_read_bytes_total", "counter", "Bytes sent to clients in read replies.");
  for (const auto& e : all) {
    x.sample("strata_read_bytes_total", {{"export", e.sample->name}}, e.requests.bytes_read);
  }
  x.family("strata_read_copy_free_bytes_total", "counter",
           "Bytes of read replies sent from the page cache without a copy (sendfile).");
  for (const auto& e : all) {
    x.sample("strata_read_copy_free_bytes_total", {{"export", e.sample->name}},
             e.requests.read_copy_free_bytes);
  }
  x.family("strata_written_bytes_total", "counter", "Bytes written by clients (WRITE payloads).");
  for (const auto& e : all) {
    x.sample("strata_written_bytes_total", {{"export", e.sample->name}}, e.requests.bytes_written);
  }
  x.family("strata_errors_total", "counter", "Error replies, by NBD error.");
  for (const auto& e : all) {
    for (size_t i = 0; i < kErrorNames; ++i) {
      x.sample("strata_errors_total", {{"export", e.sample->name}, {"errno", kErrorNameStrings[i]}},
               e.requests.errors[i]);
    }
  }
  x.family("strata_request_duration_seconds", "histogram",
           "Time from reading a request to sending its reply, by command.");
  for (const auto& e : all) {
    for (size_t t = 0; t < kTimed; ++t) {
      x.histogram("strata_request_duration_seconds",
                  {{"export", e.sample->name}, {"command", kTimedNames[t]}}, e.requests.latency[t]);
    }
  }
  x.family("strata_requests_in_flight", "gauge", "Requests read and not yet answered.");
  for (const auto& e : all) {
    x.sample("strata_requests_in_flight", {{"export", e.sample->name}}, e.requests.in_flight);
  }
  x.family("strata_in_flight_bytes", "gauge",
           "Payload and read buffer bytes held by requests in flight.");
  for (const auto& e : all) {
    x.sample("strata_in_flight_bytes", {{"export", e.sample->name}}, e.requests.in_flight_bytes);
  }
}

void render_devices(Exposition& x, const std::vector<ExportTotals>& all) {
  struct CacheFamily {
    std::string_view name, help;
    uint64_t CacheCounters::*field;
  };
  const std::array<CacheFamily, 3> families = {{
      {"strata_metadata_cache_hits_total", "Metadata cache lookups that hit.",
       &CacheCounters::hits},
      {"strata_metadata_cache_misses_total", "Metadata cache lookups that missed (a read).",
       &CacheCounters::misses},
      {"strata_metadata_cache_evictions_total", "Metadata cache entries evicted.",
       &CacheCounters::evictions},
  }};
  for (const auto& f : families) {
    x.family(f.name, "counter", f.help);
    for (const auto& e : all) {
      for (const auto& [key, c] : e.caches) {
        x.sample(f.name, {{"export", e.sample->name}, {"driver", key.first}, {"cache", key.second}},
                 c.*f.field);
      }
    }
  }
  x.family("strata_allocations_total", "counter",
           "Clusters (qcow2) or blocks (VHD) allocated in the image.");
  for (const auto& e : all) {
    for (const auto& [key, n] : e.allocations) {
      x.sample("strata_allocations_total",
               {{"export", e.sample->name}, {"driver", key.first}, {"unit", key.second}}, n);
    }
  }
}

}  // namespace

std::string render_metrics(const ServerMetrics& server, const std::vector<ExportSample>& exports) {
  std::vector<ExportTotals> all;
  all.reserve(exports.size());
  for (const auto& s : exports) {
    ExportTotals t{.sample = &s,
                   .requests = s.metrics ? s.metrics->totals() : RequestTotals{},
                   .clients = s.metrics ? s.metrics->clients() : 0};
    if (s.device) add_device_counters(*s.device, t, 0);
    all.push_back(std::move(t));
  }
  Exposition x;
  render_server(x, server);
  render_requests(x, all);
  render_devices(x, all);
  return x.text();
}

}  // namespace strata
