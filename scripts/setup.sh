#!/usr/bin/env bash
# Install what modelfs and its tests need on a Debian machine (run as root), into a venv.
#   scripts/setup.sh [VENV]        default VENV: .venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PACKAGES=(fuse3 libfuse3-dev pkg-config nginx openssl)
# The fleet tests (tests/integration/test_fleet.py, benchmarks/fleet.py; issue 16): network
# namespaces and veth pairs (iproute2), and njs for the cache tier's per-block digests.
PACKAGES+=(iproute2 libnginx-mod-http-js)
# The container tests (tests/container) build and run the image with podman; they need root
# anyway, so a non-root setup does not ask for these.
[ "$(id -u)" != 0 ] || PACKAGES+=(podman runc debootstrap)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
