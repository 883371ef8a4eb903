// Image builders over the in-tree creation code (`strata create`); tests that
// want an independent image use qemu-img through sh() instead.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "formats/open.h"

namespace strata::test {

// Creates an image; size may be empty when a backing image gives it.
void create_image(Format format, const std::string& path, std::optional<uint64_t> size,
                  std::map<std::string, std::string> options = {},
                  std::optional<std::string> backing = std::nullopt);

}  // namespace strata::test
