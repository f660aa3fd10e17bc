#!/bin/sh
# Install what modelfs needs on Debian 12 or 13 and make a venv with modelfs in it.
#
#   sh scripts/setup.sh [demo|test] [VENV]      defaults: test, .venv
#
# demo: what building and running modelfs and the demo needs (python3, a C compiler and the
#       FUSE headers for pyfuse3, which ships no wheels; fuse3), pip install -e '.[demo]'.
# test: that, plus the servers and tools the tests start themselves (nginx, podman, ...),
#       pip install -e '.[test]'.
#
# Plain POSIX sh, so it runs on a bare debootstrap root (no make, no python3, no gcc). Run it
# again to repair a half-done setup: an interrupted dpkg run is finished, missing packages are
# installed, and a venv without a working pip (ensurepip was missing) or made by another
# python3 is made anew. Packages are installed without starting their services: a temporary
# policy-rc.d answers "no" while apt runs (the tests start their own servers on loopback).
set -eu
cd "$(dirname "$0")/.."
LEVEL=${1:-test}
VENV=${2:-.venv}
case $LEVEL in
  demo | test) ;;
  *) echo "usage: sh scripts/setup.sh [demo|test] [VENV]" >&2; exit 2 ;;
esac
say() { echo "setup: $*"; }

# Building and running modelfs: pyfuse3 is compiled (gcc, libc6-dev, python3-dev, and
# libfuse3-dev found through pkg-config); fuse3 has libfuse3 and fusermount3; ca-certificates
# lets pip and the cloud clients verify TLS.
PACKAGES="python3 python3-venv python3-dev gcc libc6-dev pkg-config libfuse3-dev fuse3 ca-certificates"
if [ "$LEVEL" = test ]; then
  # HTTP(S) backend tests: nginx with a config in a temp dir, openssl for its self-signed CA.
  PACKAGES="$PACKAGES nginx openssl"
  # The fleet tests (tests/integration/test_fleet.py, benchmarks/fleet.py; issue 16): network
  # namespaces and veth pairs (iproute2), and njs for the cache tier's per-block digests.
  PACKAGES="$PACKAGES iproute2 libnginx-mod-http-js"
  # The container tests (tests/container) and the fresh-root test (tests/fresh) build and run
  # containers with podman (runc: crun fails on hybrid cgroup hosts) from a debootstrapped base;
  # catatonit is the fresh root's PID 1. They need root anyway, so a non-root setup skips these.
  [ "$(id -u)" != 0 ] || PACKAGES="$PACKAGES podman runc debootstrap catatonit"
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=""
for pkg in $PACKAGES; do
  installed "$pkg" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install:$missing (apt-get install$missing)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # A dpkg run that was interrupted (by Ctrl-C, a full disk) blocks every later install.
  if [ -n "$(dpkg --audit 2>/dev/null)" ]; then
    say "finishing an interrupted dpkg run"
    dpkg --configure -a
  fi
  # Installing nginx or podman must not start a system service (on a systemd machine Debian's
  # nginx would listen on port 80). A policy-rc.d that someone else put there is left alone.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# modelfs scripts/setup.sh: start no service while it installs packages.\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'rm -f /usr/sbin/policy-rc.d; exit 130' INT TERM
  fi
  say "apt-get install$missing"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # Nor start it at the next boot: the tests run their own nginx on loopback.
  case " $missing " in
    *" nginx "*)
      if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl disable --quiet nginx.service 2>/dev/null || true
      fi ;;
  esac
  if [ -n "$policy" ]; then
    rm -f "$policy"
    trap - EXIT INT TERM
  fi
fi

# A venv is kept only if it works: its pip runs and it was made by this machine's python3.
want=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv_ok() {
  [ -f "$VENV/pyvenv.cfg" ] && [ -x "$VENV/bin/python" ] || return 1
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || return 1
  [ "$have" = "$want" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}
if ! venv_ok; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "setup: $VENV exists and is not a venv; move it away or name another: sh scripts/setup.sh $LEVEL DIR" >&2
    exit 1
  fi
  [ ! -e "$VENV" ] || say "$VENV is broken (no pip, or not python $want): making it anew"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi

# pip runs again only when pyproject.toml changed or the last install did not finish (the
# stamp is written after it); `test` includes everything `demo` installs.
stamp=$(cksum <pyproject.toml | cut -d' ' -f1)
done_level() { [ "$(cat "$VENV/.setup-$1" 2>/dev/null)" = "$stamp" ] && "$VENV/bin/modelfs" --version >/dev/null 2>&1; }
if ! done_level "$LEVEL"; then
  say "pip install -e '.[$LEVEL]' into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$LEVEL]"
  echo "$stamp" >"$VENV/.setup-$LEVEL"
  [ "$LEVEL" = demo ] || echo "$stamp" >"$VENV/.setup-demo"
fi
say "done: modelfs is $(cd "$VENV/bin" && pwd)/modelfs"
