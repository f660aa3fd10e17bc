#!/bin/sh
# Entrypoint of the modelfs image.
#
#   (no arguments)   mount $MODELFS_SOURCE at $MODELFS_MOUNTPOINT (default /mnt/models) in the
#                    foreground; every other option from MODELFS_* variables or --config
#   ARGS...          run `modelfs ARGS...` (e.g. `mount gs://b/p /mnt/models --foreground`)
#
# Either way `mount SOURCE MOUNTPOINT ...` (SOURCE and MOUNTPOINT first, options after them)
# creates MOUNTPOINT if it is missing: the Kubernetes manifests mount at a subdirectory of a
# fresh, empty emptyDir, which nothing else creates. If that fails (or a dead mount is there),
# modelfs itself says what is wrong with the mountpoint, in one line, or clears the dead mount.
#
# exec keeps modelfs as PID 1, so `docker stop`/`podman stop`/a pod's termination delivers
# SIGTERM to modelfs itself, which unmounts cleanly before it exits.
set -eu
if [ "$#" -eq 0 ]; then
  : "${MODELFS_SOURCE:?set MODELFS_SOURCE=gs://BUCKET[/PREFIX], or pass arguments: mount SOURCE MOUNTPOINT --foreground}"
  mountpoint=${MODELFS_MOUNTPOINT:-/mnt/models}
  set -- mount "$MODELFS_SOURCE" "$mountpoint" --foreground
fi
if [ "$#" -ge 3 ] && [ "$1" = mount ]; then
  case "$2" in
    -*) ;;  # an option first: where the mountpoint is cannot be told without modelfs' parser
    *) case "$3" in
         -*) ;;
         *) mkdir -p -- "$3" 2>/dev/null || : ;;
       esac ;;
  esac
fi
exec modelfs "$@"
