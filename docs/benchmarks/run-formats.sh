#!/bin/bash
# Benchmark runs for docs/BENCHMARKS.md (strata release build at $STRATA).
# Usage: run-formats.sh [all|vhd|qcow2]
set -u
which=${1:-all}
B=${NBD_BENCH:-../shared/bench/nbd-bench}
I=${BENCH_IMAGES:-$HOME/bench-images}
STRATA=${STRATA:-build-release/strata}
S="$STRATA serve {image} --format {format} --export {export} --port {port} --bind 127.0.0.1 --log-level warn"
common="--runtime 5 --repeat ${BENCH_REPEAT:-3} --quiet-wait 5 --noise-budget 120"
if [ "$which" = all ] || [ "$which" = vhd ]; then
# VHD reads: dynamic vs qemu-nbd, a 3-deep chain vs the same data flat, vs raw.
$B $common --out ${BENCH_OUT:-results}/vhd-read --workloads seq-read,rand-read,multi-conn \
  --server "strata=$S" --image strata=$I/vpc-dynamic.vhd \
  --server qemu-nbd --image qemu-nbd=$I/vpc-dynamic.vhd \
  --server qemu-nbd-uring --image qemu-nbd-uring=$I/vpc-dynamic.vhd \
  --server "strata-chain3=$S" --image strata-chain3=$I/vhd-chain/top.vhd \
  --server "strata-flat=$S" --image strata-flat=$I/vhd-chain/flat.vhd \
  --server "strata-raw=$S" --image strata-raw=$I/raw-full.raw
# VHD writes into allocated blocks (steady) and allocating writes (pristine).
$B $common --out ${BENCH_OUT:-results}/vhd-write --workloads seq-write,rand-write \
  --server "strata=$S" --image strata=$I/vpc-dynamic.vhd \
  --server qemu-nbd --image qemu-nbd=$I/vpc-dynamic.vhd \
  --server qemu-nbd-uring --image qemu-nbd-uring=$I/vpc-dynamic.vhd
$B $common --out ${BENCH_OUT:-results}/vhd-alloc --workloads seq-write,rand-write --write-state pristine \
  --server "strata=$S" --image strata=$I/empty.vhd \
  --server qemu-nbd --image qemu-nbd=$I/empty.vhd \
  --server qemu-nbd-uring --image qemu-nbd-uring=$I/empty.vhd
fi
if [ "$which" = all ] || [ "$which" = qcow2 ]; then
# qcow2 reads: full, data_file_raw, overlay; vs strata on raw.
$B $common --out ${BENCH_OUT:-results}/qcow2-read --workloads seq-read,rand-read,multi-conn \
  --server "strata-full=$S" --image strata-full=$I/qcow2-full.qcow2 \
  --server "qemu-nbd-full=@qemu-nbd" --image qemu-nbd-full=$I/qcow2-full.qcow2 \
  --server "uring-full=@qemu-nbd-uring" --image uring-full=$I/qcow2-full.qcow2 \
  --server "strata-dfraw=$S" --image strata-dfraw=$I/qcow2-datafile.qcow2 \
  --server "qemu-nbd-dfraw=@qemu-nbd" --image qemu-nbd-dfraw=$I/qcow2-datafile.qcow2 \
  --server "uring-dfraw=@qemu-nbd-uring" --image uring-dfraw=$I/qcow2-datafile.qcow2 \
  --server "strata-overlay=$S" --image strata-overlay=$I/qcow2-overlay.qcow2 \
  --server "qemu-nbd-overlay=@qemu-nbd" --image qemu-nbd-overlay=$I/qcow2-overlay.qcow2 \
  --server "uring-overlay=@qemu-nbd-uring" --image uring-overlay=$I/qcow2-overlay.qcow2 \
  --server "strata-raw=$S" --image strata-raw=$I/raw-full.raw
# qcow2 allocating 4K writes into an empty image.
$B $common --out ${BENCH_OUT:-results}/qcow2-alloc --workloads rand-write,seq-write --write-state pristine \
  --server "strata=$S" --image strata=$I/empty.qcow2 \
  --server qemu-nbd --image qemu-nbd=$I/empty.qcow2 \
  --server qemu-nbd-uring --image qemu-nbd-uring=$I/empty.qcow2
fi
