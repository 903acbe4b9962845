"""Load with data verification: a guest hammers the share for a while and nothing is lost or leaked.

In the guest, at the same time and for $VHOSTFS_LOAD_SECONDS (default 60; the long run in the README
sets minutes):
- fio, in passes: writers that fill their own file at random offsets and read back what they wrote
  (crc32c verify, during the pass and over the whole file at its end), and readers that read a file
  laid out once, verifying every block. O_DIRECT everywhere, so that each read is answered by the
  daemon rather than by the guest's page cache;
- a metadata storm: several shell processes, each in its own directory, creating, renaming and
  deleting files in rounds, reading back every file it kept (its contents) before deleting it a few
  rounds later, and checking at the end that exactly the files of the last rounds exist. The host
  then checks those files too.
A host thread samples the daemon's memory and open fds: once after the mount, before the load (the guest
creates a marker file in the share and pauses), and once after it (the guest has dropped its caches,
so that the FORGETs release the daemon's inode fds, then creates a second marker and pauses).

The figures (operations, errors, RSS and fds before/after) are printed (pytest -s) and are part of
every failure message.
"""

import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .guest import DEFAULT_DAEMON, GuestImages, GuestResult, boot_guest, daemon_command, skip_unless_ci

LOAD_SECONDS = int(os.environ.get("VHOSTFS_LOAD_SECONDS", "60"))

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(LOAD_SECONDS + 900)]

FIO_JOBS = 3  # writers, each on its own file
FIO_READERS = 2  # readers of the shared, once laid out file
FIO_SIZE_MIB = 16  # per file
STORM_PROCS = 4
STORM_BATCH = 60  # files created (and renamed) per storm round; half of them are then deleted
STORM_KEEP = 8  # rounds for which the other half is kept

# Markers the guest creates in the share; the host samples the daemon when it sees them.
BEFORE_MARKER = ".load-before"
AFTER_MARKER = ".load-after"
SAMPLE_INTERVAL = 0.2

# Open fds may differ by a few at the end: the marker files' inodes, and the guest may keep an
# inode or two it had not yet forgotten (FORGET is a hint the guest sends when it pleases).
FD_MARGIN = 8
# The daemon's own memory is its RssAnon: its VmRSS also counts the pages of guest RAM it has touched
# through the shared mapping of the guest's memory (RssShmem), which grows with every new buffer the
# guest hands it, up to the guest's RAM size, and is not the daemon's to free.
# RssAnon after the load may exceed RssAnon before it by this much. Some growth is legitimate and does
# not depend on how long the load runs: CPython's allocator keeps the arenas it filled at the peak
# (about a thousand inodes known to the guest at once, requests in flight on every thread), and
# pages of thread stacks touched for the first time; it is well under 1 MiB here. A leak grows with
# the number of operations instead: the default duration's ~10^5 requests (fio's 4 KiB I/Os and the
# storm's) would need to leak ~80 bytes each to pass this bound, and the long run's tenfold less.
ANON_MARGIN_KIB = 8 * 1024

