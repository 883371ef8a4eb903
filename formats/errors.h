// Errors raised while opening or creating images.
//
// An ImageError's message names the file, the field and the problem, e.g.
//   "disk.vhd: dynamic header: block_size 3000 is not a power of two".
// I/O paths never throw: they return errno values (see block_device.h).
#pragma once

#include <stdexcept>
#include <string>

namespace strata {

class ImageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "PATH: WHAT" — the usual shape of an ImageError message.
[[noreturn]] void throw_image_error(const std::string& path, const std::string& what);

}  // namespace strata
