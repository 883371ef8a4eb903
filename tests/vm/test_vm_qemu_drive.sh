#!/usr/bin/env bash
# A VM boots with its disk on strata through QEMU's own NBD client
# (-drive file=nbd://...): mkfs, write, verify, fstrim, fsck, second boot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
vmtest=${VMTEST_DIR:-$top/../shared/vmtest}
strata=${STRATA:-$top/build/strata}
if [ ! -x "$vmtest/vm-qemu-drive-test" ]; then
  echo "vmtest harness not found at $vmtest" >&2
  exit 1
fi
exec "$vmtest/vm-qemu-drive-test" --timeout 300 --require all \
  --env ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=16 \
  "$strata" -- serve @DISK@ --format raw --export @EXPORT@ \
  --port @PORT@ --bind 127.0.0.1
