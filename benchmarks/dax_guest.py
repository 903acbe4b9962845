"""A guest's reads with and without DAX, side by side in one QEMU 11.1 guest (the "forky" stack).

One guest gets two virtio-fs devices on the same host directory, each served by its own vhostfs: one
with a DAX window (QEMU 11.1's generic vhost-user device, mounted dax=always on /mnt) and one
without (vhost-user-fs-pci, mounted on /nodax, --cache always so that the guest's page cache holds
what it read across opens). The same workloads run on both, on a working set of
files written on the host:

- sequential and random reads of cached files (fio, psync): a first pass warms the guest's page
  cache (no DAX) or maps the files into the window (DAX), the measured pass follows;
- an mmap workload (fio's mmap engine, random 4 KiB reads of the mapped files);
- the guest's page cache ("Cached" in /proc/meminfo) after reading the working set once, from empty
  caches: with DAX the file pages stay on the host and the guest caches none of them.

TCG runs the guest, so the figures compare the two paths on this machine and say nothing of KVM
speeds; the measured runs alternate between the two and the median is shown, with the spread, as
the figures vary from run to run on a busy machine. The working set (256 MiB by default) is smaller
than the 1 GiB one might want: the guest needs memory for it in its page cache on the mount without
DAX, and a window of 1 GiB would take more of QEMU's memory slots than vhostfs announces (one per
2 MiB mapping).

    python benchmarks/dax_guest.py [--working-set-mib 256] [--window-mib 512] [--mem-mib 1536]
                                   [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.e2e.guest import build_guest, cpio_archive  # noqa: E402

FILES = 4

GUEST = r"""
set -u
mkdir -p /nodax
mount -t virtiofs nodax /nodax || echo "NODAX-MOUNT-FAILED"
grep -q 'dax=always' /proc/mounts || echo "DAX-MOUNT-MISSING"
ws=$(ls /mnt/ws-*.bin)
fio_run() {{  # name dir rw engine bs runtime
    fio --name="$1" --directory="$2" --filename_format='ws-$filenum.bin' --nrfiles={files} \
        --filesize={file_mib}M --rw="$3" --ioengine="$4" --bs="$5" --time_based --runtime="$6" \
        --invalidate=0 --file_service_type=random --output-format=terse --terse-version=3 |
        awk -F';' -v n="$1" '{{ printf "RESULT %s %s %s\n", n, $7, $8 }}'
}}
for mode in dax nodax; do
    dir=/mnt; [ $mode = nodax ] && dir=/nodax
    sync; echo 3 > /proc/sys/vm/drop_caches
    before=$(awk '/^Cached:/ {{ print $2 }}' /proc/meminfo)
    for f in $ws; do cat "$dir/${{f##*/}}" > /dev/null; done
    after=$(awk '/^Cached:/ {{ print $2 }}' /proc/meminfo)
    echo "RESULT $mode-pagecache $((after - before)) 0"
    fio_run $mode-warm $dir read psync 1M {runtime} > /dev/null
done
# The two modes take turns, so that a change in the machine's load falls on both.
for round in $(seq {repeat}); do
    for mode in dax nodax; do
        dir=/mnt; [ $mode = nodax ] && dir=/nodax
        fio_run $mode-seqread $dir read psync 1M {runtime}
        fio_run $mode-randread $dir randread psync 4k {runtime}
        fio_run $mode-mmap $dir randread mmap 4k {runtime}
    done
