// The metrics counters and their text exposition (server/metrics.h): label
// escaping, cumulative histogram buckets with +Inf, _sum and _count, totals
// that survive connections closing, and a whole page that promtool accepts.
#include <doctest/doctest.h>

#include <fstream>
#include <string>

#include "formats/open.h"
#include "protocol/nbd.h"
#include "server/metrics.h"
#include "tests/support/images.h"
#include "tests/support/shell.h"
#include "tests/support/temp_dir.h"

using namespace strata;

namespace {

bool has_line(const std::string& text, const std::string& line) {
  return text.find("\n" + line + "\n") != std::string::npos || text.starts_with(line + "\n");
}

// The page checked by promtool, the independent oracle; its findings are
// shown on failure.
void check_with_promtool(const std::string& page) {
  test::TempDir dir("strata-metrics");
  const std::string path = dir / "metrics.txt";
  std::ofstream(path) << page;
  const int status = test::sh_status("promtool check metrics < " + path);
  INFO(test::last_log());
  CHECK(status == 0);
}

}  // namespace

TEST_CASE("label values escape backslash, double quote and newline, and nothing else") {
  CHECK(escape_label_value("plain-name_1") == "plain-name_1");
  CHECK(escape_label_value("a\\b") == "a\\\\b");
  CHECK(escape_label_value("say \"hi\"") == "say \\\"hi\\\"");
  CHECK(escape_label_value("l1\nl2") == "l1\\nl2");
  CHECK(escape_label_value("tab\tand ünïcode") == "tab\tand ünïcode");
}

TEST_CASE("a family starts with HELP and TYPE, samples carry their escaped labels") {
  Exposition x;
  x.family("strata_test_total", "counter", "A help text with a \\ and a\nnewline.");
  x.sample("strata_test_total", {{"export", "d\"i\\sk\n"}, {"command", "read"}}, uint64_t{42});
  x.sample("strata_test_total", {}, 0.5);
  CHECK(x.text() ==
        "# HELP strata_test_total A help text with a \\\\ and a\\nnewline.\n"
        "# TYPE strata_test_total counter\n"
        "strata_test_total{export=\"d\\\"i\\\\sk\\n\",command=\"read\"} 42\n"
        "strata_test_total 0.5\n");
}

TEST_CASE("histogram buckets are cumulative, end in +Inf, and _count is the +Inf bucket") {
  LatencyHistogram h;
  h.record(10'000);          // 10 us: the first bucket (le 50 us)
  h.record(1'000'000);       // 1 ms exactly: le="0.001" holds it (bounds are inclusive)
  h.record(1'000'001);       // just over 1 ms: le="0.0025"
  h.record(20'000'000'000);  // 20 s: past the last bound, +Inf only
  HistogramTotals ht;
  for (size_t b = 0; b < kLatencyBuckets; ++b) ht.buckets[b] = value(h.buckets[b]);
  ht.sum_ns = value(h.sum_ns);

  Exposition x;
  x.family("strata_test_duration_seconds", "histogram", "Latency.");
  x.histogram("strata_test_duration_seconds", {{"export", "e"}}, ht);
  const std::string& s = x.text();
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"0.00005\"} 1"));
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"0.0005\"} 1"));
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"0.001\"} 2"));
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"0.0025\"} 3"));
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"10\"} 3"));
  CHECK(has_line(s, "strata_test_duration_seconds_bucket{export=\"e\",le=\"+Inf\"} 4"));
  CHECK(has_line(s, "strata_test_duration_seconds_count{export=\"e\"} 4"));
  CHECK(has_line(s, "strata_test_duration_seconds_sum{export=\"e\"} 20.002010001"));
  // Every bound once, in increasing order, then +Inf.
  size_t at = 0;
  for (uint64_t bound : kLatencyBoundsNs) {
    (void)bound;
    at = s.find("_bucket{", at);
    REQUIRE(at != std::string::npos);
    ++at;
  }
  CHECK(s.find("le=\"+Inf\"", at) != std::string::npos);
  check_with_promtool(s);
}

