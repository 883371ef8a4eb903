// qcow2 image creation for `strata create -f qcow2 -o key=value,...`.
//
// Layout: header + extensions + backing name in cluster 0, then the refcount
// table, the refcount blocks, the L1 table and (data_file_raw only) L2 tables
// preallocated 1:1, all counted by the refcount blocks.
#include "formats/create.h"

#include <cstring>
#include <filesystem>

#include "formats/endian.h"
#include "formats/errors.h"
#include "formats/qcow2/header.h"

namespace strata {
namespace {

bool parse_bool(const CreateOptions& o, const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "1") return true;
  if (v == "off" || v == "false" || v == "0") return false;
  throw_image_error(o.path, "option " + key + "=" + v + ": expected on or off");
}

void put_ext(std::vector<uint8_t>& c0, size_t& pos, uint32_t type, const void* data, size_t len) {
  store_be32(c0.data() + pos, type);
  store_be32(c0.data() + pos + 4, static_cast<uint32_t>(len));
  std::memcpy(c0.data() + pos + 8, data, len);
  pos += 8 + ((len + 7) & ~size_t{7});
}

}  // namespace

void create_qcow2(const CreateOptions& opts) {
  using namespace qcow2;
  const std::string& path = opts.path;
  uint64_t cs = 65536;
  uint32_t version = 3;
  bool ext = false, lazy = false, raw = false;
  uint32_t refcount_bits = 16;
  uint8_t compression = 0;
  std::string data_file;
  for (const auto& [k, v] : opts.options) {
    if (k == "cluster_size") {
      try {
        cs = parse_size(v);
      } catch (const std::exception&) {
        throw_image_error(path, "option cluster_size=" + v + " is not a size");
      }
      if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
        throw_image_error(path,
                          "option cluster_size=" + v + ": must be a power of two from 512 to 2M");
      }
    } else if (k == "compat") {
      if (v == "0.10" || v == "v2") {
        version = 2;
      } else if (v == "1.1" || v == "v3") {
        version = 3;
      } else {
        throw_image_error(path, "option compat=" + v + ": expected 0.10 or 1.1");
      }
    } else if (k == "extended_l2") {
      ext = parse_bool(opts, k, v);
    } else if (k == "lazy_refcounts") {
      lazy = parse_bool(opts, k, v);
    } else if (k == "data_file_raw") {
      raw = parse_bool(opts, k, v);
    } else if (k == "data_file") {
      data_file = v;
    } else if (k == "refcount_bits") {
      refcount_bits = static_cast<uint32_t>(std::stoul(v));
      if (refcount_bits == 0 || refcount_bits > 64 || (refcount_bits & (refcount_bits - 1))) {
        throw_image_error(path, "option refcount_bits=" + v + ": must be a power of two up to 64");
      }
    } else if (k == "compression_type") {
      if (v == "zlib") {
        compression = 0;
      } else if (v == "zstd") {
        compression = 1;
      } else {
        throw_image_error(path, "option compression_type=" + v + ": expected zlib or zstd");
      }
    } else {
      throw_image_error(path, "unknown qcow2 option '" + k + "'");
    }
  }
  const uint32_t cluster_bits = static_cast<uint32_t>(__builtin_ctzll(cs));
  if (version == 2 && (ext || lazy || !data_file.empty() || compression || refcount_bits != 16)) {
    throw_image_error(path,
                      "compat=0.10 images cannot use extended_l2, lazy_refcounts, data_file, "
                      "compression_type or refcount_bits other than 16");
  }
  if (ext && cs < 16384)
    throw_image_error(path, "extended_l2 needs a cluster_size of at least 16k");
  if (raw && data_file.empty()) throw_image_error(path, "data_file_raw needs data_file");
  if (raw && opts.backing)
    throw_image_error(path, "data_file_raw images cannot have a backing file");
  if (data_file.size() > 1023) throw_image_error(path, "data_file name is too long");

  uint64_t size = 0;
  std::string backing_fmt;
  if (opts.backing) {
    if (opts.backing->size() > 1023) throw_image_error(path, "backing file name is too long");
    if (opts.backing_format != Format::automatic)
      backing_fmt = std::string(to_string(opts.backing_format));
    if (backing_fmt == "vhd") backing_fmt = "vpc";  // the name QEMU records
    if (!opts.size) {
      namespace fs = std::filesystem;
      fs::path bp(*opts.backing);
      if (bp.is_relative()) bp = fs::absolute(path).parent_path() / bp;
      OpenOptions bo;
      bo.read_only = true;
      bo.format = opts.backing_format;
      bo.allow_raw_backing_probe = opts.backing_format == Format::raw;
      size = open_image(bp.string(), bo)->size();
    }
  }
  if (opts.size) size = *opts.size;
  if (!opts.size && !opts.backing) throw_image_error(path, "a size is required");
  size = (size + 511) & ~uint64_t{511};

  const uint32_t refcount_order = static_cast<uint32_t>(__builtin_ctz(refcount_bits));
  const uint64_t l1_entries = l1_entries_needed(size, cluster_bits, ext);
  const uint64_t l1_clusters = (l1_entries * 8 + cs - 1) / cs;
  if (l1_entries * 8 > kMaxL1Bytes)
    throw_image_error(path, "size is too large for this cluster_size");
  const uint64_t l2_tables = raw ? l1_entries : 0;
  const uint64_t rb_entries = cs * 8 / refcount_bits;
  uint64_t rt_clusters = 1, rb = 1;
  for (;;) {
    uint64_t total = 1 + rt_clusters + rb + l1_clusters + l2_tables;
    uint64_t rb2 = (total + rb_entries - 1) / rb_entries;
    uint64_t rt2 = (rb2 * 8 + cs - 1) / cs;
    if (rb2 == rb && rt2 == rt_clusters) break;
    rb = rb2;
    rt_clusters = rt2;
  }
  const uint64_t rt_off = cs;
  const uint64_t rb_off = rt_off + rt_clusters * cs;
  const uint64_t l1_off = rb_off + rb * cs;
  const uint64_t l2_off = l1_off + l1_clusters * cs;
  const uint64_t total = 1 + rt_clusters + rb + l1_clusters + l2_tables;

  // Cluster 0.
  std::vector<uint8_t> c0(cs, 0);
  store_be32(c0.data(), kMagic);
  store_be32(c0.data() + 4, version);
  store_be32(c0.data() + 20, cluster_bits);
  store_be64(c0.data() + 24, size);
  store_be32(c0.data() + 36, static_cast<uint32_t>(l1_entries));
  store_be64(c0.data() + 40, l1_off);
  store_be64(c0.data() + 48, rt_off);
  store_be32(c0.data() + 56, static_cast<uint32_t>(rt_clusters));
  size_t pos = 72;
  if (version == 3) {
    uint64_t incompat = 0;
    if (!data_file.empty()) incompat |= kIncompatDataFile;
    if (compression) incompat |= kIncompatCompression;
    if (ext) incompat |= kIncompatExtendedL2;
    store_be64(c0.data() + 72, incompat);
    store_be64(c0.data() + 80, lazy ? kCompatLazyRefcounts : 0);
    store_be64(c0.data() + 88, raw ? kAutoclearDataFileRaw : 0);
    store_be32(c0.data() + 96, refcount_order);
    store_be32(c0.data() + 100, 112);
    c0[104] = compression;
    pos = 112;
  }
  if (!backing_fmt.empty()) put_ext(c0, pos, 0xE2792ACA, backing_fmt.data(), backing_fmt.size());
  if (!data_file.empty()) put_ext(c0, pos, 0x44415441, data_file.data(), data_file.size());
  if (version == 3) {
    static const struct {
      uint8_t type, bit;
      const char* name;
    } names[] = {
        {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"},          {2, 1, "raw external data"}};
    std::vector<uint8_t> table(sizeof names / sizeof names[0] * 48, 0);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
      table[i * 48] = names[i].type;
      table[i * 48 + 1] = names[i].bit;
      std::memcpy(table.data() + i * 48 + 2, names[i].name, std::strlen(names[i].name));
    }
    if (pos + 8 + table.size() + 8 + (opts.backing ? opts.backing->size() : 0) <= cs) {
      put_ext(c0, pos, 0x6803F857, table.data(), table.size());
    }
  }
  pos += 8;  // end marker (zeros)
  if (opts.backing) {
    if (pos + opts.backing->size() > cs)
      throw_image_error(path, "backing file name does not fit in cluster 0");
    std::memcpy(c0.data() + pos, opts.backing->data(), opts.backing->size());
    store_be64(c0.data() + 8, pos);
    store_be32(c0.data() + 16, static_cast<uint32_t>(opts.backing->size()));
  }

  // Refcount table and blocks: clusters [0, total) have refcount 1.
  std::vector<uint8_t> rt(rt_clusters * cs, 0);
  for (uint64_t i = 0; i < rb; ++i) store_be64(rt.data() + i * 8, rb_off + i * cs);
  std::vector<uint8_t> rbs(rb * cs, 0);
  for (uint64_t c = 0; c < total; ++c) {
    uint64_t bit = c * refcount_bits;
    if (refcount_bits < 8) {
      rbs[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
    } else {
      rbs[bit / 8 + refcount_bits / 8 - 1] = 1;  // big-endian 1
    }
  }
  // L1 (and preallocated L2 tables mapping the raw data file 1:1).
  std::vector<uint8_t> l1(l1_clusters * cs, 0);
  std::vector<uint8_t> l2s(l2_tables * cs, 0);
  if (raw) {
    const uint64_t entry_bytes = ext ? 16 : 8, per_table = cs / entry_bytes;
    const uint64_t clusters = (size + cs - 1) / cs;
    for (uint64_t t = 0; t < l2_tables; ++t)
      store_be64(l1.data() + t * 8, (l2_off + t * cs) | kCopied);
    for (uint64_t g = 0; g < clusters; ++g) {
      uint8_t* e = l2s.data() + (g / per_table) * cs + (g % per_table) * entry_bytes;
      store_be64(e, (g * cs) | kCopied);
      if (ext) store_be64(e + 8, 0xffffffffull);
    }
  }
  auto f = create_file(path);
  auto put = [&](uint64_t off, const std::vector<uint8_t>& v) {
    if (!v.empty() && write_bytes(*f, off, v.data(), v.size()) != 0)
      throw_image_error(path, "write failed");
  };
  put(0, c0);
  put(rt_off, rt);
  put(rb_off, rbs);
  put(l1_off, l1);
  put(l2_off, l2s);
  if (f->sync() != 0) throw_image_error(path, "sync failed");
  if (!data_file.empty()) {
    namespace fs = std::filesystem;
    fs::path dp(data_file);
    if (dp.is_relative()) dp = fs::absolute(path).parent_path() / dp;
    auto df = create_file(dp.string());
    if (df->truncate(size) != 0) throw_image_error(dp.string(), "cannot set the data file size");
  }
}

}  // namespace strata
