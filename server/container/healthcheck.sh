#!/bin/bash
# The image's HEALTHCHECK: healthy when GET /healthz on the HTTP endpoint
# answers 200. /healthz stays 200 while the server is busy or at
# max_connections (a liveness check must not restart a busy server), works
# whatever the NBD listeners are (TCP, unix socket only, another port), and
# is logged at debug level only.
# The endpoint is the port of $STRATA_HTTP (the entry point serves there),
# else $STRATA_HEALTH_PORT, always asked on 127.0.0.1.
# The HTTP client is bash's /dev/tcp: the runtime image needs no curl.
set -uo pipefail
port=${STRATA_HTTP:+${STRATA_HTTP##*:}}
port=${port:-${STRATA_HEALTH_PORT:-}}
if [ -z "$port" ]; then
  echo "strata-healthcheck: no HTTP endpoint (set STRATA_HTTP or STRATA_HEALTH_PORT)" >&2
  exit 1
fi
# Bounded even when the kernel holds the connect (Docker's --timeout is not
# honoured by every runtime).
exec timeout 3 bash -c '
  exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
  printf "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
  IFS=" " read -r version status _ <&3 || exit 1
  [ "$status" = 200 ] || { echo "strata-healthcheck: /healthz answered ${status:-nothing}" >&2; exit 1; }
' strata-healthcheck "$port"
