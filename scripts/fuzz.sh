#!/bin/sh
# The long fuzzing run: every fuzzer in tests/fuzz with many random examples (hypothesis profile
# "long"). Extra arguments go to pytest, e.g. `scripts/fuzz.sh -k fuse` or
# `scripts/fuzz.sh --hypothesis-seed=1234`. A failure is shrunk to a minimal example and printed with
# the decorator that replays it; hypothesis also keeps it in .hypothesis/ and tries it first next time.
set -eu
cd "$(dirname "$0")/.."
exec python3 -m pytest tests/fuzz -p no:logging --hypothesis-profile=long --hypothesis-show-statistics "$@"
