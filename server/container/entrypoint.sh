#!/bin/bash
# Container entry point (docs/CONTAINER.md).
#   With arguments:  strata ARGS...
#   Without, config: strata serve --config /etc/strata/strata.json
#   Without, else:   /images/disk.img as export "default" on 0.0.0.0:10809,
#                    created sparse (1 GiB) if missing; its format (qcow2,
#                    VHD, raw) is probed, never assumed, unless
#                    $STRATA_FORMAT pins it (raw, qcow2, vhd).
# Without arguments the HTTP endpoint (/healthz, /readyz, /metrics) listens
# on $STRATA_HTTP (the image sets 0.0.0.0:10810; empty: the config's "http").
# Before the server starts, the directories it must write are checked, so a
# volume owned by another uid or a read-only root file system gets a message
# that says what to do instead of a bare "Permission denied".
set -euo pipefail

config=/etc/strata/strata.json
images=/images
sockets=/run/strata

die() {
  echo "strata-entrypoint: $*" >&2
  exit 1
}

whoami_line() {
  echo "uid $(id -u) (gid $(id -g), groups $(id -G | tr ' ' ','))"
}

owner_of() {
  stat -c 'owned by uid %u gid %g, mode %a' "$1"
}

# $1 must be a directory this user can create files in. The reason comes
# from a real attempt: "Read-only file system" and "Permission denied" need
# different fixes.
require_writable_dir() {
  local dir=$1 fix=$2 probe reason
  [ -d "$dir" ] || die "$dir does not exist. $fix"
  probe=$dir/.strata-entrypoint-probe
  if reason=$( (: >"$probe") 2>&1); then
    rm -f "$probe"
    return
  fi
  reason=${reason##*: }
  die "$dir ($(owner_of "$dir")) is not writable by $(whoami_line): ${reason:-unknown}. $fix"
}

volume_fix="Prepare the volume for uid 10809: on the host \`chown 10809:10809 DIR\` \
(rootless podman: \`podman unshare chown 10809:10809 DIR\`), or in Kubernetes set the pod's \
securityContext.fsGroup: 10809; or run with --user UID of the volume's owner."

socket_fix="The socket directory must be writable: with a read-only root file system mount a \
tmpfs there (podman run --read-only --tmpfs $sockets:rw,U; docker run --read-only --tmpfs \
$sockets:uid=10809,gid=10809; Kubernetes: an emptyDir volume at $sockets)."

http_args=()
[ -n "${STRATA_HTTP:-}" ] && http_args=(--http "$STRATA_HTTP")

if [ $# -gt 0 ]; then
  exec strata "$@"
fi

if [ -f "$config" ]; then
  # The shipped configs put their unix sockets in /run/strata.
  if grep -q "\"$sockets/" "$config"; then
    require_writable_dir "$sockets" "$socket_fix"
  fi
  exec strata serve --config "$config" "${http_args[@]}"
fi

disk=$images/disk.img
if [ -e "$disk" ]; then
  [ -r "$disk" ] && [ -w "$disk" ] ||
    die "$disk ($(owner_of "$disk")) is not readable and writable by $(whoami_line). $volume_fix"
else
  require_writable_dir "$images" "$volume_fix"
  truncate -s 1G "$disk"
fi
exec strata serve "$disk" --format "${STRATA_FORMAT:-auto}" --export default --port 10809 \
  --bind 0.0.0.0 "${http_args[@]}"