GUEST_SCRIPT = r"""
set -u
fail() { echo "LOAD-FAIL $*"; exit 1; }
command -v fio >/dev/null || fail "no fio in the guest (install fio on the host and rebuild it)"
deadline=$(( $(date +%s) + LOAD_SECONDS ))

# The baseline: the guest caches nothing of the share yet, and the daemon has seen the mount.
sync; echo 3 >/proc/sys/vm/drop_caches
: >"$BEFORE_MARKER"
sleep 3

fio_common="--ioengine=psync --direct=1 --bs=4k --verify=crc32c --verify_fatal=1 --verify_state_save=0"
fio_common="$fio_common --output-format=terse --terse-version=3"

# fio in passes until the deadline. Terse fields: 5 error, 6 read KiB, 47 write KiB (terse v3).
fio_load() {
    mkdir -p fio || fail "mkdir fio"
    fio $fio_common --name=layout --directory=fio --filename=readers.dat --size="${FIO_SIZE_MIB}M" \
        --rw=write --do_verify=0 >/tmp/fio-layout.out 2>&1 || { cat /tmp/fio-layout.out; fail "fio layout"; }
    pass=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        pass=$((pass + 1))
        fio $fio_common --directory=fio --size="${FIO_SIZE_MIB}M" \
            --name=writer --rw=randwrite --numjobs="$FIO_JOBS" --verify_backlog=256 --do_verify=1 \
            --name=reader --filename=readers.dat --rw=randread --numjobs="$FIO_READERS" \
            >/tmp/fio.out 2>&1
        rc=$?
        awk -F';' -v pass="$pass" -v rc="$rc" '
            $1 == 3 { jobs++; err += ($5 != 0); rk += $6; wk += $47 }
            END { printf "LOAD-FIO pass=%d rc=%d jobs=%d job_errors=%d read_kib=%d write_kib=%d\n",
                  pass, rc, jobs, err, rk, wk }' /tmp/fio.out
        # Anything that is not a terse line is fio talking: a verify failure, an I/O error.
        grep -v '^3;' /tmp/fio.out | sed 's/^/fio: /'
        [ "$rc" -eq 0 ] || return 1
    done
}

# One storm process, in rounds until the deadline: STORM_BATCH creates, as many renames, half as many
# deletes; the other half is kept for STORM_KEEP rounds, then read back (contents checked) and
# deleted. So every kept file is checked once, and what the guest and the daemon hold at once stays
# the same however long the load runs. At the end, the last rounds' files must be there, and nothing
# else.
storm() {
    id=$1 ops=0 errors=0 missing=0 wrong=0 round=0
    mkdir "storm-$id" && cd "storm-$id" || fail "mkdir storm-$id"
    # check_kept R: reads round R's kept files; delete=1 also deletes them.
    check_kept() {
        i=0
        while [ "$i" -lt "$STORM_BATCH" ]; do
            if [ -e "kept-$1-$i" ]; then
                read -r line <"kept-$1-$i"
                [ "$line" = "$id $1 $i" ] || wrong=$((wrong + 1))
                if [ "$delete" = 1 ]; then
                    rm "kept-$1-$i" || errors=$((errors + 1))
                    ops=$((ops + 1))
                fi
            else
                missing=$((missing + 1))
            fi
            i=$((i + 2))
        done
    }
    while [ "$(date +%s)" -lt "$deadline" ]; do
        round=$((round + 1))
        i=0
        while [ "$i" -lt "$STORM_BATCH" ]; do
            echo "$id $round $i" >"new-$round-$i" || errors=$((errors + 1))
            i=$((i + 1))
        done
        i=0
        while [ "$i" -lt "$STORM_BATCH" ]; do
            mv "new-$round-$i" "kept-$round-$i" || errors=$((errors + 1))
            i=$((i + 1))
        done
        i=1
        while [ "$i" -lt "$STORM_BATCH" ]; do
            rm "kept-$round-$i" || errors=$((errors + 1))
            i=$((i + 2))
        done
        ops=$((ops + STORM_BATCH * 2 + STORM_BATCH / 2))
        delete=1
        [ "$round" -le "$STORM_KEEP" ] || check_kept $((round - STORM_KEEP))
    done
    delete=0 first=$((round > STORM_KEEP ? round - STORM_KEEP + 1 : 1)) r=$first
    while [ "$r" -le "$round" ]; do
        check_kept "$r"
        r=$((r + 1))
    done
    present=$(ls | wc -l)
    echo "LOAD-STORM id=$id rounds=$round ops=$ops errors=$errors missing=$missing wrong=$wrong" \
        "present=$present expected=$(((round - first + 1) * ((STORM_BATCH + 1) / 2)))"
}

fio_load &
pids=$!
p=1
while [ "$p" -le "$STORM_PROCS" ]; do
    storm "$p" &
    pids="$pids $!"
    p=$((p + 1))
done
status=0
for pid in $pids; do
    wait "$pid" || status=1
done

# The end: the guest forgets what it cached, so the daemon may close those inodes' fds.
sync; echo 3 >/proc/sys/vm/drop_caches
sleep 2
: >"$AFTER_MARKER"
sleep 3
echo "LOAD-DONE status=$status"
exit "$status"
"""


