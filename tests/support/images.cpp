#include "tests/support/images.h"

#include "formats/create.h"

namespace strata::test {

void create_image(Format format, const std::string& path, std::optional<uint64_t> size,
                  std::map<std::string, std::string> options, std::optional<std::string> backing) {
  CreateOptions co;
  co.format = format;
  co.path = path;
  co.size = size;
  co.options = std::move(options);
  co.backing = std::move(backing);
  strata::create_image(co);
}

}  // namespace strata::test
