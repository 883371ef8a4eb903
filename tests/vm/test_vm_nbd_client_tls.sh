#!/usr/bin/env bash
# The Linux kernel's NBD client over TLS: nbd-client in a small VM attaches
# with -enable-tls and a client certificate to strata serving
# --tls=require with throw-away certificates (make-test-certs). The harness
# first checks that a plain attach is refused, then runs every check of the
# plain test (mkfs, mount, write, verify, fsck, trim, multi-connection) over TLS,
# TCP and unix socket.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
vmtest=${VMTEST_DIR:-$top/../shared/vmtest}
strata=${STRATA:-$top/build/strata}
if [ ! -x "$vmtest/vm-nbd-client-test" ]; then
  echo "vmtest harness not found at $vmtest" >&2
  exit 1
fi
certs=$(mktemp -d)
trap 'rm -rf "$certs"' EXIT
"$vmtest/make-test-certs" --force "$certs" >/dev/null
"$vmtest/vm-nbd-client-test" --timeout 400 --transport tcp,unix \
  --require multiconn,trim,list,tls --tls-dir "$certs" \
  --mem 1024 --env ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=16:malloc_context_size=5 \
  "$strata" -- serve @DISK@ --format raw --export @EXPORT@ \
  --port @PORT@ --bind 127.0.0.1 --socket @SOCK@ \
  --tls require --tls-certificates @TLSDIR@ --tls-verify-peer
