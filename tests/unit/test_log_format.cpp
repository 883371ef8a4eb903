// The JSON log format (server/log_format.h): every message becomes one valid
// JSON line, whatever bytes it holds.
#include <doctest/doctest.h>
#include <spdlog/details/log_msg.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "server/log_format.h"

using strata::append_json_string;

namespace {

std::string escaped(std::string_view s) {
  std::string out;
  append_json_string(s, out);
  return out;
}

}  // namespace

TEST_CASE("quotes, backslashes and control characters are escaped") {
  CHECK(escaped("plain text") == "plain text");
  CHECK(escaped("say \"hi\"") == "say \\\"hi\\\"");
  CHECK(escaped("a\\b") == "a\\\\b");
  CHECK(escaped("l1\nl2\r\t") == "l1\\nl2\\r\\t");
  CHECK(escaped(std::string("nul\0x", 5)) == "nul\\u0000x");
  CHECK(escaped("\x1b[31m\x7f") == "\\u001b[31m\\u007f");
}

TEST_CASE("UTF-8 passes through, other bytes become the text \\xNN") {
  CHECK(escaped("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x92\xbe") ==
        "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x92\xbe");
  CHECK(escaped("\xff") == "\\\\xff");
  CHECK(escaped("\xc3") == "\\\\xc3");                                   // truncated sequence
  CHECK(escaped("\xc0\xaf") == "\\\\xc0\\\\xaf");                        // overlong '/'
  CHECK(escaped("\xed\xa0\x80") == "\\\\xed\\\\xa0\\\\x80");             // a surrogate
  CHECK(escaped("\xf4\x90\x80\x80") == "\\\\xf4\\\\x90\\\\x80\\\\x80");  // above U+10FFFF
}

TEST_CASE("every byte string gives a line nlohmann::json parses back") {
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  const std::string text = "{\"m\":\"" + escaped(all + "\"\\" + all) + "\"}";
  auto j = nlohmann::json::parse(text);
  CHECK(j["m"].get<std::string>().size() > all.size());
  CHECK(j["m"].get<std::string>().substr(0, 32) == all.substr(0, 32));
}

TEST_CASE("log formats by name") {
  CHECK(strata::parse_log_format("text") == strata::LogFormat::text);
  CHECK(strata::parse_log_format("json") == strata::LogFormat::json);
  CHECK_FALSE(strata::parse_log_format("xml"));
}

TEST_CASE("a JSON log line: time in RFC 3339 UTC, level, logger, message") {
  using namespace std::chrono;
  const auto when = system_clock::time_point(seconds(1714564800) + milliseconds(123));
  spdlog::details::log_msg msg(when, spdlog::source_loc{}, "strata", spdlog::level::warn,
                               "export \"a\"\nb");
  spdlog::memory_buf_t buf;
  strata::JsonLogFormatter().format(msg, buf);
  const std::string line(buf.data(), buf.size());
  CHECK(line ==
        "{\"time\":\"2024-05-01T12:00:00.123Z\",\"level\":\"warning\",\"logger\":\"strata\","
        "\"message\":\"export \\\"a\\\"\\nb\"}\n");
  CHECK(nlohmann::json::parse(line)["message"] == "export \"a\"\nb");
}
