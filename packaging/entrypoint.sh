#!/bin/sh
# Entrypoint of the modelfs image.
#
#   (no arguments)   mount $MODELFS_SOURCE at $MODELFS_MOUNTPOINT (default /mnt/models) in the
#                    foreground; every other option from MODELFS_* variables or --config
#   ARGS...          run `modelfs ARGS...` (e.g. `mount gs://b/p /mnt/models --foreground`)
#
# exec keeps modelfs as PID 1, so `docker stop`/`podman stop`/a pod's termination delivers
# SIGTERM to modelfs itself, which unmounts cleanly before it exits.
set -eu
if [ "$#" -eq 0 ]; then
  : "${MODELFS_SOURCE:?set MODELFS_SOURCE=gs://BUCKET[/PREFIX], or pass arguments: mount SOURCE MOUNTPOINT --foreground}"
  mountpoint=${MODELFS_MOUNTPOINT:-/mnt/models}
  mkdir -p "$mountpoint"
  set -- mount "$MODELFS_SOURCE" "$mountpoint" --foreground
fi
exec modelfs "$@"
