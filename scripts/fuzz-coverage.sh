#!/bin/bash
# The CI fuzz run: every fuzzer in tests/fuzz with the "ci" hypothesis profile (a fixed budget of
# examples, derandomized: the same inputs on every run), under coverage.py. Prints the line coverage
# of the code the fuzzers aim at and fails if it is below the floor (85%): a fuzzer that stops
# reaching the handlers fails CI like a test does. Extra arguments go to pytest.
#
# The seed-session tests in tests/fuzz show that each FUSE opcode handler, the chain walker and every
# vhost-user request is reached with a successful reply; this figure shows how much of the code the
# mutations reach on top.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/common.sh
. "$here/common.sh"

python=$(ensure_venv "$repo" test)
cd "$repo"
targets=vhostfs/fuse/server.py,vhostfs/virtqueue/split.py,vhostfs/vhost_user/handler.py,vhostfs/vhost_user/messages.py
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
COVERAGE_FILE=$data/coverage "$python" -m coverage run --include="$targets" -m pytest -q -rs -p no:cacheprovider \
    tests/fuzz --hypothesis-profile=ci "$@"
echo "fuzz coverage of $targets:"
COVERAGE_FILE=$data/coverage "$python" -m coverage report --fail-under=85
