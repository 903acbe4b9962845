"""Hypothesis profiles for the fuzzers.

hypothesis is used rather than atheris: it is pure Python (no compiled, instrumented harness and no
clang), runs inside pytest next to the other tests, shrinks a failure to a minimal input and replays
it from its example database.

- "ci" (the default): a short, derandomized run that is part of the normal test suite, so it gives
  the same inputs on every run and cannot fail at random.
- "long": many random examples per fuzzer, for `scripts/fuzz.sh` (or
  `python -m pytest tests/fuzz --hypothesis-profile=long`).
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, settings

# One definition of the autouse fixture that gives each test the process settings a Passthrough needs.
from tests.unit.conftest import passthrough_process  # noqa: F401

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                       HealthCheck.function_scoped_fixture]}
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=20000, print_blob=True, **_COMMON)
# The command line (--hypothesis-profile) wins: it is applied after this file is loaded.
if settings.get_current_profile_name() == "default":
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def vhostfs_logs_not_kept():
    """The daemon's log records do not reach pytest's log capture during the fuzzers: a kept record
    keeps the exception it names, and with it whatever its frames held (guest memory mappings, fds),
    until the test ends, which would hide a real fd leak among them or fake one. The fuzzers that
    watch for bugs in the logs attach their own handler."""
    logger = logging.getLogger("vhostfs")
    old = logger.propagate
    logger.propagate = False
    yield
    logger.propagate = old
