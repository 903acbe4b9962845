"""scripts/common.sh: what the tests need and cannot be installed stops CI, and only CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "scripts" / "common.sh"


def _install_needed(ci: str | None) -> subprocess.CompletedProcess:
    # apt_update stands for a machine where nothing can be installed (no root, no network).
    script = f'. "{COMMON}"; apt_update() {{ return 3; }}; install_needed fio; echo went-on'
    env = {"PATH": "/usr/bin:/bin"} | ({} if ci is None else {"CI": ci})
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_stops_when_a_needed_package_cannot_be_installed(ci):
    r = _install_needed(ci)
    assert r.returncode == 1 and "went-on" not in r.stdout
    assert "cannot install fio" in r.stderr


@pytest.mark.parametrize("ci", [None, "false", "0"])
def test_elsewhere_it_goes_on_and_says_so(ci):
    r = _install_needed(ci)
    assert r.returncode == 0 and "went-on" in r.stdout
    assert "continuing without fio" in r.stderr
