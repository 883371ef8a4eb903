// fuzz_qcow2: the qcow2 driver on an image held in memory: open, check, a
// short script of reads, writes, zeroes, trims, flushes and block-status
// queries, then a reopen (tests/fuzz/image_ops.h says what is checked).
//
// The input is a standalone image: the image "lives" in an empty directory,
// the only one allowed, so a backing file or external data file it names
// is never found and the open is refused (as it would be for a user).
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "formats/open.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/image_ops.h"

namespace {

std::string g_dir;

std::shared_ptr<strata::BlockDevice> open_qcow2_from(
    std::unique_ptr<strata::File> file, const strata::fuzz::ImageSession::Settings& s) {
  strata::ChainContext ctx;
  ctx.options.format = strata::Format::qcow2;
  ctx.options.read_only = !s.writable;
  ctx.options.lock = false;
  ctx.options.metadata_cache_bytes = s.cache_bytes;
  ctx.options.allowed_dirs = {g_dir};
  ctx.allowed_dirs = {g_dir};
  return strata::open_qcow2(std::move(file), ctx);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  strata::fuzz::quiet_logs();
  g_dir = strata::fuzz::make_temp_dir("qcow2");
  std::atexit([] { ::rmdir(g_dir.c_str()); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  strata::fuzz::ImageSession session(g_dir + "/image.qcow2", open_qcow2_from);
  session.run(data, size);
  return 0;
}
