"""vhostfs over /dev/fuse against the plain host directory and a Python peer, in one run.

Runs the same workload on three targets, one after the other:
  host      the plain directory (the limit)
  vhostfs   `vhostfs mount --shared-dir SRC MNT`
  pyfuse3   pyfuse3's passthroughfs example (installed from PyPI by this script, with libfuse3-dev)

The workload: fio (psync; 1 MiB sequential read and write, 4 KiB random read and write, buffered and
with O_DIRECT so that every request reaches the file server; a job the file system fails shows as
"failed" in the table and the plot, and fails the run if the host directory or vhostfs failed it)
and a metadata loop (create, stat, open/close, rename, unlink of NFILES files). It prints a table and
writes it, with a PNG plot, to --out (default ./host-fuse-report). Needs root and /dev/fuse; fio,
pyfuse3 and matplotlib are installed when missing.

    python benchmarks/host_fuse.py [--runtime 5] [--nfiles 2000] [--targets host,vhostfs,pyfuse3]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FIO_JOBS = (  # (figure, fio rw, block size, unit)
    # Without O_DIRECT, which pyfuse3's passthroughfs cannot serve (an O_DIRECT job ends its process,
    # hence these first): one pass over a file whose cached pages fio drops first, so that reads reach
    # the file server too (writes do anyway: no writeback cache).
    ("seqread_1M_buffered", "read", "1M", "MiB/s"),
    ("seqwrite_1M_buffered", "write", "1M", "MiB/s"),
    ("randread_4k_buffered", "randread", "4k", "IOPS"),
    ("randwrite_4k_buffered", "randwrite", "4k", "IOPS"),
    ("seqread_1M", "read", "1M", "MiB/s"),
    ("seqwrite_1M", "write", "1M", "MiB/s"),
    ("randread_4k", "randread", "4k", "IOPS"),
    ("randwrite_4k", "randwrite", "4k", "IOPS"),
)
META = ("create", "stat", "open_close", "rename", "unlink")


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools(need_pyfuse3: bool, need_plot: bool = True) -> str | None:
    """Installs fio (and pyfuse3 with its build needs, and matplotlib for the plot); returns the path
    of passthroughfs.py."""
    apt = [] if shutil.which("fio") else ["fio"]
    if need_pyfuse3:
        apt += ["libfuse3-dev", "pkg-config", "fuse3"]
    if apt:
        sh("apt-get", "install", "-y", "-q", *apt, stdout=subprocess.DEVNULL, env={**os.environ,
           "DEBIAN_FRONTEND": "noninteractive"})
    # Benchmark-only dependencies: the peer and the plot.
    wanted = (["matplotlib"] if need_plot else []) + (["pyfuse3"] if need_pyfuse3 else [])
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        sh(sys.executable, "-m", "pip", "install", "-q", *missing)
    if not need_pyfuse3:
        return None
    # The example ships in the source distribution only.
    cache = Path(tempfile.gettempdir()) / "vhostfs-bench-pyfuse3"
    found = glob.glob(str(cache / "*" / "examples" / "passthroughfs.py"))
    if not found:
        cache.mkdir(exist_ok=True)
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "pyfuse3",
           "-d", str(cache))
        for sdist in cache.glob("pyfuse3-*.tar.gz"):
            with tarfile.open(sdist) as tar:
                tar.extractall(cache, filter="data")
        found = glob.glob(str(cache / "*" / "examples" / "passthroughfs.py"))
    return found[0]


def wait_mounted(mnt: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mount at {mnt} did not come up")
        time.sleep(0.05)


def fio(directory: Path, name: str, rw: str, bs: str, runtime: int, size: str) -> float:
    """The job's MiB/s (1 MiB blocks) or IOPS; NaN when the file system fails it."""
    buffered = name.endswith("_buffered")
    mode = ["--direct=0", "--invalidate=1"] if buffered else ["--direct=1", "--time_based"]
    run = subprocess.run(
        ["fio", "--output-format=json", "--ioengine=psync", *mode, f"--name={name}", f"--rw={rw}",
         f"--bs={bs}", f"--size={size}", f"--filename={directory / 'fio.dat'}", f"--runtime={runtime}"],
        capture_output=True, text=True)
    if run.returncode:
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "error" in line.lower()]
        print(f"  {name} failed: {errors[0] if errors else 'fio exit status ' + str(run.returncode)}")
        return float("nan")
    job = json.loads(run.stdout)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw"] / 1024 if bs == "1M" else side["iops"]


