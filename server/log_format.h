// The two log formats of `strata serve --log-format`: text (the default, for
// people) and json (one object per line, for collectors):
//   {"time":"2024-05-01T12:00:00.123Z","level":"info","logger":"strata","message":"..."}
// time is RFC 3339 in UTC with milliseconds. Every line is valid JSON
// whatever the message holds: quotes, backslashes and control characters are
// escaped, and bytes that are not UTF-8 (an export name a client sent, a file
// name) are written as the text \xNN, so a reader sees which byte it was.
#pragma once

#include <spdlog/formatter.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace strata {

enum class LogFormat { text, json };
std::optional<LogFormat> parse_log_format(std::string_view name);

// Appends `s` to `out` as the contents of a JSON string (without the quotes).
void append_json_string(std::string_view s, std::string& out);

class JsonLogFormatter : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override;
  std::unique_ptr<spdlog::formatter> clone() const override;
};

// Sets the format of every logger (and of those registered later).
void set_log_format(LogFormat f);

}  // namespace strata
