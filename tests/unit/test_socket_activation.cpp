// Socket activation's environment (server/socket_activation.h): which fds
// LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES hand over, and the environments that
// are refused or not for us.
#include <doctest/doctest.h>

#include <stdexcept>

#include "server/socket_activation.h"

using strata::parse_listen_env;

TEST_CASE("LISTEN_FDS for our pid hands over fds 3 onwards") {
  auto s = parse_listen_env("1234", "3", std::nullopt, 1234);
  REQUIRE(s.size() == 3);
  CHECK(s[0].fd == 3);
  CHECK(s[1].fd == 4);
  CHECK(s[2].fd == 5);
  CHECK(s[0].name.empty());
}

TEST_CASE("LISTEN_FDNAMES names each fd in order") {
  auto s = parse_listen_env("7", "2", "nbd.sock:tcp", 7);
  REQUIRE(s.size() == 2);
  CHECK(s[0].name == "nbd.sock");
  CHECK(s[1].name == "tcp");
  auto empty_names = parse_listen_env("7", "2", ":", 7);
  REQUIRE(empty_names.size() == 2);
  CHECK(empty_names[1].name.empty());
}

TEST_CASE("no LISTEN_PID, or another process's, means no activation") {
  CHECK(parse_listen_env(std::nullopt, "1", std::nullopt, 7).empty());
  CHECK(parse_listen_env("8", "1", std::nullopt, 7).empty());
  CHECK(parse_listen_env("8", "garbage", std::nullopt, 7).empty());
  CHECK(parse_listen_env("not-a-pid", "1", std::nullopt, 7).empty());
  CHECK(parse_listen_env("", "1", std::nullopt, 7).empty());
  CHECK(parse_listen_env("+7", "1", std::nullopt, 7).empty());
  CHECK(parse_listen_env("7 ", "1", std::nullopt, 7).empty());
}

TEST_CASE("a broken environment meant for us is refused") {
  CHECK_THROWS_AS(parse_listen_env("7", std::nullopt, std::nullopt, 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "0", std::nullopt, 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "-1", std::nullopt, 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "", std::nullopt, 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "2x", std::nullopt, 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "99999999999999999999999", std::nullopt, 7),
                  std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "65", std::nullopt, 7), std::runtime_error);
  CHECK(parse_listen_env("7", "64", std::nullopt, 7).size() == 64);
  CHECK_THROWS_AS(parse_listen_env("7", "2", "only-one", 7), std::runtime_error);
  CHECK_THROWS_AS(parse_listen_env("7", "1", "a:b", 7), std::runtime_error);
}
