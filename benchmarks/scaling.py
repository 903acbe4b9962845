"""Does the daemon's throughput grow with parallel requests? Figures for one queue and for several.

Starts `python -m vhostfs` on a scratch directory and keeps DEPTH requests in flight on each of
QUEUES request queues (through the test front end, no guest), reading 4 KiB or 1 MiB at random
offsets of a file that is in the host page cache. Each configuration prints requests/s and MiB/s:

    python benchmarks/scaling.py [--seconds 5] [--size 4096]

Configurations: one queue served by its own thread; one queue with --thread-pool-size 4; four
queues, each with its own thread.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from _daemon import daemon, main_guard

from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient

FILE_SIZE = 256 << 20
CONFIGS = (  # (label, request queues, daemon options)
    ("1 queue", 1, ()),
    ("1 queue, pool 4", 1, ("--thread-pool-size", "4")),
    ("4 queues", 4, ()),
)


def run(share: str, tmp: str, queues: int, options: tuple[str, ...], size: int, depth: int,
        seconds: float, file_size: int) -> float:
    """Requests per second with `depth` requests in flight on each of `queues` request queues."""
    sock = os.path.join(tmp, "vfs.sock")
    with daemon(sock, share, *options) as watched:
        with Frontend.connect(sock, mem_size=(queues * depth + 8) * (size + 8192) + (32 << 20)) as fe:
            fe.setup(queues=1 + queues, num=1024)
            client = FuseClient(fe)
            client.init()
            nodeid = client.lookup(abi.ROOT_ID, b"data")[0]
            fh = client.open(nodeid)
            rng = random.Random(1)
            slots = []  # (ring, head -> reply buffer) per queue
            for q in range(1, 1 + queues):
                ring = fe.rings[q]
                bufs = [(fe.alloc(80), fe.alloc(size + 16, 4096)) for _ in range(depth)]
                slots.append((ring, bufs))

            def post(ring, src, dst) -> int:
                off = rng.randrange(file_size // size) * size
                msg = client.message(abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, off, size, 0, 0, 0))
                fe.view[src:src + len(msg)] = msg
                head = fe.make_chain(ring, [(src, len(msg))], [(dst, size + 16)])
                fe.publish(ring, head)
                return head

            inflight = []
            for ring, bufs in slots:
                inflight.append({post(ring, s, d): (s, d) for s, d in bufs})
            done = 0
            end = time.perf_counter() + seconds
            start = time.perf_counter()
            while time.perf_counter() < end:
                for (ring, _), heads in zip(slots, inflight, strict=True):
                    head, length = fe.wait_used(ring)
                    if length != size + 16:
                        raise RuntimeError(f"short read reply: {length}")
                    src, dst = heads.pop(head)
                    heads[post(ring, src, dst)] = (src, dst)
                    done += 1
            elapsed = time.perf_counter() - start
            for (ring, _), heads in zip(slots, inflight, strict=True):
                for _ in heads:
                    fe.wait_used(ring)
            watched.done()
        return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--size", type=int, default=4096, help="bytes per READ (e.g. 4096 or 1048576)")
    ap.add_argument("--depth", type=int, default=4, help="requests in flight per queue")
    ap.add_argument("--file-mib", type=int, default=FILE_SIZE >> 20, help="size of the file read (MiB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        with open(os.path.join(share, "data"), "wb") as f:
            f.write(os.urandom(args.file_mib << 20))
        print(f"READ of {args.size} bytes, {args.depth} in flight per queue, {os.cpu_count()} CPUs")
        for label, queues, options in CONFIGS:
            rate = run(share, tmp, queues, options, args.size, args.depth, args.seconds, args.file_mib << 20)
            print(f"{label:<18} {rate:10.0f} req/s {rate * args.size / (1 << 20):10.1f} MiB/s", flush=True)


if __name__ == "__main__":
    main_guard(main)
