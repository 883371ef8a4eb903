// The L2 entry classifier, the compressed-descriptor parser, the subcluster
// masks and the write/zero plans (formats/qcow2/l2_entry.h, write_plan.h),
// on entries built by hand: docs/FORMATS.md B6, B7.
#include <doctest/doctest.h>

#include <cerrno>

#include "formats/qcow2/l2_entry.h"
#include "formats/qcow2/write_plan.h"

using namespace strata::qcow2;

namespace {

constexpr L2Format kStd{16, false, false};
constexpr L2Format kExt{16, true, false};
constexpr L2Format kDataFile{16, false, true};

}  // namespace

TEST_CASE("classify_l2_entry: standard entries (FORMATS.md B6)") {
  CHECK(classify_l2_entry(0, kStd).type == ClusterType::unallocated);
  CHECK(classify_l2_entry(kZeroFlag, kStd).type == ClusterType::zero_plain);
  const L2Entry za = classify_l2_entry(0x50000 | kZeroFlag | kCopied, kStd);
  CHECK(za.type == ClusterType::zero_alloc);
  CHECK(za.host == 0x50000);
  CHECK(za.copied);
  CHECK(classify_l2_entry(0x50000 | kCopied, kStd).type == ClusterType::normal);
  CHECK(classify_l2_entry(0x4040000000054B5Dull, kStd).type == ClusterType::compressed);
  CHECK(classify_l2_entry(0x50200, kStd).type == ClusterType::invalid);               // unaligned
  CHECK(classify_l2_entry(1ull << 56 | 0x50000, kStd).type == ClusterType::invalid);  // reserved
  CHECK(classify_l2_entry(0x50000 | 2, kStd).type == ClusterType::invalid);
  // Offset 0 names a cluster only with a data file and COPIED.
  CHECK(classify_l2_entry(kCopied, kStd).type == ClusterType::unallocated);
  CHECK(classify_l2_entry(kCopied, kDataFile).type == ClusterType::normal);
  // Invalid entries still say what they name.
  CHECK(classify_l2_entry(0x50200 | kCopied, kStd).host == 0x50200);
}

TEST_CASE("classify_l2_entry and classify_subcluster: extended L2 (FORMATS.md B7)") {
  CHECK(classify_l2_entry(0x50000 | kZeroFlag, kExt).type == ClusterType::invalid);
  const L2Entry d = classify_l2_entry(0x50000 | kCopied, kExt);
  CHECK(d.type == ClusterType::normal);
  CHECK_FALSE(d.zero_flag);
  const uint64_t bitmap =
      0x00000004ull | (0x00000300ull << 32) | 0x00000001ull | (0x00000001ull << 32);
  CHECK(classify_subcluster(d, bitmap, 2) == SubclusterType::normal);
  CHECK(classify_subcluster(d, bitmap, 8) == SubclusterType::zero_alloc);
  CHECK(classify_subcluster(d, bitmap, 5) == SubclusterType::unallocated_alloc);
  CHECK(classify_subcluster(d, bitmap, 0) == SubclusterType::invalid);  // allocated and zero
  const L2Entry none = classify_l2_entry(0, kExt);
  CHECK(classify_subcluster(none, 1ull << 32, 0) == SubclusterType::zero_plain);
  CHECK(classify_subcluster(none, 0, 0) == SubclusterType::unallocated_plain);
  CHECK(classify_subcluster(none, 1, 0) == SubclusterType::invalid);  // allocated, no host
  CHECK(subcluster_type_of(ClusterType::zero_alloc) == SubclusterType::zero_alloc);
}

TEST_CASE("parse_compressed_descriptor: the FORMATS.md B6 example") {
  const CompressedDescriptor c = parse_compressed_descriptor(0x4040000000054B5Dull, 16);
  CHECK(c.offset == 0x54B5D);
  CHECK(c.sectors == 2);
  CHECK(c.length() == 675);
  CHECK(c.first_byte() == 0x54A00);
  CHECK(c.span() == 1024);
}

