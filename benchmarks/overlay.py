"""What the overlay costs, in-process through FuseServer (no transport, no guest):

- READ of files not yet copied up: the overlay of one lower directory against the passthrough of that
  directory, 4 KiB and 128 KiB reads at random offsets of a 64 MiB file;
- LOOKUP (each followed by its FORGET, so every lookup is a fresh one) of a name found only in the
  bottom layer, through 10 lower layers against 1: the same name again and again, and names met for
  the first time (which must ask every layer).

    python benchmarks/overlay.py [--seconds S] [--dir DIR]

Prints requests per second (the best of short rounds that take turns, so that other work on the
machine slows both sides alike) and the overlay's ratio to the reference. Not a timed test.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from vhostfs.fs.overlay import OverlayFs
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import Filesystem
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer

FILE_SIZE = 64 << 20


class Driver:
    """FuseServer.handle with hand-built requests from uid 0, into one reused reply buffer."""

    def __init__(self, fs: Filesystem) -> None:
        self.server = FuseServer(fs)
        self.unique = 0
        self.out = bytearray((1 << 17) + 4096)
        self.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, 38, 1 << 17, DEFAULT_WANT | abi.FUSE_INIT_EXT, 0))

    def call(self, opcode: int, body: bytes = b"", nodeid: int = abi.ROOT_ID) -> bytes:
        self.unique += 1
        data = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0) + body
        n = self.server.handle(Reader([memoryview(data)]), Writer([memoryview(self.out)]))
        if opcode == abi.FUSE_FORGET:
            return b""
        _, error, _ = abi.OUT_HEADER.unpack_from(self.out)
        if error:
            raise OSError(-error, os.strerror(-error))
        return bytes(self.out[16:n])

    def lookup(self, name: bytes, parent: int = abi.ROOT_ID) -> int:
        return abi.ENTRY_OUT.unpack_from(self.call(abi.FUSE_LOOKUP, name + b"\0", parent))[0]


def rate(seconds: float, step) -> float:
    """Calls `step()` for about `seconds` and returns the calls per second."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            step()
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def best_rates(seconds: float, *steps) -> list[float]:
    """The best rate of each of `steps` over rounds that take turns (0.25 s each, `seconds` in all
    per step), so that a machine busy with other work slows them alike."""
    best = [0.0] * len(steps)
    for _ in range(max(1, int(seconds / 0.25))):
        for i, step in enumerate(steps):
            best[i] = max(best[i], rate(0.25, step))
    return best


def read_step(drv: Driver, size: int):
    """A step that READs `size` bytes at a random aligned offset of the file "data"."""
    nodeid = drv.lookup(b"data")
    fh = abi.OPEN_OUT.unpack_from(drv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid))[0]
    offsets = [random.randrange(0, FILE_SIZE // size) * size for _ in range(4096)]
    bodies = [abi.READ_IN.pack(fh, off, size, 0, 0, os.O_RDONLY) for off in offsets]
    it = iter(range(1 << 62))

    def step() -> None:
        drv.call(abi.FUSE_READ, bodies[next(it) & 4095], nodeid)

    return step


def lookup_step(drv: Driver):
    """A step that LOOKUPs "deep" in the root and FORGETs it again."""
    def step() -> None:
        nodeid = drv.lookup(b"deep")
        drv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid)

    return step


def cold_lookups(make_fs, names: list[bytes], rounds: int) -> float:
    """The best rate of LOOKUP + FORGET over `names`, each looked up once, in a fresh file system per
    round (nothing remembered from an earlier lookup)."""
    best = 0.0
    for _ in range(rounds):
        fs = make_fs()
        drv = Driver(fs)
        start = time.perf_counter()
        for name in names:
            nodeid = drv.lookup(name)
            drv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid)
        best = max(best, len(names) / (time.perf_counter() - start))
        fs.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vhostfs-overlay-bench-", dir=args.dir))
    try:
        upper = base / "upper"
        lower = base / "lower"
        ten = [base / f"ten{i}" for i in range(10)]
        for d in (upper, lower, *ten):
            d.mkdir()
        with open(lower / "data", "wb") as f:
            f.write(os.urandom(FILE_SIZE))
        (lower / "deep").write_bytes(b"in the only lower layer")
        (ten[-1] / "deep").write_bytes(b"in the bottom layer")

        print("READ of a lower file, not copied up (req/s, best of rounds taking turns)")
        ref_fs = Passthrough(str(lower), readonly=True)
        ovl = OverlayFs.from_dirs(str(upper), [str(lower)])
        ref_drv, ovl_drv = Driver(ref_fs), Driver(ovl)
        for size in (4096, 128 << 10):
            ref, got = best_rates(args.seconds, read_step(ref_drv, size), read_step(ovl_drv, size))
            print(f"  {size >> 10:4d} KiB  passthrough {ref:9.0f}  overlay {got:9.0f}  "
                  f"overlay costs {ref / got - 1:+6.1%} per read")
        ref_fs.close()
        ovl.close()

        print("LOOKUP + FORGET of a name in the bottom lower layer (req/s, best of rounds taking turns)")
        ref_fs = Passthrough(str(lower), readonly=True)
        one = OverlayFs.from_dirs(str(upper), [str(lower)])
        many = OverlayFs.from_dirs(str(upper), [str(d) for d in ten])
        r0, r1, r10 = best_rates(args.seconds, lookup_step(Driver(ref_fs)), lookup_step(Driver(one)),
                                 lookup_step(Driver(many)))
        print(f"  passthrough {r0:9.0f}  overlay of 1 lower layer {r1:9.0f}  of 10 {r10:9.0f}  "
              f"10 layers take {r1 / r10:4.2f}x one")
        for fs in (ref_fs, one, many):
            fs.close()

        print("LOOKUP + FORGET of names met for the first time, in the bottom lower layer (req/s)")
        names = [b"cold%d" % i for i in range(2000)]
        for name in names:
            (lower / name.decode()).write_bytes(b"")
            (ten[-1] / name.decode()).write_bytes(b"")
        rounds = max(1, int(args.seconds))
        c0 = cold_lookups(lambda: Passthrough(str(lower), readonly=True), names, rounds)
        c1 = cold_lookups(lambda: OverlayFs.from_dirs(str(upper), [str(lower)]), names, rounds)
        c10 = cold_lookups(lambda: OverlayFs.from_dirs(str(upper), [str(d) for d in ten]), names, rounds)
        print(f"  passthrough {c0:9.0f}  overlay of 1 lower layer {c1:9.0f}  of 10 {c10:9.0f}  "
              f"10 layers take {c1 / c10:4.2f}x one")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
