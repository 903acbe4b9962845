#!/bin/bash
# The long fuzzing run, outside CI: every fuzzer in tests/fuzz with many random examples (hypothesis
# profile "long": 20000 per fuzzer, a new seed each run unless --hypothesis-seed=N). Extra arguments go
# to pytest, e.g. `scripts/fuzz.sh -k fuse` or `scripts/fuzz.sh --hypothesis-seed=1234`. A failure is
# shrunk to a minimal example and printed with the decorator that replays it; hypothesis also keeps it
# in .hypothesis/ and tries it first next time. CI runs the short, fixed run instead
# (scripts/fuzz-coverage.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/common.sh
. "$here/common.sh"

python=$(ensure_venv "$repo" test)
cd "$repo"
exec "$python" -m pytest tests/fuzz -p no:logging --hypothesis-profile=long --hypothesis-show-statistics "$@"
