"""vhostfs over /dev/fuse against the plain host directory, libfuse's passthrough_hp and a Python peer.

Runs the same workload on each target, one after the other:
  host           the plain directory (the limit)
  vhostfs        `vhostfs mount --shared-dir SRC MNT` with neither FUSE passthrough nor io_uring
  vhostfs-pt     the same with FUSE passthrough (the kernel reads and writes the host files)
  vhostfs-uring  the same with FUSE over io_uring (and no passthrough)
  vhostfs-both   passthrough and io_uring
  pthp           libfuse's passthrough_hp example (its defaults: passthrough, /dev/fuse)
  pthp-uring     passthrough_hp -o io_uring
  pyfuse3        pyfuse3's passthroughfs example (installed from PyPI by this script, with libfuse3-dev)

passthrough_hp is built by this script, outside the source tree (in /var/cache/vhostfs/bench), from
Debian's fuse3 source package of the release named by --libfuse-suite (testing has a libfuse with
passthrough and io_uring), fetched with apt through a private source list. The io_uring targets set
the fuse module's enable_uring parameter for their run and put it back afterwards.

The workload: fio (psync; 1 MiB sequential read and write, 4 KiB random read and write, buffered and
with O_DIRECT so that every request reaches the file server; a job the file system fails shows as
"failed" in the table and the plot, and fails the run if the host directory or vhostfs failed it)
and a metadata loop (create, stat, open/close, rename, unlink of NFILES files). It prints a table and
writes it, with a PNG plot, to --out (default ./host-fuse-report). Needs root and /dev/fuse; fio,
pyfuse3 and matplotlib are installed when missing.

    python benchmarks/host_fuse.py [--runtime 5] [--nfiles 2000] [--targets host,vhostfs,...]
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
VHOSTFS_TARGETS = {
    "vhostfs": ["--no-fuse-passthrough", "--no-io-uring"],
    "vhostfs-pt": ["--fuse-passthrough", "--no-io-uring"],
    "vhostfs-uring": ["--no-fuse-passthrough", "--io-uring"],
    "vhostfs-both": ["--fuse-passthrough", "--io-uring"],
}
PTHP_TARGETS = {"pthp": [], "pthp-uring": ["-o", "io_uring"]}
ALL_TARGETS = ["host", *VHOSTFS_TARGETS, *PTHP_TARGETS, "pyfuse3"]
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
CACHE = Path("/var/cache/vhostfs/bench")


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
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "pyfuse3", "pyfuse3",
           "-d", str(cache))
        for sdist in cache.glob("pyfuse3-*.tar.gz"):
            with tarfile.open(sdist) as tar:
                tar.extractall(cache, filter="data")
        found = glob.glob(str(cache / "*" / "examples" / "passthroughfs.py"))
    return found[0]


def ensure_passthrough_hp(suite: str) -> Path:
    """Builds libfuse's passthrough_hp from Debian `suite`'s fuse3 source package; returns its path."""
    found = sorted(CACHE.glob(f"{suite}/fuse-*/build/example/passthrough_hp"))
    if found:
        return found[-1]
    sh("apt-get", "install", "-y", "-q", "meson", "ninja-build", "g++", "pkg-config", "liburing-dev",
       "libnuma-dev", stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    root = CACHE / suite
    lists = root / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    sources = root / "sources.list"
    sources.write_text(f"deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                       f"http://deb.debian.org/debian {suite} main\n")
    apt = ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
           "-o", f"Dir::State::Lists={lists}"]
    sh("apt-get", "-q", *apt, "update", stdout=subprocess.DEVNULL)
    sh("apt-get", "-q", *apt, "source", "--download-only", "fuse3", cwd=root, stdout=subprocess.DEVNULL)
    with tarfile.open(next(root.glob("fuse3_*.orig.tar.*"))) as tar:
        tar.extractall(root, filter="data")
    src = next(p for p in root.glob("fuse-*") if p.is_dir())
    sh("meson", "setup", "build", "-Dutils=false", "-Dtests=false", "-Dexamples=true",
       "-Ddefault_library=static", cwd=src, stdout=subprocess.DEVNULL)
    sh("ninja", "-C", "build", "example/passthrough_hp", cwd=src, stdout=subprocess.DEVNULL)
    return src / "build" / "example" / "passthrough_hp"


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


def run_target(name: str, src: Path, mnt: Path, args, example: str | None,
               pthp: Path | None) -> dict[str, float]:
    proc = None
    where = src
    uring = "uring" in name or "both" in name
    old_uring = ENABLE_URING.read_text().strip() if uring else None
    if uring:
        ENABLE_URING.write_text("Y")
    if name != "host":
        if name in VHOSTFS_TARGETS:
            cmd = [sys.executable, "-m", "vhostfs", "mount", "--shared-dir", str(src), str(mnt),
                   "--log-level", "error", *VHOSTFS_TARGETS[name]]
        elif name in PTHP_TARGETS:
            cmd = [str(pthp), "--foreground", *PTHP_TARGETS[name], str(src), str(mnt)]
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
        if old_uring is not None:
            ENABLE_URING.write_text(old_uring)


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
    return f"{'failed':>14}" if math.isnan(value) else f"{value:>14.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    ap.add_argument("--size", default="256M", help="fio file size")
    ap.add_argument("--nfiles", type=int, default=2000)
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"of {', '.join(ALL_TARGETS)}")
    ap.add_argument("--libfuse-suite", default="forky",
                    help="the Debian release whose fuse3 source builds passthrough_hp")
    ap.add_argument("--out", default="host-fuse-report")
    ap.add_argument("--no-plot", action="store_true", help="write the table only (no matplotlib)")
    args = ap.parse_args()
    targets = args.targets.split(",")
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    example = ensure_tools("pyfuse3" in targets, not args.no_plot)
    pthp = ensure_passthrough_hp(args.libfuse_suite) if set(PTHP_TARGETS) & set(targets) else None
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        src, mnt = Path(tmp, "src"), Path(tmp, "mnt")
        for target in targets:
            src.mkdir()
            mnt.mkdir()
            print(f"running {target} ...", flush=True)
            results[target] = run_target(target, src, mnt, args, example, pthp)
            shutil.rmtree(src)
            mnt.rmdir()
    units = {f: u for f, _, _, u in FIO_JOBS} | {m: "ops/s" for m in META}
    # Ratios the targets are judged by: passthrough against the directory, io_uring against the peers
    # (passthrough_hp passes files through by default, so its io_uring column compares with both).
    ratios = [(a, b) for a, b in (("vhostfs-pt", "host"), ("vhostfs-uring", "pyfuse3"),
                                  ("vhostfs-uring", "pthp"), ("vhostfs-both", "pthp-uring"))
              if a in targets and b in targets]
    lines = [f"{'figure':<22}" + "".join(f"{t:>14}" for t in targets) + "  unit  "
             + "".join(f"{a + '/' + b:>26}" for a, b in ratios)]
    for figure, unit in units.items():
        row = f"{figure:<22}" + "".join(_cell(results[t][figure]) for t in targets) + f"  {unit:<6}"
        row += "".join(f"{results[a][figure] / results[b][figure]:>26.2f}" for a, b in ratios)
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
    # The peers may fail jobs they cannot serve (O_DIRECT); the host directory and vhostfs must not.
    failed = [f"{t} {f}" for t in results if t == "host" or t.startswith("vhostfs")
              for f, v in results[t].items() if math.isnan(v)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
