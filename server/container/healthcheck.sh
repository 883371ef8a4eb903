#!/bin/bash
# Healthy when the server answers on its TCP port (STRATA_HEALTH_PORT, default
# 10809) with the NBD greeting.
port=${STRATA_HEALTH_PORT:-10809}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
magic=$(head -c 8 <&3)
[ "$magic" = "NBDMAGIC" ]
