#!/bin/bash
# Runs the whole test suite (fuzzers under coverage, unit, integration, e2e) from the repository's
# .venv and fails if any part fails; with arguments, runs just pytest with them
# (e.g. scripts/test.sh tests/unit -k readdir).
#
# On a fresh Debian 12 machine, as root, it first installs what the tests use: fuse3 for the
# /dev/fuse mounts, fio for the I/O workloads, uidmap (newuidmap) for the rootless daemon's user
# namespace, gcc and libc6-dev for the migration tests' static guest helper, QEMU and the guest's
# build tools for the e2e tests, Debian 13's QEMU and kernel for the guest tests on today's stack and
# Debian testing's QEMU 11.1 and Linux 7.2 for the DAX guest tests (scripts/stack.sh), and vhostfs
# with its test extras into .venv. Without root it uses what is there; the e2e tests then skip with
# the reason if the guest cannot be built (except under CI=true, where they fail).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/common.sh
. "$here/common.sh"

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v fio >/dev/null || missing+=(fio)
# newuidmap/newgidmap: the rootless tests map a test user's subordinate IDs into its user namespace.
command -v newuidmap >/dev/null || missing+=(uidmap)
# The migration tests build a small static guest helper (tests/e2e/helpers/mighold.c).
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
[ ${#missing[@]} -eq 0 ] || install_needed "${missing[@]}"
# Building the guest here keeps its apt and download time out of the tests' timeouts; when it is not
# possible the e2e fixture finds out again and reports why.
# debian13 (QEMU 10, Linux 6.12) and forky (QEMU 11.1, Linux 7.2, the DAX tests' stack) are unpacked
# once per machine into a cache outside the clone.
for stack in debian12 debian13 forky; do
    "$here/build-guest.sh" --stack "$stack" >/dev/null ||
        log "cannot build the $stack e2e guest now; the e2e tests will say why"
done

python=$(ensure_venv "$repo" test)
cd "$repo"
# -rs: every skipped test is listed with its reason at the end.
if [ $# -gt 0 ]; then
    exec "$python" -m pytest -q -rs "$@"
fi
# The whole suite: the fuzzers run once, under coverage (scripts/fuzz-coverage.sh), then the rest.
status=0
"$here/fuzz-coverage.sh" || status=$?
"$python" -m pytest -q -rs tests --ignore=tests/fuzz || status=$?
exit "$status"
