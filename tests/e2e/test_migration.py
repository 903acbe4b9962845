"""Live migration of a guest between QEMU+vhostfs pairs on one share (QEMU 10, the debian13 stack).

Two boots:

- `test_workload_survives_three_migrations`: a guest holding a file open for writing, a file
  unlinked while open, a working directory, a directory half read with getdents64 and a POSIX lock
  (tests/e2e/helpers/mighold.c), while fio writes and verifies a file and a shell loop appends a
  numbered line every moment, moves A -> B -> C -> D (back and forth between two daemons' sockets,
  each hop a new QEMU with `-incoming` and a new vhostfs) and goes on: every line and write before,
  during and after is on the host, fio's verify passes, the lock is held again on the host.
- `test_failed_migrations_leave_the_source_running`: migrations through a file (`migrate
  file:...`, `-incoming file:...`), so that the host can change the share or the stream before the
  destination loads: a file the guest holds open is removed (the destination, under --migration-on-
  error abort, refuses and exits with a message; the source goes on), the stream is cut short (the
  destination exits, the source goes on), and then another open file is removed and a destination
  under --migration-on-error guest-error takes over, the guest getting EIO for that file alone, while
  the file removed in the first step, still open at the source, reaches the destination through its copy.

Each migration prints the downtime QEMU reports (query-migrate).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from vhostfs.fs.locks import F_OFD_GETLK, FLOCK
from vhostfs.fuse.session_state import MAGIC

from .conftest import _images, _program
from .guest import REPO, GuestImages
from .migration import Vm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

HELPER = REPO / "tests" / "e2e" / "helpers" / "mighold.c"
LIST_ENTRIES = 150
# The daemons of the main test run confined as virtiofsd's defaults confine it.
SANDBOXED = ["--sandbox", "namespace", "--seccomp", "kill"]


@pytest.fixture(scope="module")
def images() -> GuestImages:
    """The debian13 guest: QEMU 8.2+ is the first to migrate vhost-user-fs through its back end."""
    return _images("debian13")


@pytest.fixture(scope="module")
def mighold() -> bytes:
    """The guest helper, built static for the busybox guest."""
    return _program("mighold", HELPER.read_text())


def _report(what: str, info: dict) -> None:
    print(f"migration {what}: {info.get('status')}, downtime {info.get('downtime')} ms, "
          f"total {info.get('total-time')} ms, setup {info.get('setup-time')} ms")


def _quit(vm: Vm) -> None:
    try:
        vm.qmp.command("quit")
    except (OSError, ConnectionError):
        pass
    vm.wait_exit(60)


def _lock_held_on_host(path: Path, timeout: float = 15) -> bool:
    """Whether some open file description holds a write lock on byte 50 of `path` (within `timeout`)."""
    fd = os.open(path, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            res = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 50, 1, 0))
            if FLOCK.unpack(res)[0] == fcntl.F_WRLCK:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
    finally:
        os.close(fd)


WORKLOAD = f"""
set -u
mkdir list
i=0
while [ $i -lt {LIST_ENTRIES} ]; do : > list/entry-$i-with-a-name-long-enough-to-need-pages; i=$((i+1)); done
# A numbered line every moment until the host says the VM has moved, then 20 more.
(n=0; while [ ! -e .go ]; do n=$((n+1)); echo $n >> seq.log; sleep 0.1; done
 m=0; while [ $m -lt 20 ]; do n=$((n+1)); m=$((m+1)); echo $n >> seq.log; done; echo SEQ-DONE $n) &
seq=$!
fio --name=verify --filename=/mnt/fio.dat --size=24M --bs=4k --rw=randwrite --ioengine=psync \\
    --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output=/tmp/fio.out &
fio=$!
/mighold /mnt /mnt/.go {LIST_ENTRIES} &
hold=$!
wait $hold; echo MIGHOLD-STATUS=$?
wait $fio; echo FIO-STATUS=$?
grep -E 'err=|WRITE:' /tmp/fio.out
wait $seq
echo WORKLOAD-END
"""


def test_workload_survives_three_migrations(images: GuestImages, mighold: bytes, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    # Two vCPUs and two request queues: Linux 6.12 spreads the requests over both.
    vm = Vm("vm0", run, images.qemu, images, share, WORKLOAD, {"mighold": mighold}, SANDBOXED,
            num_request_queues=2)
    vms = [vm]
    try:
        vm.wait_console("MIGHOLD-READY", 600)
        for hop in range(1, 4):
            uri = f"unix:{run}/mig{hop}.sock"
            dest = Vm(f"vm{hop}", run, images.qemu, images, share, WORKLOAD, {}, SANDBOXED,
                      num_request_queues=2, incoming=uri)
            vms.append(dest)
            info = vm.migrate(uri)
            _report(f"hop {hop}", info)
            assert info["status"] == "completed", f"{info}\n{vm.describe()}\n{dest.describe()}"
            _quit(vm)
            assert "device state saved" in vm.daemon_log.read_text(), vm.describe()
            vm = dest
            status = vm.qmp.command("query-status")
            assert isinstance(status, dict) and status["status"] == "running", status
        # The destination takes the guest's lock again once the source has let go of it.
        assert _lock_held_on_host(share / "locked"), vm.describe()
        (share / ".go").write_text("")
        vm.wait_console("WORKLOAD-END", 600)
    finally:
        for v in vms:
            v.stop()
    console = vm.console()
    assert "MIGHOLD-OK" in console and "MIGHOLD-STATUS=0" in console, vm.describe()
    assert "FIO-STATUS=0" in console, vm.describe()
    assert "MIGHOLD-CWD /mnt/cwd" in console, vm.describe()
    # Every write before and after the moves is on the host.
    assert (share / "held").read_text() == "before\nafter\n"
    assert (share / "cwd" / "inside").read_text() == "in cwd\n"
    last = int(console.split("SEQ-DONE ")[1].split()[0])
    assert (share / "seq.log").read_text().split() == [str(n) for n in range(1, last + 1)]
    assert (share / "fio.dat").stat().st_size == 24 << 20
    assert not [p for p in share.iterdir() if p.name.startswith(".vhostfs-unlinked-")]
    for v in vms[1:]:
        assert "session loaded" in v.daemon_log.read_text(), v.describe()


STEPS = """
set -u
exec 3<victim1 4<victim2
echo GUEST-READY
for n in 1 2 3; do
    while [ ! -e .go$n ]; do sleep 0.2; done
    echo "step $n" >> steps.log
    echo "GUEST-STEP $n"
