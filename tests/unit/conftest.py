"""Fixtures shared by the passthrough tests: a share with a canary directory beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_passthrough import _tree
from vhostfs.fs.passthrough import Passthrough, prepare_process


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
    """Builds Passthroughs of `share` with the given options, closed after."""
    made: list[Passthrough] = []

    def factory(**kw) -> Passthrough:
        fs = Passthrough(str(share), **kw)
        made.append(fs)
        return fs

    yield factory
    for fs in made:
        fs.close()


@pytest.fixture(autouse=True)
def passthrough_process():
    """The process-wide settings a Passthrough needs (prepare_process), undone after each test."""
    umask = os.umask(0)
    groups = os.getgroups()
    prepare_process()
    yield
    os.umask(umask)
    if os.geteuid() == 0:
        os.setgroups(groups)
