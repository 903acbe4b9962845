"""Per-request cost of the daemon without a guest: 4 KiB random reads through the test front end.

Starts `python -m vhostfs` on a scratch directory, drives it with vhostfs.testing (one request in
flight, as a synchronous guest reader does) and prints p50/p99 latency and requests per second for
FUSE READ of 4 KiB at random offsets, and for GETATTR. `--profile FILE` samples the daemon (all its
threads) with py-spy and writes collapsed stacks to FILE; the functions with the most samples of their
own are printed.

    python benchmarks/latency.py [--requests N] [--profile daemon.prof]
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import tempfile
import time

from _daemon import daemon, main_guard

from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient

FILE_SIZE = 64 << 20


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def report(name: str, samples: list[float]) -> None:
    p50, p99 = percentiles(samples)
    rate = len(samples) / sum(samples)
    print(f"{name:<12} p50 {p50 * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us   {rate:10.0f} req/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--file-mib", type=int, default=FILE_SIZE >> 20, help="size of the file read (MiB)")
    ap.add_argument("--profile", help="run the daemon under cProfile, statistics to this file")
    ap.add_argument("--daemon-args", default="", help="more vhostfs options, e.g. '--poll-us 0'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        with open(os.path.join(share, "data"), "wb") as f:
            f.write(os.urandom(args.file_mib << 20))
        sock = os.path.join(tmp, "vfs.sock")
        prof = ["py-spy", "record", "--format", "raw", "--rate", "2000", "--output",
                os.path.abspath(args.profile), "--"] if args.profile else []
        with daemon(sock, share, *shlex.split(args.daemon_args), wrapper=prof) as watched:
            with Frontend.connect(sock) as fe:
                fe.setup(queues=2, num=1024)
                client = FuseClient(fe)
                client.init()
                nodeid = client.lookup(abi.ROOT_ID, b"data")[0]
                fh = client.open(nodeid)
                rng = random.Random(1)
                reads, getattrs = [], []
                for _ in range(args.requests):
                    off = rng.randrange((args.file_mib << 20) // 4096) * 4096
                    t = time.perf_counter()
                    client.read(nodeid, fh, off, 4096)
                    reads.append(time.perf_counter() - t)
                for _ in range(args.requests):
                    t = time.perf_counter()
                    client.getattr(nodeid)
                    getattrs.append(time.perf_counter() - t)
                client.release(nodeid, fh)
                watched.done()
            report("read_4k", reads)
            report("getattr", getattrs)
            print(f"(median of {statistics.median(reads) * 1e6:.1f} us includes the front end's own work)")
    if args.profile:
        print_profile(args.profile)


def print_profile(path: str, top: int = 25) -> None:
    """Sums py-spy's collapsed stacks by innermost frame (time spent in the function itself)."""
    own: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            own[leaf] = own.get(leaf, 0) + int(count)
            total += int(count)
    print(f"\n{'own %':>6}  function ({total} samples, idle waits included)")
    for leaf, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / total:6.1f}  {leaf}")


if __name__ == "__main__":
    main_guard(main)
