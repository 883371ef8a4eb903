// qcow2: planning a write or a zero write into one cluster (write_plan.h).
#include "formats/qcow2/write_plan.h"

#include <cerrno>

namespace strata::qcow2 {

int plan_cluster_write(uint64_t entry, const L2Entry& d, uint64_t bitmap, const L2Format& f,
                       uint64_t guest_cluster, uint64_t offset, uint64_t length,
                       bool backing_visible, WritePlan& plan) {
  if (d.type == ClusterType::invalid) return EIO;
  if (d.compressed() && f.external_data_file) return EIO;
  const uint64_t cluster_size = uint64_t{1} << f.cluster_bits;
  plan = WritePlan{};
  plan.guest_cluster = guest_cluster;
  plan.offset = offset;
  plan.length = length;
  plan.old_entry = entry;
  plan.zero_flag = d.zero_flag;
  if (d.has_host && d.copied) {
    plan.target = WritePlan::Target::in_place;
    plan.host = d.host;
  } else if (f.external_data_file) {
    plan.target = WritePlan::Target::data_file_same;
    plan.host = guest_cluster << f.cluster_bits;
  }
  const bool in_place = plan.target == WritePlan::Target::in_place;
  if (f.extended_l2 && (in_place || (!d.has_host && !d.compressed()))) {
    // Subcluster granularity: only the touched subclusters are written.
    const uint32_t sub_bits = f.cluster_bits - 5;
    const uint32_t mask = subcluster_mask(offset, offset + length, f.cluster_bits);
    plan.copy_from = offset >> sub_bits << sub_bits;
    plan.copy_to = (((offset + length - 1) >> sub_bits) + 1) << sub_bits;
    plan.new_bitmap = (bitmap | alloc_bits(mask)) & ~zero_bits(mask);
    // No stale allocation bits where no host cluster was.
    if (!d.has_host) plan.new_bitmap &= kZeroBits | alloc_bits(mask);
  } else {
    plan.copy_from = 0;
    plan.copy_to = cluster_size;
    plan.new_bitmap = f.extended_l2 ? kAllocBits : 0;
  }
  plan.old_zero =
      d.zero_flag || (!d.has_host && !d.compressed() && !f.extended_l2 && !backing_visible);
  // No zero flag or partial subcluster needs the old contents.
  plan.in_place_as_is =
      in_place && !d.zero_flag &&
      (!f.extended_l2 || (offset == plan.copy_from && offset + length == plan.copy_to));
  plan.free_old = !in_place && (d.compressed() || d.has_host);
  return 0;
}

ZeroPlan plan_cluster_zero(uint64_t entry, const L2Entry& d, uint64_t bitmap, const L2Format& f,
                           uint64_t from, uint64_t to, bool dealloc, bool is_trim, bool may_trim) {
  ZeroPlan p;
  p.new_entry = entry;
  p.new_bitmap = bitmap;
  const bool held_something = d.has_host || d.compressed();
  if (!f.extended_l2) {
    if (dealloc) {
      p.new_entry = 0;
      p.drop_old = held_something;
    } else if (!is_trim && !may_trim && d.has_host && d.copied) {
      p.new_entry = d.host | kCopied | kZeroFlag;  // keep the allocation
    } else {
      p.new_entry = kZeroFlag;
      p.drop_old = held_something;
    }
    return p;
  }
  const bool whole = from == 0 && to == uint64_t{1} << f.cluster_bits;
  if (d.compressed() && !whole) {
    p.copy_on_write = true;
    return p;
  }
  if (whole &&
      (d.compressed() || (dealloc && d.has_host) || (may_trim && d.has_host && !d.copied))) {
    p.new_entry = 0;
    p.new_bitmap = dealloc ? 0 : kZeroBits;
    p.drop_old = held_something;
  } else {
    const uint32_t mask = subcluster_mask(from, to, f.cluster_bits);
    p.new_bitmap = bitmap & ~alloc_bits(mask) & ~zero_bits(mask);
    if (!dealloc) p.new_bitmap |= zero_bits(mask);
  }
  return p;
}

}  // namespace strata::qcow2