done
echo "VICTIM1 $(cat <&3)"
if cat <&4 >/dev/null 2>/tmp/err; then echo "VICTIM2 readable"; else echo "VICTIM2 $(cat /tmp/err)"; fi
echo "after" >> steps.log
echo GUEST-DONE
"""


def _failed_incoming(run: Path, name: str, images: GuestImages, share: Path, state: Path,
                     daemon_args: list[str]) -> Vm:
    """A destination loading `state` that must fail: its QEMU exits non-zero, with a message."""
    dest = Vm(name, run, images.qemu, images, share, STEPS, {}, daemon_args, incoming=f"file:{state}")
    status = dest.wait_exit(120)
    dest.stop()
    assert status != 0, dest.describe()
    qemu_says = [line for line in dest.qemu_log.read_text().splitlines() if "module" not in line]
    daemon_says = [line for line in dest.daemon_log.read_text().splitlines() if "[ERROR]" in line]
    print(f"destination {name} exited with {status}: {qemu_says} / {daemon_says}")
    assert any("load" in line.lower() for line in qemu_says), dest.describe()
    return dest


def test_failed_migrations_leave_the_source_running(images: GuestImages, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "victim1").write_text("first victim")
    (share / "victim2").write_text("second victim")
    run = tmp_path / "run"
    run.mkdir()
    src = Vm("src", run, images.qemu, images, share, STEPS, {}, [])
    vms = [src]
    try:
        src.wait_console("GUEST-READY", 600)

        # 1. A file the guest holds open is gone when the destination loads: abort.
        info = src.migrate(f"file:{run}/state1")
        _report("to a file (victim1 removed before the load)", info)
        assert info["status"] == "completed", info
        (share / "victim1").unlink()
        dest = _failed_incoming(run, "abort", images, share, run / "state1", [])
        vms.append(dest)
        log = dest.daemon_log.read_text()
        assert "cannot be found again" in log and "victim1" in log, dest.describe()
        src.qmp.command("cont")
        (share / ".go1").write_text("")
        src.wait_console("GUEST-STEP 1", 120)

        # 2. The stream is cut short inside the back end's state.
        info = src.migrate(f"file:{run}/state2")
        _report("to a file (then truncated)", info)
        assert info["status"] == "completed", info
        data = (run / "state2").read_bytes()
        at = data.find(MAGIC)
        assert at > 0, "the device state is not in the migration stream"
        (run / "state2").write_bytes(data[:at + 200])
        vms.append(_failed_incoming(run, "truncated", images, share, run / "state2", []))
        src.qmp.command("cont")
        (share / ".go2").write_text("")
        src.wait_console("GUEST-STEP 2", 120)

        # 3. Another open file is gone, and the destination lets only that file fail.
        info = src.migrate(f"file:{run}/state3")
        _report("to a file (victim2 removed, guest-error)", info)
        assert info["status"] == "completed", info
        (share / "victim2").unlink()
        dest = Vm("guest-error", run, images.qemu, images, share, STEPS, {},
                  ["--migration-on-error", "guest-error"], incoming=f"file:{run}/state3")
        vms.append(dest)
        deadline = time.monotonic() + 120
        while (status := dest.qmp.command("query-status"))["status"] != "running":
            assert time.monotonic() < deadline and dest.qemu.poll() is None, f"{status}\n{dest.describe()}"
            time.sleep(0.2)
        _quit(src)
        (share / ".go3").write_text("")
        dest.wait_console("GUEST-DONE", 300)
    finally:
        for v in vms:
            v.stop()
    console = dest.console()
    assert "GUEST-STEP 3" in console, dest.describe()
    # victim1 was deleted on the host while the source held it open: its content came along.
    assert "VICTIM1 first victim" in console, dest.describe()
    assert "VICTIM2" in console and "VICTIM2 readable" not in console, dest.describe()
    assert "Input/output error" in console.split("VICTIM2 ")[1].splitlines()[0], dest.describe()
    assert (share / "steps.log").read_text() == "step 1\nstep 2\nstep 3\nafter\n"
    assert not [p for p in share.iterdir() if p.name.startswith(".vhostfs-unlinked-")]
