"""What a test needs and lacks here skips it, with the reason; under CI=true, where everything the
tests need is installed by scripts/test.sh, it fails instead, so that nothing CI must check passes by
skipping."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def running_in_ci() -> bool:
    """Whether CI is set to something true (as scripts/common.sh's running_in_ci reads it)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def skip_unless_ci(message: str) -> NoReturn:
    """Skips the test for `message` (what it needs and lacks here); fails it under CI."""
    if running_in_ci():
        pytest.fail(f"CI must run this test, but {message}")
    pytest.skip(message)