def metadata(directory: Path, n: int) -> dict[str, float]:
    d = directory / "meta"
    d.mkdir()
    steps: list[tuple[str, Callable[[int], None]]] = [
        ("create", lambda i: os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))),
        ("stat", lambda i: os.stat(d / f"f{i}")),
        ("open_close", lambda i: os.close(os.open(d / f"f{i}", os.O_RDONLY))),
        ("rename", lambda i: os.rename(d / f"f{i}", d / f"g{i}")),
        ("unlink", lambda i: os.unlink(d / f"g{i}")),
    ]
    out = {}
    for name, op in steps:
        t = time.perf_counter()
        for i in range(n):
            op(i)
        out[name] = n / (time.perf_counter() - t)
    d.rmdir()
    return out


def run_target(name: str, src: Path, mnt: Path, args, example: str | None) -> dict[str, float]:
    proc = None
    where = src
    if name != "host":
        if name == "vhostfs":
            cmd = [sys.executable, "-m", "vhostfs", "mount", "--shared-dir", str(src), str(mnt),
                   "--log-level", "error"]
        else:
            cmd = [sys.executable, str(example), str(src), str(mnt)]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        wait_mounted(mnt, proc)
        where = mnt
    try:
        # Metadata first: a peer that cannot do O_DIRECT I/O may die in the fio jobs.
        try:
            results = metadata(where, args.nfiles)
        except OSError as e:  # the file server died, or refused
            print(f"  metadata failed: {e}")
            results = dict.fromkeys(META, float("nan"))
        results.update({fig: fio(where, fig, rw, bs, args.runtime, args.size) for fig, rw, bs, _ in FIO_JOBS})
        return results
    finally:
        if proc is not None:
            subprocess.run(["umount", str(mnt)], check=False)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def relative(results: dict[str, dict[str, float]], target: str, figures: list[str]) -> list[float]:
    """`target`'s figures relative to the host directory's (as they are without a host run); NaN
    where the target or the host failed the figure."""
    host = results.get("host")
    return [results[target][f] / host[f] if host is not None else results[target][f] for f in figures]


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    """Bars per figure, relative to the host directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f, *_ in FIO_JOBS] + list(META)
    targets = list(results)
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, target in enumerate(targets):
        xs = [x + i * width for x in range(len(figures))]
        heights = relative(results, target, figures)
        # A failed figure gets no bar (a NaN height draws nothing) and says so: never a bar of 0.
        ax.bar(xs, heights, width, label=target)
        for x, h in zip(xs, heights, strict=True):
            if math.isnan(h):
                ax.text(x, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(figures))], figures, rotation=20)
    ax.set_ylabel("relative to the host directory" if "host" in results else "figure")
    ax.set_title("vhostfs over /dev/fuse (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(value: float) -> str:
    return f"{'failed':>12}" if math.isnan(value) else f"{value:>12.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--size", default="256M", help="fio file size")
    ap.add_argument("--nfiles", type=int, default=2000)
    ap.add_argument("--targets", default="host,vhostfs,pyfuse3")
    ap.add_argument("--out", default="host-fuse-report")
    ap.add_argument("--no-plot", action="store_true", help="write the table only (no matplotlib)")
    args = ap.parse_args()
    targets = args.targets.split(",")
    example = ensure_tools("pyfuse3" in targets, not args.no_plot)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        src, mnt = Path(tmp, "src"), Path(tmp, "mnt")
        for target in targets:
            src.mkdir()
            mnt.mkdir()
            print(f"running {target} ...", flush=True)
            results[target] = run_target(target, src, mnt, args, example)
            shutil.rmtree(src)
            mnt.rmdir()
    units = {f: u for f, _, _, u in FIO_JOBS} | {m: "ops/s" for m in META}
    lines = [f"{'figure':<22}" + "".join(f"{t:>12}" for t in targets) + "  unit"
             + ("   vhostfs/pyfuse3" if {"vhostfs", "pyfuse3"} <= set(targets) else "")]
    for figure, unit in units.items():
        row = f"{figure:<22}" + "".join(_cell(results[t][figure]) for t in targets) + f"  {unit:<6}"
        if {"vhostfs", "pyfuse3"} <= set(targets):
            row += f"  {results['vhostfs'][figure] / results['pyfuse3'][figure]:>10.2f}"
        lines.append(row)
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        plot(results, out / "results.png")
    print(f"report: {out}/results.txt" + ("" if args.no_plot else f", {out}/results.png"))
    # The peer may fail jobs it cannot serve (O_DIRECT); the host directory and vhostfs must not.
    failed = [f"{t} {f}" for t in ("host", "vhostfs") if t in results
              for f, v in results[t].items() if math.isnan(v)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
