"""Fixtures shared by the passthrough tests: a share with a canary directory beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_passthrough import _tree
from vhostfs.fs.passthrough import Passthrough


@pytest.fixture
def share(tmp_path: Path):
    """The shared directory; the test fails if anything in the canary directory next to it changed."""
    share, canary = tmp_path / "share", tmp_path / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    before = _tree(canary)
    yield share
    assert _tree(canary) == before, "the canary directory outside the share changed"


@pytest.fixture
def make(share):
    """Builds Passthroughs of `share` with the given options, closed (and the umask restored) after."""
    made: list[Passthrough] = []
    umask = os.umask(0)
    os.umask(umask)

    def factory(**kw) -> Passthrough:
        fs = Passthrough(str(share), **kw)
        made.append(fs)
        return fs

    yield factory
    for fs in made:
        fs.close()
    os.umask(umask)
