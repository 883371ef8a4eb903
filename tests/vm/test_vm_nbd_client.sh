#!/usr/bin/env bash
# The Linux kernel's NBD client (nbd-client in a small VM) against strata:
# attach over TCP and a unix socket, mkfs.ext4, mount, write, remount, verify,
# fsck, trim and multi-connection required.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
vmtest=${VMTEST_DIR:-$top/../shared/vmtest}
strata=${STRATA:-$top/build/strata}
if [ ! -x "$vmtest/vm-nbd-client-test" ]; then
  echo "vmtest harness not found at $vmtest" >&2
  exit 1
fi
exec "$vmtest/vm-nbd-client-test" --timeout 400 --transport tcp,unix \
  --require multiconn,trim,list \
  --mem 1024 --env ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=16:malloc_context_size=5 \
  "$strata" -- serve @DISK@ --format raw --export @EXPORT@ \
  --port @PORT@ --bind 127.0.0.1 --socket @SOCK@
