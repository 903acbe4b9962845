"""benchmarks/parallel_guest.py in a short run: it boots its guest, runs both workloads with one and two
workers and prints a figure for each (the figures themselves are not judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "parallel_guest.py"
FIGURES = ("randread_4k", "randwrite_4k", "seqread_1M", "create", "stat", "open_close", "rename", "unlink")


def test_parallel_benchmark_prints_each_figure_for_one_and_two_workers(guest_images):
    r = subprocess.run([sys.executable, str(BENCHMARK), "--stack", "debian12", "--rounds", "1",
                        "--runtime", "1", "--files", "50", "--size-mib", "16"],
                       capture_output=True, text=True, timeout=900, cwd=BENCHMARK.parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
    for figure in FIGURES:
        # figure, unit, one worker, two, spread, two over one
        row = re.search(rf"^{figure}\s+\S+\s+([0-9]+)\s+([0-9]+)\s+\S+\s+([0-9.]+)\s*$", r.stdout,
                        re.MULTILINE)
        assert row, f"no row for {figure}:\n{r.stdout}"
        one, two, scale = int(row.group(1)), int(row.group(2)), float(row.group(3))
        assert one > 0 and two > 0 and scale > 0, row.group(0)
