"""What the Vfs costs: per request, and for mounting and unmounting many file systems under load.

1. In-process cost of GETATTR, LOOKUP and a 4 KiB READ through `FuseServer.handle`, for the passthrough
   of one directory served alone, and through a Vfs with it mounted at "/", at "/a" shown as a submount
   (FUSE_SUBMOUNTS agreed: node ids mapped, inode numbers kept) and at "/a" without submounts (inode
   numbers remapped, one attribute copy per reply). The variants run interleaved, several rounds; each
   figure is the best round's median.
2. The daemon (`python -m vhostfs --mount ... --api-socket ...`) while the test front end runs a
   metadata workload (lookup, create, getattr, unlink) in one mount: 100 file systems are mounted and
   unmounted through the control API, `--cycles` times; the daemon's RSS and fd count are printed
   before and after each cycle. With `--guest`, a real guest (tests/e2e/guest.py) runs the metadata
   workload instead (mkdir, create, stat, rename, unlink, rmdir, and listing the changing root).

    python benchmarks/vfs.py [--requests N] [--rounds N] [--cycles N] [--mounts N] [--guest]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vhostfs import control
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fs.vfs import Vfs
from vhostfs.fuse import abi
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient


class InProcess:
    """Hand-built requests through FuseServer.handle (no transport)."""

    def __init__(self, fs, flags: int) -> None:
        self.server = FuseServer(fs)
        self.out = bytearray(1 << 16)
        self.unique = 0
        err, body = self.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, 38, 1 << 17, flags | abi.FUSE_INIT_EXT, 0))
        assert err == 0

    def message(self, opcode: int, nodeid: int, body: bytes) -> bytearray:
        self.unique += 1
        header = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 1, 0, 0)
        return bytearray(header + body)

    def call(self, opcode: int, body: bytes, nodeid: int = 1) -> tuple[int, bytes]:
        n = self.server.handle(Reader([memoryview(self.message(opcode, nodeid, body))]),
                               Writer([memoryview(self.out)]))
        _, error, _ = abi.OUT_HEADER.unpack_from(self.out)
        return -error, bytes(self.out[16:n])

    def timed(self, opcode: int, body: bytes, nodeid: int, count: int) -> float:
        """Median seconds per request of `count` identical requests."""
        msg = self.message(opcode, nodeid, body)
        view = memoryview(self.out)
        handle = self.server.handle
        samples = []
        clock = time.perf_counter
        for _ in range(count):
            t = clock()
            handle(Reader([memoryview(msg)]), Writer([view]))
            samples.append(clock() - t)
        _, error, _ = abi.OUT_HEADER.unpack_from(self.out)
        assert error == 0, error
        return statistics.median(samples)


def per_request(share: str, requests: int, rounds: int) -> None:
    variants = {}
    direct = Passthrough(share)
    variants["alone"] = (InProcess(direct, DEFAULT_WANT), 1)
    for name, path, flags in (("vfs at /", "/", DEFAULT_WANT), ("vfs /a submount", "/a", DEFAULT_WANT
                                                                  | abi.FUSE_SUBMOUNTS),
                              ("vfs /a remapped", "/a", DEFAULT_WANT)):
        vfs = Vfs()
        vfs.mount(Passthrough(share), path)
        srv = InProcess(vfs, flags)
        root = 1
        if path != "/":
            err, body = srv.call(abi.FUSE_LOOKUP, b"a\0")
            root = abi.ENTRY_OUT.unpack(body)[0]
        variants[name] = (srv, root)
    ops = {}
    for name, (srv, root) in variants.items():
        err, body = srv.call(abi.FUSE_LOOKUP, b"data\0", root)
        nodeid = abi.ENTRY_OUT.unpack(body)[0]
        err, body = srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
        fh = abi.OPEN_OUT.unpack(body)[0]
        ops[name] = {
            "GETATTR": (abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), nodeid),
            "LOOKUP": (abi.FUSE_LOOKUP, b"data\0", root),
            "READ 4k": (abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDONLY), nodeid),
        }
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for op in ("GETATTR", "LOOKUP", "READ 4k"):
            for name, (srv, _) in variants.items():
                opcode, body, nodeid = ops[name][op]
                t = srv.timed(opcode, body, nodeid, requests)
                if opcode == abi.FUSE_LOOKUP:
                    srv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(requests), ops[name]["GETATTR"][2])
                best[op, name] = min(best.get((op, name), t), t)
    print(f"per request, in process (best of {rounds} rounds of {requests}; median us):")
    print(f"{'':<10}" + "".join(f"{name:>22}" for name in variants))
    for op in ("GETATTR", "LOOKUP", "READ 4k"):
        alone = best[op, "alone"]
        cells = [f"{alone * 1e6:>22.2f}"]
        for name in list(variants)[1:]:
            t = best[op, name]
            cells.append(f"{t * 1e6:>13.2f} ({100 * (t / alone - 1):+5.1f}%)")
        print(f"{op:<10}" + "".join(cells))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def churn(tmp: str, cycles: int, mounts: int) -> None:
    base = Path(tmp, "base")
    base.mkdir()
    dirs = []
    for i in range(mounts):
        d = Path(tmp, f"fs{i}")
        d.mkdir()
        (d / "file").write_text(str(i))
        dirs.append(d)
    sock, api = os.path.join(tmp, "vfs.sock"), os.path.join(tmp, "api.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "vhostfs", "--socket-path", sock, "--mount",
                               f"/base={base}", "--api-socket", api, "--log-level", "error",
                               "--max-mounts", str(mounts + 1)])
    stop = threading.Event()
    done = [0]
    try:
        while not (os.path.exists(sock) and os.path.exists(api)):
            time.sleep(0.05)
        with Frontend.connect(sock) as fe:
            fe.setup(queues=2, num=1024)
            client = FuseClient(fe)
            client.init()
            root = client.lookup(1, b"base")[0]

            def workload() -> None:
                i = 0
                while not stop.is_set():
                    name = f"f{i % 50}".encode()
                    (nodeid, *_), (fh, _) = client.create(root, name)
                    client.release(nodeid, fh)
                    client.getattr(nodeid)
                    client.lookup(root, name)
                    client.unlink(root, name)
                    client.forget(nodeid, 2)
                    i += 1
                    done[0] += 1

            worker = threading.Thread(target=workload, daemon=True)
            worker.start()
            time.sleep(1)
            print(f"\nmount/unmount {mounts} file systems under a metadata workload ({cycles} cycles):")
            print(f"{'':<14}{'RSS KiB':>10}{'fds':>6}")
            start_rss = _rss_kib(daemon.pid)
            print(f"{'start':<14}{start_rss:>10}{len(os.listdir(f'/proc/{daemon.pid}/fd')):>6}")
            began = time.monotonic()
            for cycle in range(cycles):
                t = time.perf_counter()
                _mount_all(api, dirs)
                mounted = time.perf_counter() - t
                peak = _rss_kib(daemon.pid), len(os.listdir(f"/proc/{daemon.pid}/fd"))
                t = time.perf_counter()
                _umount_all(api, mounts)
                unmounted = time.perf_counter() - t
                time.sleep(0.3)
                print(f"{'cycle ' + str(cycle + 1) + ' peak':<14}{peak[0]:>10}{peak[1]:>6}")
                print(f"{'cycle ' + str(cycle + 1) + ' end':<14}{_rss_kib(daemon.pid):>10}"
                      f"{len(os.listdir(f'/proc/{daemon.pid}/fd')):>6}   "
                      f"(mount {1e3 * mounted / mounts:.1f} ms, "
                      f"umount {1e3 * unmounted / mounts:.1f} ms each)")
            churned = time.monotonic() - began
            churn_rss = _rss_kib(daemon.pid)
            rounds = done[0]
            # The same time with the workload alone: how much of the growth is the workload's own.
            time.sleep(churned)
            alone_rss = _rss_kib(daemon.pid)
            stop.set()
            worker.join(10)
            print(f"workload: {rounds} create/getattr/lookup/unlink rounds alongside; RSS grew "
                  f"{churn_rss - start_rss} KiB in {churned:.1f} s with the mounts, then "
                  f"{alone_rss - churn_rss} KiB in as long with the workload alone")
    finally:
        stop.set()
        daemon.terminate()
        daemon.wait(30)


def _mount_all(api: str, dirs: list[Path]) -> None:
    for i, d in enumerate(dirs):
        fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
        try:
            status, answer = control.request(api, "PUT", {"mountpoint": f"/m/{i}"}, fds=[fd])
        finally:
            os.close(fd)
        assert status == 201, answer


def _umount_all(api: str, count: int) -> None:
    for i in range(count):
        status, answer = control.request(api, "DELETE", {"mountpoint": f"/m/{i}"})
        assert status == 204, answer


GUEST_WORKLOAD = """
touch /mnt/base/started
n=0
while [ ! -e /mnt/base/stop ]; do
    cd /mnt/base
    mkdir d && touch d/f && stat d/f >/dev/null && mv d/f d/g && rm d/g && rmdir d
    ls /mnt /mnt/m >/dev/null 2>&1
    n=$((n + 1))