@dataclass
class Sample:
    rss_kib: int  # VmRSS
    anon_kib: int  # RssAnon
    fds: int


def _sample(pid: int) -> Sample | None:
    """The daemon's VmRSS, RssAnon and open fd count, or None once it has exited (a zombie has none)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    anon = re.search(r"^RssAnon:\s+(\d+) kB$", status, re.MULTILINE)
    return Sample(int(rss.group(1)), int(anon.group(1)), fds) if rss and anon else None


@dataclass
class DaemonWatch:
    """Samples the daemon when the guest's marker files appear in the share, and the peak in between."""

    share: Path
    before: Sample | None = None
    after: Sample | None = None
    peak_rss_kib: int = 0
    peak_anon_kib: int = 0
    peak_fds: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, pid: int) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            sample = _sample(pid)
            if sample is None:
                return
            if self.before is None:
                if (self.share / BEFORE_MARKER).exists():
                    self.before = sample
                continue
            self.peak_rss_kib = max(self.peak_rss_kib, sample.rss_kib)
            self.peak_anon_kib = max(self.peak_anon_kib, sample.anon_kib)
            self.peak_fds = max(self.peak_fds, sample.fds)
            if self.after is None and (self.share / AFTER_MARKER).exists():
                self.after = sample


@dataclass
class Figures:
    fio_passes: int = 0
    fio_read_kib: int = 0
    fio_write_kib: int = 0
    fio_errors: int = 0
    storm_ops: int = 0
    storm_errors: int = 0
    storm_missing: int = 0
    storm_files_kept: int = 0

    def table(self, watch: DaemonWatch, seconds: int) -> str:
        def fmt(sample: Sample | None, attr: str) -> str:
            return "-" if sample is None else str(getattr(sample, attr))

        rows = [
            ("load seconds", str(seconds)),
            ("fio passes", str(self.fio_passes)),
            ("fio read MiB (verified)", f"{self.fio_read_kib / 1024:.0f}"),
            ("fio written MiB", f"{self.fio_write_kib / 1024:.0f}"),
            ("fio errors (failed passes, job errors)", str(self.fio_errors)),
            ("storm ops (create, rename, delete)", str(self.storm_ops)),
            ("storm errors", str(self.storm_errors)),
            ("storm files lost or wrong", str(self.storm_missing)),
            ("storm files kept", str(self.storm_files_kept)),
            ("daemon RSS KiB before / peak / after",
             f"{fmt(watch.before, 'rss_kib')} / {watch.peak_rss_kib} / {fmt(watch.after, 'rss_kib')}"),
            ("daemon RssAnon KiB before / peak / after",
             f"{fmt(watch.before, 'anon_kib')} / {watch.peak_anon_kib} / {fmt(watch.after, 'anon_kib')}"),
            ("daemon fds before / peak / after",
             f"{fmt(watch.before, 'fds')} / {watch.peak_fds} / {fmt(watch.after, 'fds')}"),
        ]  # fmt: skip
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _fields(line: str) -> dict[str, int]:
    return {key: int(value) for key, value in (word.split("=") for word in line.split())}


def _daemon_args() -> tuple[list[str], int]:
    """The daemon command and the number of request queues to give the guest."""
    cmd = daemon_command()
    if cmd == DEFAULT_DAEMON:
        # Several threads per queue: concurrent requests of the guest's processes are served at once.
        return [*cmd, "--thread-pool-size", "4"], 2
    # Other daemons (virtiofsd) are run as given, with the one queue they all serve.
    return cmd, 1


