#include <doctest/doctest.h>

#include "formats/create.h"

TEST_CASE("parse_size understands binary suffixes") {
  CHECK(strata::parse_size("512") == 512);
  CHECK(strata::parse_size("64M") == 64ull << 20);
  CHECK(strata::parse_size("1G") == 1ull << 30);
  CHECK_THROWS(strata::parse_size("12Q"));
}