done
echo "ROUNDS $n"
"""


def churn_with_guest(tmp: str, cycles: int, mounts: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.e2e.guest import boot_guest

    base = Path(tmp, "guest-base")
    base.mkdir()
    dirs = []
    for i in range(mounts):
        d = Path(tmp, f"g{i}")
        d.mkdir()
        dirs.append(d)
    api = os.path.join(tmp, "guest-api.sock")
    rows: list[str] = []

    def host(pid: int) -> None:
        try:
            deadline = time.monotonic() + 600
            while not (base / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            rows.append(f"{'start':<14}{_rss_kib(pid):>10}{len(os.listdir(f'/proc/{pid}/fd')):>6}")
            for cycle in range(cycles):
                _mount_all(api, dirs)
                peak = _rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))
                _umount_all(api, mounts)
                time.sleep(0.5)
                rows.append(f"{'cycle ' + str(cycle + 1) + ' peak':<14}{peak[0]:>10}{peak[1]:>6}")
                rows.append(f"{'cycle ' + str(cycle + 1) + ' end':<14}{_rss_kib(pid):>10}"
                            f"{len(os.listdir(f'/proc/{pid}/fd')):>6}")
        finally:
            (base / "stop").touch()

    threads: list[threading.Thread] = []

    def started(pid: int) -> None:
        threads.append(threading.Thread(target=host, args=(pid,), daemon=True))
        threads[0].start()

    daemon = [sys.executable, "-m", "vhostfs", "--socket-path", "{sock}", "--mount", "/base={dir}",
              "--api-socket", api, "--log-level", "error", "--max-mounts", str(mounts + 1)]
    result = boot_guest(GUEST_WORKLOAD, base, daemon, timeout=1200, daemon_started=started)
    for t in threads:
        t.join(30)
    print(f"\nmount/unmount {mounts} file systems while a guest runs a metadata workload ({cycles} cycles):")
    print(f"{'':<14}{'RSS KiB':>10}{'fds':>6}")
    print("\n".join(rows))
    rounds = " ".join(result.lines_starting("ROUNDS ")) or "?"
    print(f"guest: {rounds} rounds, exit status {result.exit_status}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--mounts", type=int, default=100)
    ap.add_argument("--guest", action="store_true", help="the metadata workload in a real guest (QEMU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        with open(os.path.join(share, "data"), "wb") as f:
            f.write(os.urandom(1 << 20))
        per_request(share, args.requests, args.rounds)
        churn(tmp, args.cycles, args.mounts)
        if args.guest:
            churn_with_guest(tmp, args.cycles, args.mounts)


if __name__ == "__main__":
    main()