def test_load_with_verification(guest_images: GuestImages, tmp_path: Path) -> None:
    if not shutil.which("fio"):
        message = "fio is not installed on the host, so build-guest.sh put none in the guest (apt: fio)"
        skip_unless_ci(message)
    settings = {
        "LOAD_SECONDS": LOAD_SECONDS,
        "FIO_JOBS": FIO_JOBS,
        "FIO_READERS": FIO_READERS,
        "FIO_SIZE_MIB": FIO_SIZE_MIB,
        "STORM_PROCS": STORM_PROCS,
        "STORM_BATCH": STORM_BATCH,
        "STORM_KEEP": STORM_KEEP,
        "BEFORE_MARKER": BEFORE_MARKER,
        "AFTER_MARKER": AFTER_MARKER,
    }
    script = "".join(f"{name}={value}\n" for name, value in settings.items()) + GUEST_SCRIPT
    daemon, queues = _daemon_args()
    watch = DaemonWatch(tmp_path)
    try:
        result = boot_guest(
            script, tmp_path, daemon, num_request_queues=queues, timeout=LOAD_SECONDS + 600,
            daemon_started=watch.start,
        )  # fmt: skip
    finally:
        watch.stop()

    figures = Figures()
    for line in result.lines_starting("LOAD-FIO "):
        values = _fields(line)
        figures.fio_passes += 1
        figures.fio_read_kib += values["read_kib"]
        figures.fio_write_kib += values["write_kib"]
        figures.fio_errors += (values["rc"] != 0) + values["job_errors"]
    storms = [_fields(line) for line in result.lines_starting("LOAD-STORM ")]
    for values in storms:
        figures.storm_ops += values["ops"]
        figures.storm_errors += values["errors"]
        figures.storm_missing += (
            values["missing"] + values["wrong"] + abs(values["present"] - values["expected"])
        )
        figures.storm_files_kept += values["present"]
    table = figures.table(watch, LOAD_SECONDS)
    print(f"\n{table}")

    def context() -> str:
        return f"\n{table}\n{result.describe()}"

    assert result.mounted, context()
    assert result.exit_status == 0, context()
    assert result.unmounted, context()
    assert figures.fio_passes > 0 and figures.fio_errors == 0, context()
    assert "verify failed" not in result.console_output, context()
    assert len(storms) == STORM_PROCS, context()
    assert all(values["rounds"] > 0 for values in storms), context()
    assert figures.storm_errors == 0 and figures.storm_missing == 0, context()
    _check_storm_on_host(tmp_path, storms, context)
    _check_daemon_log(result, context)

    assert watch.before is not None and watch.after is not None, f"no samples of the daemon{context()}"
    assert watch.after.fds <= watch.before.fds + FD_MARGIN, f"daemon fds leaked{context()}"
    assert watch.after.anon_kib <= watch.before.anon_kib + ANON_MARGIN_KIB, f"daemon memory grew{context()}"


def _check_storm_on_host(share: Path, storms: list[dict[str, int]], context: Callable[[], str]) -> None:
    """What each storm process kept is on the host too: those files, their contents, nothing else."""
    for values in storms:
        proc, rounds = values["id"], values["rounds"]
        expected = {
            f"kept-{r}-{i}": f"{proc} {r} {i}\n"
            for r in range(max(1, rounds - STORM_KEEP + 1), rounds + 1)
            for i in range(0, STORM_BATCH, 2)
        }
        directory = share / f"storm-{proc}"
        present = {path.name: path.read_text() for path in directory.iterdir()}
        assert present.keys() == expected.keys(), (
            f"storm-{proc} on the host: missing {sorted(expected.keys() - present.keys())[:10]}, "
            f"extra {sorted(present.keys() - expected.keys())[:10]}{context()}"
        )
        assert present == expected, f"storm-{proc}: file contents differ on the host{context()}"


def _check_daemon_log(result: GuestResult, context: Callable[[], str]) -> None:
    bad = [line for line in result.daemon_log.splitlines() if re.search(r"ERROR|CRITICAL|Traceback", line)]
    assert not bad, f"the daemon logged errors: {bad[:10]}{context()}"
