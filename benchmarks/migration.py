"""Live migration of a guest that knows many inodes and holds many files open: downtime and state size.

Builds a share of `--inodes` files (in directories of 1000), boots the debian13 stack's guest (QEMU
10) with the back end, has the guest stat every file (so that it knows them all) and hold `--open`
of them open (benchmarks/guest_holdopen.c, built static with gcc), migrates it to a second QEMU with
a second back end on the same share, and prints the downtime and total time QEMU reports, with the
size of the back end's state (vhostfs logs it). `--virtiofsd PATH` runs the same with the Rust
virtiofsd for comparison (its state size is not reported). `--file-handles` runs both back ends
with `--inode-file-handles=prefer`, so that more inodes than RLIMIT_NOFILE allows fds fit. Not a
test: run it on a quiet machine.

    python benchmarks/migration.py [--inodes 100000] [--open 1000] [--virtiofsd PATH] [--file-handles]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.guest import build_guest, static_program  # noqa: E402
from tests.e2e.migration import Vm  # noqa: E402

SCRIPT = """
ulimit -n 65536
find /mnt/tree -type f | wc -l | sed 's/^/KNOWN /'
/holdopen /mnt/tree {open} /mnt/.go
echo BENCH-END
"""


def _share(root: Path, inodes: int) -> None:
    tree = root / "tree"
    for i in range(inodes):
        d = tree / f"d{i // 1000}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(b"x")


def run(name: str, images, share: Path, helper: bytes, open_files: int, daemon: list[str] | None,
        daemon_args: list[str]) -> dict:
    (share / ".go").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"vhostfs-bench-{name}-") as tmp:
        run_dir = Path(tmp)
        script = SCRIPT.format(open=open_files)
        src = Vm("src", run_dir, images.qemu, images, share, script, {"holdopen": helper}, daemon_args,
                 mem=1024, daemon=daemon)
        dst = None
        try:
            src.wait_console("HOLDOPEN-READY", 3600)
            uri = f"unix:{run_dir}/mig.sock"
            dst = Vm("dst", run_dir, images.qemu, images, share, script, {}, daemon_args, mem=1024,
                     daemon=daemon, incoming=uri)
            info = src.migrate(uri, timeout=3600)
            if info.get("status") != "completed":
                raise SystemExit(f"{name}: migration {info.get('status')}:\n{src.describe()}\n"
                                 f"{dst.describe()}")
            src.qmp.command("quit")
            src.wait_exit(60)
            (share / ".go").write_text("")
            dst.wait_console("BENCH-END", 300)
            console = src.console()
            known = re.search(r"KNOWN (\d+)", console)
            held = re.search(r"HOLDOPEN-READY (\d+)", console)
            done = re.search(r"HOLDOPEN-DONE (\d+)", dst.console())
            saved = re.search(r"device state saved: (\d+) bytes in ([\d.]+) ms", src.daemon_log.read_text())
            loaded = re.search(r"device state loaded: (\d+) bytes in ([\d.]+) ms", dst.daemon_log.read_text())
            return {
                "back end": name, "inodes known": known and known.group(1), "open": held and held.group(1),
                "readable after": done and done.group(1), "downtime ms": info.get("downtime"),
                "total ms": info.get("total-time"),
                "state bytes": saved.group(1) if saved else "n/a",
                "save ms": saved.group(2) if saved else "n/a",
                "load ms": loaded.group(2) if loaded else "n/a",
            }
        finally:
            src.stop()
            if dst is not None:
                dst.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inodes", type=int, default=100_000)
    parser.add_argument("--open", type=int, default=1000)
    parser.add_argument("--virtiofsd", help="also run the Rust virtiofsd at this path")
    parser.add_argument("--file-handles", action="store_true",
                        help="both back ends hold inodes by file handles (--inode-file-handles=prefer)")
    parser.add_argument("--migration-mode", choices=("find-paths", "file-handles"), default="find-paths",
                        help="passed to both back ends (default: find-paths, as theirs)")
    args = parser.parse_args()
    daemon_args = ["--inode-file-handles=prefer"] if args.file_handles else []
    daemon_args.append(f"--migration-mode={args.migration_mode}")
    images = build_guest("debian13")
    with tempfile.TemporaryDirectory(prefix="vhostfs-bench-share-") as tmp:
        share = Path(tmp)
        start = time.monotonic()
        _share(share, args.inodes)
        print(f"share of {args.inodes} files made in {time.monotonic() - start:.1f} s", flush=True)
        helper = static_program("holdopen", (REPO / "benchmarks" / "guest_holdopen.c").read_text())
        backends = [("vhostfs", None)] + ([("virtiofsd", [args.virtiofsd])] if args.virtiofsd else [])
        for name, daemon in backends:
            try:
                row = run(name, images, share, helper, args.open, daemon, daemon_args)
            except (AssertionError, SystemExit) as exc:
                print(f"{name}: failed: {str(exc).splitlines()[0]}", flush=True)
                continue
            print("  ".join(f"{key}={value}" for key, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