done
"""


def _daemon(sock: Path, share: Path, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vhostfs", "--socket-path", str(sock), "--shared-dir", str(share), *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not sock.is_socket():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vhostfs did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--working-set-mib", type=int, default=256)
    p.add_argument("--window-mib", type=int, default=512)
    p.add_argument("--mem-mib", type=int, default=1536)
    p.add_argument("--runtime", type=int, default=5, help="seconds per measured fio run")
    p.add_argument("--repeat", type=int, default=3, help="measured runs of each workload (median shown)")
    args = p.parse_args()
    file_mib = args.working_set_mib // FILES
    images = build_guest("forky")
    kernel, initrd, qemu = str(images.kernel), images.initrd, images.qemu
    with tempfile.TemporaryDirectory(prefix="vhostfs-dax-bench-") as tmp:
        run = Path(tmp)
        share = run / "share"
        share.mkdir()
        for i in range(FILES):
            with open(share / f"ws-{i}.bin", "wb") as f:
                for _ in range(file_mib):
                    f.write(os.urandom(1 << 20))
        script = GUEST.format(files=FILES, file_mib=file_mib, runtime=args.runtime, repeat=args.repeat)
        workload = cpio_archive({"cmd.sh": script.encode()})
        (run / "initrd.img").write_bytes(Path(initrd).read_bytes() + workload)
        dax = _daemon(run / "dax.sock", share, run / "dax.log", "--tag", "vhostfs", "--dax-window-size",
                      f"{args.window_mib}M")
        # --cache always keeps the guest's page cache across opens (FOPEN_KEEP_CACHE): without it every
        # open drops the cached pages, and "cached" reads would go to the daemon.
        nodax = _daemon(run / "nodax.sock", share, run / "nodax.log", "--cache", "always")
        try:
            mem = args.mem_mib
            cmd = [
                qemu, "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", str(mem),
                "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on", "-numa", "node,memdev=mem",
                "-kernel", kernel, "-initrd", str(run / "initrd.img"),
                "-append", "console=ttyS0 quiet panic=-1 vhostfs.tag=vhostfs vhostfs.opts=dax=always",
                "-chardev", f"socket,id=dax,path={run / 'dax.sock'}",
                "-device", "vhost-user-test-device-pci,chardev=dax,virtio-id=26,num_vqs=2,config_size=40,"
                "vq_size=1024",
                "-chardev", f"socket,id=nodax,path={run / 'nodax.sock'}",
                "-device", "vhost-user-fs-pci,chardev=nodax,tag=nodax,queue-size=1024",
                "-serial", "stdio", "-monitor", "none", "-display", "none", "-vga", "none", "-net", "none",
                "-no-reboot",
            ]  # fmt: skip
            console = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                     timeout=1800).stdout.replace("\r", "")
        finally:
            for proc in (dax, nodax):
                proc.terminate()
                proc.wait(timeout=20)
    results: dict[str, list[tuple[int, int]]] = {}
    for m in re.finditer(r"^RESULT (\S+) (\d+) (\d+)$", console, re.MULTILINE):
        results.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
    problems = [w for w in ("NODAX-MOUNT-FAILED", "DAX-MOUNT-MISSING") if w in console]
    measured = [f"{mode}-{name}" for mode in ("dax", "nodax") for name in ("seqread", "randread", "mmap")]
    if problems or any(len(results.get(k, ())) != args.repeat for k in measured):
        print(console[-4000:])
        raise SystemExit(f"the guest run did not complete: {problems or sorted(results)}")
    print(f"working set: {FILES} files of {file_mib} MiB ({args.working_set_mib} MiB); DAX window "
          f"{args.window_mib} MiB; guest memory {args.mem_mib} MiB; QEMU 11.1 TCG, Linux 7.2, 2 vCPUs; "
          f"median of {args.repeat} runs of {args.runtime} s (min-max)")
    print(f"{'workload':<34}{'without DAX':>22}{'with DAX':>22}{'DAX / no DAX':>14}")
    rows = [("sequential read, 1 MiB (MiB/s)", "seqread", 0, 1024),
            ("random read, 4 KiB (IOPS)", "randread", 1, 1),
            ("mmap random read, 4 KiB (IOPS)", "mmap", 1, 1)]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    for label, name, field, scale in rows:
        without = [r[field] / scale for r in results[f"nodax-{name}"]]
        with_ = [r[field] / scale for r in results[f"dax-{name}"]]
        ratio = statistics.median(with_) / statistics.median(without)
        print(f"{label:<34}{cell(without):>22}{cell(with_):>22}{ratio:>13.2f}x")
    without_mib, with_mib = results["nodax-pagecache"][0][0] / 1024, results["dax-pagecache"][0][0] / 1024
    print(f"{'page cache after one read (MiB)':<34}{without_mib:>22.1f}{with_mib:>22.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