TEST_CASE("NBD errors and commands map to their names") {
  CHECK(error_name(error_index(nbd::kEPERM)) == "EPERM");
  CHECK(error_name(error_index(nbd::kEIO)) == "EIO");
  CHECK(error_name(error_index(nbd::kENOSPC)) == "ENOSPC");
  CHECK(error_name(error_index(nbd::kESHUTDOWN)) == "ESHUTDOWN");
  CHECK(error_name(error_index(nbd::kEOVERFLOW)) == "EOVERFLOW");
  CHECK(error_name(error_index(12345)) == "other");
  CHECK(command_of(nbd::kCmdRead) == Command::read);
  CHECK(command_of(nbd::kCmdWriteZeroes) == Command::write_zeroes);
  CHECK(command_of(nbd::kCmdBlockStatus) == Command::block_status);
  CHECK(command_of(99) == Command::other);
  CHECK(timed_index(Command::flush) >= 0);
  CHECK(timed_index(Command::trim) < 0);
}

TEST_CASE("an export's totals keep the counts of connections that closed, once") {
  auto m = std::make_shared<ExportMetrics>();
  auto a = m->attach();
  auto b = m->attach();
  CHECK(m->clients() == 2);
  for (int i = 0; i < 3; ++i) a->count_request(Command::read);
  bump(a->bytes_read, 3 * 4096);
  b->count_request(Command::write);
  bump(b->bytes_written, 512);
  b->count_error(nbd::kEPERM);
  b->record_latency(Command::write, std::chrono::microseconds(70));
  m->detach(b);
  m->detach(b);  // a second detach must not count it twice
  CHECK(m->clients() == 1);
  RequestTotals t = m->totals();
  CHECK(t.requests[static_cast<size_t>(Command::read)] == 3);
  CHECK(t.requests[static_cast<size_t>(Command::write)] == 1);
  CHECK(t.bytes_read == 3 * 4096);
  CHECK(t.bytes_written == 512);
  CHECK(t.errors[error_index(nbd::kEPERM)] == 1);
  CHECK(t.latency[static_cast<size_t>(timed_index(Command::write))].buckets[1] == 1);
  m->detach(a);
  CHECK(m->clients() == 0);
  CHECK(m->totals().requests[static_cast<size_t>(Command::read)] == 3);
}

TEST_CASE(
    "the whole page, with a qcow2 export's caches and a hostile export name, passes promtool") {
  test::TempDir dir("strata-metrics");
  const std::string img = dir / "disk.qcow2";
  test::create_image(Format::qcow2, img, 1 << 20);
  OpenOptions opts;
  opts.read_only = false;
  auto dev = open_image(img, opts);
  std::vector<std::byte> buf(4096, std::byte{0x5a});
  REQUIRE(dev->write(0, buf, false) == 0);
  REQUIRE(dev->read(0, buf) == 0);

  ServerMetrics server;
  bump(server.connections_total, 2);
  server.count_handshake_failure(HandshakeFailure::unknown_export);
  auto m = std::make_shared<ExportMetrics>();
  auto c = m->attach();
  c->count_request(Command::read);
  c->record_latency(Command::read, std::chrono::milliseconds(3));
  std::vector<ExportSample> exports = {
      {.name = "disk", .size = dev->size(), .read_only = false, .metrics = m, .device = dev},
      {.name = "we\"ird\\name\n",
       .size = 0,
       .read_only = true,
       .metrics = nullptr,
       .device = nullptr},
  };
  const std::string page = render_metrics(server, exports);
  CHECK(has_line(page, "strata_connections_total 2"));
  CHECK(has_line(page, "strata_handshakes_failed_total{reason=\"unknown_export\"} 1"));
  CHECK(has_line(page, "strata_requests_total{export=\"disk\",command=\"read\"} 1"));
  CHECK(
      has_line(page, "strata_requests_total{export=\"we\\\"ird\\\\name\\n\",command=\"read\"} 0"));
  CHECK(has_line(page,
                 "strata_allocations_total{export=\"disk\",driver=\"qcow2\",unit=\"cluster\"} 1"));
  CHECK(page.find(
            "strata_metadata_cache_misses_total{export=\"disk\",driver=\"qcow2\",cache=\"l2\"}") !=
        std::string::npos);
  CHECK(page.find("strata_build_info{version=") != std::string::npos);
  check_with_promtool(page);
}
