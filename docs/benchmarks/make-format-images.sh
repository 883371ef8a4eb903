#!/bin/bash
# Extra images for run-formats.sh, next to the ones ../shared/bench/make-images
# builds: a 3-deep differencing VHD chain (a third of the 2 MiB blocks written in
# each child over the dynamic base), the same data in one dynamic VHD, and empty
# qcow2/VHD images for allocating writes.
set -eu
I=${BENCH_IMAGES:-$HOME/bench-images}
STRATA=${STRATA:-build-release/strata}
mkdir -p "$I/vhd-chain"
cd "$I/vhd-chain"
rm -f base.vhd mid.vhd top.vhd flat.vhd
cp --sparse=always ../vpc-dynamic.vhd base.vhd
fill() {  # fill IMAGE PHASE: random data into every third 2 MiB block
  "$STRATA" serve "$1" --format vhd --socket /tmp/strata-fill.sock --export x --log-level warn &
  local pid=$!
  sleep 1
  /usr/bin/python3 - "nbd+unix:///x?socket=/tmp/strata-fill.sock" "$2" <<'PY'
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i, off in enumerate(range(0, h.get_size(), 2 << 20)):
    if i % 3 == int(sys.argv[2]):
        h.pwrite(os.urandom(2 << 20), off)
h.flush(); h.shutdown()
PY
  kill "$pid"; wait "$pid" || true
}
"$STRATA" create -f vhd -o type=differencing -b base.vhd mid.vhd
fill mid.vhd 0
"$STRATA" create -f vhd -o type=differencing -b mid.vhd top.vhd
fill top.vhd 1
"$STRATA" serve top.vhd --format vhd --read-only --socket /tmp/strata-fill.sock --export x \
  --log-level warn &
pid=$!
sleep 1
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on \
  "nbd+unix:///x?socket=/tmp/strata-fill.sock" flat.vhd
kill "$pid"; wait "$pid" || true
cd "$I"
qemu-img create -q -f qcow2 empty.qcow2 1G
qemu-img create -q -f vpc -o subformat=dynamic,force_size=on empty.vhd 1G
