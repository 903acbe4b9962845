"""The test suite's own rule: what a test needs and lacks skips it here, and fails it under CI=true."""

from __future__ import annotations

import pytest

from tests.needs import skip_unless_ci


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_need_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI must run this test, but no widget here"):
        skip_unless_ci("no widget here")


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_need_skips_elsewhere(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no widget here"):
        skip_unless_ci("no widget here")