TEST_CASE("subcluster_mask") {
  // 64 KiB clusters: 2 KiB subclusters.
  CHECK(subcluster_mask(4096, 6144, 16) == 0x4u);  // the B7 example write
  CHECK(subcluster_mask(0, 65536, 16) == 0xffffffffu);
  CHECK(subcluster_mask(4095, 4097, 16) == 0x6u);
  CHECK(subcluster_mask(16384, 24576, 16) == 0xf00u);
  CHECK(zero_bits(0x300) == 0x30000000000ull);
  CHECK(alloc_bits(0x300) == 0x300ull);
}

TEST_CASE("plan_cluster_write") {
  WritePlan p;
  SUBCASE("an unallocated cluster over zeros: a new cluster, written as is") {
    CHECK(plan_cluster_write(0, classify_l2_entry(0, kStd), 0, kStd, 3, 512, 1024, false, p) == 0);
    CHECK(p.target == WritePlan::Target::allocate);
    CHECK(p.old_zero);
    CHECK(p.copy_from == 0);
    CHECK(p.copy_to == 65536);
    CHECK_FALSE(p.free_old);
  }
  SUBCASE("a cluster of ours: in place") {
    const uint64_t e = 0x50000 | kCopied;
    CHECK(plan_cluster_write(e, classify_l2_entry(e, kStd), 0, kStd, 3, 0, 65536, false, p) == 0);
    CHECK(p.target == WritePlan::Target::in_place);
    CHECK(p.host == 0x50000);
    CHECK(p.in_place_as_is);
  }
  SUBCASE("a shared cluster: copy-on-write, then the old one is freed") {
    const uint64_t e = 0x50000;
    CHECK(plan_cluster_write(e, classify_l2_entry(e, kStd), 0, kStd, 3, 0, 512, true, p) == 0);
    CHECK(p.target == WritePlan::Target::allocate);
    CHECK_FALSE(p.old_zero);
    CHECK(p.free_old);
    CHECK(p.old_entry == e);
  }
  SUBCASE("extended L2: only the touched subclusters") {
    CHECK(plan_cluster_write(0, classify_l2_entry(0, kExt), 0, kExt, 0, 4096, 2048, true, p) == 0);
    CHECK(p.copy_from == 4096);
    CHECK(p.copy_to == 6144);
    CHECK(p.new_bitmap == 0x4u);
  }
  SUBCASE("invalid entries and compressed clusters with a data file fail") {
    CHECK(plan_cluster_write(0x50200, classify_l2_entry(0x50200, kStd), 0, kStd, 0, 0, 1, false,
                             p) == EIO);
    const uint64_t c = 0x4040000000054B5Dull;
    CHECK(plan_cluster_write(c, classify_l2_entry(c, kDataFile), 0, kDataFile, 0, 0, 1, false, p) ==
          EIO);
  }
}

TEST_CASE("plan_cluster_zero") {
  const uint64_t e = 0x50000 | kCopied;
  const L2Entry d = classify_l2_entry(e, kStd);
  ZeroPlan p = plan_cluster_zero(e, d, 0, kStd, 0, 65536, false, false, false);
  CHECK(p.new_entry == (e | kZeroFlag));  // the allocation is kept
  CHECK_FALSE(p.drop_old);
  p = plan_cluster_zero(e, d, 0, kStd, 0, 65536, true, true, true);
  CHECK(p.new_entry == 0);
  CHECK(p.drop_old);
  const uint64_t c = 0x4040000000054B5Dull;
  p = plan_cluster_zero(c, classify_l2_entry(c, kExt), 0, kExt, 0, 4096, false, false, false);
  CHECK(p.copy_on_write);
  const L2Entry x = classify_l2_entry(e, kExt);
  p = plan_cluster_zero(e, x, 0xffull, kExt, 0, 8192, false, false, false);
  CHECK(p.new_bitmap == (0xf0ull | (0xfull << 32)));
}
