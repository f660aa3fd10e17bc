#!/bin/sh
# The README's commands. On a bare Debian 12 or 13 machine, as root, each installs what it
# needs first (scripts/setup.sh: apt packages, a venv in .venv), so it works on a machine that
# has no make, python3 or compiler yet, and running it again repairs a half-done setup.
#
#   sh run.sh demo [ARGS]    set up for the demo, run it (python -m modelfs.testing.demo ARGS)
#   sh run.sh test [ARGS]    set up for the tests, run them (python -m pytest -n 2 --dist worksteal
#                            ARGS: two workers, as the suite mostly waits on mounts and servers;
#                            -n 0 in ARGS runs it in one process, for -s or --pdb)
#   sh run.sh serve [ARGS]   set up for the demo, serve its model on a local GCS emulator and
#                            print the `modelfs mount gs://...` line to paste (Ctrl-C stops it)
#   sh run.sh setup [demo|test]   only set up
set -eu
cd "$(dirname "$0")"
what=${1:-}
[ $# -eq 0 ] || shift
case $what in
  demo)
    sh scripts/setup.sh demo
    exec .venv/bin/python -m modelfs.testing.demo "$@" ;;
  serve)
    sh scripts/setup.sh demo
    exec .venv/bin/python -m modelfs.testing.demo serve "$@" ;;
  test)
    sh scripts/setup.sh test
    exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@" ;;
  setup)
    exec sh scripts/setup.sh "${1:-test}" ;;
  *)
    echo "usage: sh run.sh demo|test|serve|setup [ARGS]" >&2
    exit 2 ;;
esac
