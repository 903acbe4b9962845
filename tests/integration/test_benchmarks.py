"""A short smoke run of each benchmark: it prints its figures and exits, and when the daemon it
measures dies it exits with an error instead of hanging (the figures themselves are not judged)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.needs import skip_unless_ci

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SMOKE = {
    "latency.py": ("--requests", "200", "--file-mib", "4"),
    "scaling.py": ("--seconds", "0.2", "--file-mib", "8"),
    "dax_read.py": ("--size-mib", "4"),
}
FIGURE = r"[0-9.]+"


def run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCHMARKS.parent)


def test_latency_prints_its_figures():
    r = run("latency.py", *SMOKE["latency.py"])
    assert r.returncode == 0, r.stderr
    for name in ("read_4k", "getattr"):
        line = rf"^{name}\s+p50\s+{FIGURE} us\s+p99\s+{FIGURE} us\s+{FIGURE} req/s$"
        assert re.search(line, r.stdout, re.M), r.stdout


def test_scaling_prints_its_figures():
    r = run("scaling.py", *SMOKE["scaling.py"])
    assert r.returncode == 0, r.stderr
    for label in ("1 queue", "1 queue, pool 4", "4 queues"):
        assert re.search(rf"^{re.escape(label)}\s+{FIGURE} req/s\s+{FIGURE} MiB/s$", r.stdout, re.M), r.stdout


def test_dax_read_prints_its_figures():
    r = run("dax_read.py", *SMOKE["dax_read.py"])
    assert r.returncode == 0, r.stderr
    for label in ("FUSE READ", "DAX window"):
        assert re.search(rf"^{label}\s+{FIGURE} MiB/s", r.stdout, re.M), r.stdout


def _host_fuse_needs() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        skip_unless_ci("host_fuse.py needs root and /dev/fuse")
    if shutil.which("fio") is None:
        skip_unless_ci("host_fuse.py needs fio (scripts/test.sh installs it)")


def test_host_fuse_prints_its_figures(tmp_path):
    _host_fuse_needs()
    r = run("host_fuse.py", "--targets", "vhostfs", "--runtime", "1", "--size", "4M", "--nfiles", "20",
            "--no-plot", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"vhostfs"}
    for target, figures in results.items():
        assert figures and all(math.isfinite(v) and v > 0 for v in figures.values()), (target, figures)
    assert "seqread_1M" in r.stdout and "unlink" in r.stdout


def _child(pid: int, marker: str, timeout: float = 60) -> int:
    """The pid of the child of `pid` whose command line contains `marker`, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    try:
                        with open(f"/proc/{child}/cmdline", "rb") as c:
                            if marker.encode() in c.read():
                                return int(child)
                    except FileNotFoundError:
                        pass
        time.sleep(0.1)
    raise AssertionError(f"no child running {marker!r}")


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_a_benchmark_exits_when_the_daemon_dies(script):
    # Long enough that the daemon dies while the benchmark still uses it.
    long = {"latency.py": ("--requests", "100000000", "--file-mib", "4"),
            "scaling.py": ("--seconds", "600", "--file-mib", "8"),
            "dax_read.py": ("--size-mib", "1024")}[script]
    bench = subprocess.Popen([sys.executable, str(BENCHMARKS / script), *long], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=BENCHMARKS.parent)
    try:
        daemon = _child(bench.pid, "vhostfs")
        time.sleep(0.5)
        os.kill(daemon, signal.SIGKILL)
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 1, out + err
    assert "the daemon exited" in err and "Traceback" not in err, err


def test_host_fuse_exits_when_vhostfs_mount_dies(tmp_path):
    _host_fuse_needs()
    bench = subprocess.Popen([sys.executable, str(BENCHMARKS / "host_fuse.py"), "--targets", "vhostfs",
                              "--runtime", "2", "--size", "4M", "--nfiles", "200000", "--no-plot", "--out",
                              str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=BENCHMARKS.parent)
    try:
        mount = _child(bench.pid, "mount")
        time.sleep(1.5)
        os.kill(mount, signal.SIGKILL)
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 1, out + err
    assert "failed" in out and "failed: vhostfs" in err, out + err
    results = json.loads((tmp_path / "results.json").read_text())
    assert any(math.isnan(v) for v in results["vhostfs"].values())
