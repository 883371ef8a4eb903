#!/bin/bash
# Container entry point. With arguments: `strata ARGS...`. Without: serve the
# config at /etc/strata/strata.json, or else /images/disk.img (created sparse,
# 1 GiB, if missing) as export "default" on port 10809.
set -e
if [ $# -gt 0 ]; then
  exec strata "$@"
fi
if [ -f /etc/strata/strata.json ]; then
  exec strata serve --config /etc/strata/strata.json
fi
[ -e /images/disk.img ] || truncate -s 1G /images/disk.img
exec strata serve /images/disk.img --format raw --export default --port 10809 --bind 0.0.0.0
