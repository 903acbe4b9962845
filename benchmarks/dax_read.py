"""Reading a large file through the DAX window against reading it with FUSE READ.

Starts `python -m vhostfs --dax-window-size` on a scratch directory holding one file (256 MiB by
default, read once on the host first so both runs start from the page cache), and drives it with
vhostfs.testing, which plays both the VMM (it reserves the window and maps what SHMEM_MAP sends) and the
guest. It prints MiB/s for:

- FUSE READ: 1 MiB READ requests one after the other, each copied out of guest memory;
- DAX: FUSE_SETUPMAPPING of 2 MiB ranges (the Linux driver's FUSE_DAX_SZ), each copied out of the
  window, the mapping requests included in the time.

    python benchmarks/dax_read.py [--size-mib 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _daemon import daemon, main_guard

from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient

MIB = 1 << 20
READ_SIZE = 1 * MIB
DAX_RANGE = 2 * MIB


def fuse_read(client: FuseClient, nodeid: int, fh: int, size: int) -> float:
    start = time.perf_counter()
    for offset in range(0, size, READ_SIZE):
        data = client.read(nodeid, fh, offset, READ_SIZE)
        assert len(data) == min(READ_SIZE, size - offset)
    return time.perf_counter() - start


def dax_read(client: FuseClient, fe: Frontend, nodeid: int, fh: int, size: int) -> float:
    start = time.perf_counter()
    for offset in range(0, size, DAX_RANGE):
        client.call(abi.FUSE_SETUPMAPPING, nodeid, abi.SETUPMAPPING_IN.pack(
            fh, offset, DAX_RANGE, abi.FUSE_SETUPMAPPING_FLAG_READ, offset))
        data = bytes(fe.window_view(offset, min(DAX_RANGE, size - offset)))
        assert len(data) == min(DAX_RANGE, size - offset)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="file size in MiB (default 256)")
    args = ap.parse_args()
    size = args.size_mib * MIB
    window = -(-size // DAX_RANGE) * DAX_RANGE
    with tempfile.TemporaryDirectory() as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        path = os.path.join(share, "big")
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        with open(path, "rb") as f:
            while f.read(8 * MIB):
                pass
        sock = os.path.join(tmp, "vfs.sock")
        with daemon(sock, share, "--dax-window-size", str(window)) as watched:
            with Frontend.connect(sock) as fe:
                fe.setup(dax_window=window)
                client = FuseClient(fe)
                client.init(flags=abi.FUSE_MAP_ALIGNMENT)
                nodeid = client.lookup(abi.ROOT_ID, b"big")[0]
                fh = client.open(nodeid)
                read_s = fuse_read(client, nodeid, fh, size)
                dax_s = dax_read(client, fe, nodeid, fh, size)
                watched.done()
            print(f"file size      {args.size_mib} MiB")
            print(f"FUSE READ      {args.size_mib / read_s:8.1f} MiB/s  (1 MiB requests)")
            print(f"DAX window     {args.size_mib / dax_s:8.1f} MiB/s  (2 MiB mappings, mapping included)")


if __name__ == "__main__":
    main_guard(main)
