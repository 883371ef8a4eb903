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

// An image another export or process holds a lock on (formats/file.h,
// lock_image): a reload tells it from other refusals, because the holder may
// be an export it is about to close.
class ImageInUseError : public ImageError {
 public:
  using ImageError::ImageError;
};

// "PATH: WHAT" — the usual shape of an ImageError message.
[[noreturn]] void throw_image_error(const std::string& path, const std::string& what);

}  // namespace strata
