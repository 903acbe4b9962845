"""A guest doing two things at once: fio with two jobs and two metadata loops side by side.

A guest with 2 vCPUs runs each workload with one worker, then with two at once:

- fio (psync, O_DIRECT) random 4 KiB reads and writes and sequential 1 MiB reads of one file, with
  `--numjobs` 1 and 2 (figures: the jobs' sum);
- `metaloop` (benchmarks/guest_metaloop.c) in a directory of its own: create, stat, open and
  close, rename and unlink of `--files` files, one loop, then two at once (figures: the loops' sum).

vhostfs serves the guest's virtio-fs device with `num-request-queues=2`, so that each vCPU's requests
go to a queue and a worker thread of their own (the Linux 6.12 guest of the debian13 stack spreads
them so; the 6.1 guest of debian12 puts every request on the first queue). With `--virtiofsd PATH`
the Rust virtiofsd, which serves one request queue, runs the same guest with one; the back ends
alternate, `--rounds` times, and each figure is the median with its spread (min-max over the
median). The "x2" column is what the second worker added: two workers' figure over one's.

TCG emulates the guest and the machine may have few cores: the figures compare the back ends on
this machine, not the speeds a KVM guest would see.

    python benchmarks/parallel_guest.py [--stack debian13] [--virtiofsd PATH] [--rounds 2]
                                        [--runtime 8] [--files 2000] [--daemon-args ARGS]
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.e2e.guest import boot_guest, daemon_command, static_program  # noqa: E402

FIGURES = (  # (name, unit), in the order the guest prints them
    ("randread_4k", "IOPS"), ("randwrite_4k", "IOPS"), ("seqread_1M", "KiB/s"),
    ("create", "ops/s"), ("stat", "ops/s"), ("open_close", "ops/s"), ("rename", "ops/s"),
    ("unlink", "ops/s"),
)

# Terse v3 fields (1-based, as cut counts them): 7 read KiB/s, 8 read IOPS, 49 write IOPS.
GUEST = r"""
set -u
command -v fio >/dev/null || {{ echo "PARALLEL-FAILED no fio in the guest"; exit 1; }}
FIO="fio --output-format=terse --terse-version=3 --ioengine=psync --direct=1 --group_reporting"
$FIO --name=layout --rw=write --bs=1M --size={size}M --filename=f.dat >/dev/null 2>&1 ||
    {{ echo "PARALLEL-FAILED fio layout"; exit 1; }}
for jobs in 1 2; do
    for spec in "randread_4k randread 4k 8" "randwrite_4k randwrite 4k 49" "seqread_1M read 1M 7"; do
        set -- $spec
        r=$($FIO --name=$1 --rw=$2 --bs=$3 --size={size}M --filename=f.dat --numjobs=$jobs \
            --time_based --runtime={runtime} 2>/dev/null) || {{ echo "PARALLEL-FAILED fio $1"; exit 1; }}
        echo "FIGURE $jobs $1 $(echo "$r" | cut -d';' -f$4)"
    done
    i=1
    while [ $i -le $jobs ]; do /metaloop m$i {files} > /tmp/meta.$i & i=$((i + 1)); done
    wait
    for phase in create stat open_close rename unlink; do
        sum=0; i=1
        while [ $i -le $jobs ]; do
            v=$(sed -n "s/^META $phase //p" /tmp/meta.$i)
            [ -n "$v" ] || {{ echo "PARALLEL-FAILED metaloop $i $phase"; cat /tmp/meta.$i; exit 1; }}
            sum=$((sum + v)); i=$((i + 1))
        done
        echo "FIGURE $jobs $phase $sum"
    done
done
rm -f f.dat
echo PARALLEL-DONE
"""

_FIGURE = re.compile(r"^FIGURE ([12]) (\S+) (\d+)\s*$", re.MULTILINE)


def run(name: str, daemon: list[str], queues: int, helper: bytes, args: argparse.Namespace) -> dict:
    """One boot: {(jobs, figure): value}."""
    script = GUEST.format(size=args.size_mib, runtime=args.runtime, files=args.files)
    with tempfile.TemporaryDirectory(prefix="vhostfs-bench-share-") as share:
        result = boot_guest(script, share, daemon, mem=2048, smp=2, num_request_queues=queues,
                            stack=args.stack, files={"metaloop": helper}, timeout=1800)
    failed = re.search(r"^PARALLEL-FAILED.*$", result.console_output, re.MULTILINE)
    if failed or result.exit_status != 0 or "PARALLEL-DONE" not in result.console_output:
        why = failed.group(0) if failed else f"guest exit status {result.exit_status}"
        raise SystemExit(f"{name}: {why}\n{result.console_output[-3000:]}\n{result.daemon_log[-2000:]}")
    return {(int(jobs), fig): float(value) for jobs, fig, value in _FIGURE.findall(result.console_output)}


def _median(runs: list[dict], key: tuple[int, str]) -> tuple[float, str]:
    values = [r[key] for r in runs if key in r]
    if not values:
        return float("nan"), "-"
    mid = statistics.median(values)
    return mid, f"{min(values) / mid:.2f}-{max(values) / mid:.2f}" if mid else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="debian13", choices=("debian12", "debian13", "forky"))
    parser.add_argument("--virtiofsd", help="also run the Rust virtiofsd at this path (one request queue)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=8, help="seconds each fio run lasts")
    parser.add_argument("--files", type=int, default=2000, help="files each metadata loop works on")
    parser.add_argument("--size-mib", type=int, default=256, help="size of the file fio works on")
    parser.add_argument("--daemon-args", default="", help="more vhostfs options, e.g. '--poll-us 0'")
    args = parser.parse_args()
    helper = static_program("metaloop", (REPO / "benchmarks" / "guest_metaloop.c").read_text())
    backends = [("vhostfs", daemon_command() + shlex.split(args.daemon_args), 2)]
    if args.virtiofsd:
        backends.append(("virtiofsd", [args.virtiofsd, "--socket-path={sock}", "--shared-dir={dir}"], 1))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in backends}
    for i in range(args.rounds):
        # Alternating who goes first, so that neither gains from its position.
        for name, daemon, queues in backends if i % 2 == 0 else backends[::-1]:
            runs[name].append(run(name, daemon, queues, helper, args))
            print(f"round {i + 1}: {name} done", flush=True)
    header = f"{'figure':<14}{'unit':<7}"
    for name, _, queues in backends:
        label = f"{name} ({queues}q)"
        header += f"{label + ' 1 job':>22}{'2 jobs':>10}{'spread':>11}{'x2':>6}"
    if args.virtiofsd:
        header += f"{'ratio 2 jobs':>14}"
    print(header)
    for fig, unit in FIGURES:
        line = f"{fig:<14}{unit:<7}"
        two = []
        for name, _, _ in backends:
            one, _ = _median(runs[name], (1, fig))
            both, spread = _median(runs[name], (2, fig))
            two.append(both)
            line += f"{one:>22.0f}{both:>10.0f}{spread:>11}{both / one if one else float('nan'):>6.2f}"
        if args.virtiofsd:
            line += f"{two[0] / two[1] if two[1] else float('nan'):>14.2f}"
        print(line)


if __name__ == "__main__":
    main()
