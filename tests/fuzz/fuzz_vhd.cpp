// fuzz_vhd: the VHD driver on an image held in memory (fixed, dynamic or
// differencing), driven like fuzz_qcow2 (tests/fuzz/image_ops.h).
//
// A differencing input finds its parent the way a user's would, by its
// locators and parent name, in the image's directory. That directory holds
// three sane parents made once at start-up, with fixed unique ids so that
// checked-in seeds match them:
//   parent-fixed.vhd    fixed, 1 MiB
//   parent-dynamic.vhd  dynamic, 1 MiB, 16 KiB blocks, some of them allocated
//   parent-diff.vhd     differencing over parent-dynamic.vhd
// Each holds a pattern in part of its sectors, so what a child shows of its
// parent is not just zeros. STRATA_FUZZ_VHD_DIR names the directory (make_corpus.py
// uses it to create children over the same parents); by default it is a new
// temporary one.
//
// Script byte 0 (image_ops.h) picks the variant: bits 1-2 the size mode
// (current, chs, qemu), bit 3 strict parent time stamps, bit 4 "fix the
// checksums" (of both footer copies and of the dynamic header, before the
// open) so that mutated fields are looked at rather than refused at the
// checksum.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "formats/create.h"
#include "formats/open.h"
#include "formats/vhd/vhd_format.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/image_ops.h"

namespace {

namespace vhd = strata::vhd;

std::string g_dir;
bool g_remove_dir = false;

constexpr uint64_t kParentSize = 1 << 20;

vhd::Uuid fixed_id(uint8_t n) {
  vhd::Uuid id;
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(0x5a + n * 16 + i);
  return id;
}

// Writes a recognizable pattern in every third 4 KiB piece of the first
// 512 KiB, so some blocks stay unallocated.
void write_pattern(const std::string& path, uint8_t seed) {
  strata::OpenOptions o;
  o.lock = false;
  o.allowed_dirs = {g_dir};
  auto dev = strata::open_image(path, o);
  std::vector<std::byte> buf(4096);
  for (uint64_t off = 0; off < kParentSize / 2; off += 3 * buf.size()) {
    for (size_t i = 0; i < buf.size(); ++i) {
      buf[i] = static_cast<std::byte>(seed + (off >> 12) + i * 3);
    }
    FUZZ_CHECK(dev->write(off, buf, false) == 0, "cannot write a VHD parent");
  }
  FUZZ_CHECK(dev->flush() == 0, "cannot flush a VHD parent");
}

// Gives the image a fixed unique id (both footer copies).
void set_unique_id(const std::string& path, const vhd::Uuid& id) {
  auto f = strata::host_file_system()->open(path, true);
  uint64_t end = static_cast<uint64_t>(f->size());
  uint8_t buf[512];
  vhd::Footer footer;
  FUZZ_CHECK(strata::read_bytes(*f, end - 512, buf, 512) == 0, "cannot read a VHD footer");
  FUZZ_CHECK(vhd::parse_footer(buf, footer).empty(), "a new VHD parent has a bad footer");
  footer.unique_id = id;
  vhd::serialize_footer(footer, buf);
  FUZZ_CHECK(strata::write_bytes(*f, end - 512, buf, 512) == 0, "cannot write a VHD footer");
  if (footer.disk_type != vhd::kTypeFixed) {
    FUZZ_CHECK(strata::write_bytes(*f, 0, buf, 512) == 0, "cannot write a VHD footer copy");
  }
}

void make_parent(const std::string& name, const std::string& type, const char* backing, uint8_t n) {
  strata::CreateOptions c;
  c.format = strata::Format::vhd;
  c.path = g_dir + "/" + name;
  c.options["type"] = type;
  if (type != "fixed") c.options["block_size"] = "16K";
  if (backing) {
    c.backing = backing;
  } else {
    c.size = kParentSize;
  }
  std::filesystem::remove(c.path);
  strata::create_image(c);
  write_pattern(c.path, static_cast<uint8_t>(0x10 * n + 1));
  set_unique_id(c.path, fixed_id(n));
}

void make_parents() {
  make_parent("parent-fixed.vhd", "fixed", nullptr, 1);
  make_parent("parent-dynamic.vhd", "dynamic", nullptr, 2);
  make_parent("parent-diff.vhd", "differencing", "parent-dynamic.vhd", 3);
}

std::shared_ptr<strata::BlockDevice> open_vhd_from(std::unique_ptr<strata::File> file,
                                                   const strata::fuzz::ImageSession::Settings& s) {
  static const char* const kSizeModes[] = {"current", "chs", "qemu", "current"};
  strata::ChainContext ctx;
  ctx.options.format = strata::Format::vhd;
  ctx.options.read_only = !s.writable;
  ctx.options.lock = false;
  ctx.options.vhd_size_mode = kSizeModes[s.variant & 3];
  ctx.options.vhd_strict_parent_timestamp = (s.variant >> 2) & 1;
  ctx.options.allowed_dirs = {g_dir};
  ctx.allowed_dirs = {g_dir};
  return strata::open_vhd(std::move(file), ctx);
}

uint64_t be64_at(const strata::fuzz::Bytes& b, uint64_t off) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | static_cast<uint8_t>(b[off + i]);
  return v;
}

// Recomputes the checksum of the structure at `off` if it has its cookie.
void fix_checksum(strata::fuzz::Bytes& b, uint64_t off, const char* cookie, size_t len,
                  size_t checksum_off) {
  if (off > b.size() || b.size() - off < len) return;
  auto* p = reinterpret_cast<uint8_t*>(b.data() + off);
  if (std::memcmp(p, cookie, 8) != 0) return;
  uint32_t c = vhd::checksum(p, len, checksum_off);
  for (int i = 0; i < 4; ++i) p[checksum_off + i] = static_cast<uint8_t>(c >> (24 - 8 * i));
}

void fix_checksums(strata::fuzz::Bytes& b, const strata::fuzz::ImageSession::Settings& s) {
  if (!((s.variant >> 3) & 1) || b.size() < 512) return;
  for (uint64_t footer : {uint64_t{0}, uint64_t{b.size() - 512}}) {
    fix_checksum(b, footer, "conectix", 512, 64);
    if (std::memcmp(b.data() + footer, "conectix", 8) == 0) {
      fix_checksum(b, be64_at(b, footer + 16), "cxsparse", 1024, 36);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  strata::fuzz::quiet_logs();
  if (const char* d = std::getenv("STRATA_FUZZ_VHD_DIR")) {
    std::filesystem::create_directories(d);
    g_dir = std::filesystem::canonical(d).string();
  } else {
    g_dir = strata::fuzz::make_temp_dir("vhd");
    g_remove_dir = true;
  }
  make_parents();
  std::atexit([] {
    if (g_remove_dir) std::filesystem::remove_all(g_dir);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  strata::fuzz::ImageSession session(g_dir + "/child.vhd", open_vhd_from, fix_checksums);
  session.run(data, size);
  return 0;
}
