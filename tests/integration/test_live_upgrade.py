"""Live upgrade of `vhostfs mount`: a new server takes the mount over, which is never unmounted.

A real /dev/fuse mount (root), `fio --verify` writing through it and a shell sitting in one of its
directories with a file open, while the mount passes from one `vhostfs mount` to a second and a
third (`--upgrade-socket`, `--take-over`). The mount id never changes, the old servers exit 0, and
the programs finish as if nothing happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.guest import running_in_ci

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


def _mount_id(mnt: Path) -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            return fields[0]
    return None


def _start(src: Path, mnt: Path, sock: Path, log: Path, *extra: str) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", "vhostfs", "mount", "--shared-dir", str(src), str(mnt),
                             "--upgrade-socket", str(sock), *extra], cwd=REPO, stdout=out, stderr=out)


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout} s")
        time.sleep(0.05)


def test_mount_passes_to_new_servers_under_fio_and_a_process_inside(tmp_path: Path) -> None:
    fio = shutil.which("fio")
    if fio is None:
        if running_in_ci():
            pytest.fail("CI must run the live upgrade test, but there is no fio (scripts/test.sh has it)")
        pytest.skip("no fio")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "dir").mkdir()
    sock = tmp_path / "upgrade.sock"
    log = tmp_path / "mount.log"
    servers = [_start(src, mnt, sock, log)]
    procs: list[subprocess.Popen] = []
    try:
        _wait_until(lambda: _mount_id(mnt) is not None and sock.exists(), 20, "mount")
        mount_id = _mount_id(mnt)
        # A process with its working directory in the mount and a file open for writing there.
        sitter = subprocess.Popen(
            ["sh", "-c", "exec 3>>held; echo before >&3; touch ready; "
             "while [ ! -e go ]; do sleep 0.05; done; echo after >&3; pwd; ls; echo inside > inside"],
            cwd=mnt / "dir", stdout=subprocess.PIPE, text=True)
        procs.append(sitter)
        # Rate-limited, so that it writes for about 4 s whatever the machine (and FUSE passthrough)
        # can do: the upgrades happen while it runs.
        verify = subprocess.Popen(
            [fio, "--name=verify", f"--filename={mnt}/fio.dat", "--size=24M", "--rate=6m", "--bs=4k",
             "--rw=randwrite", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1",
             "--verify_state_save=0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(verify)
        _wait_until(lambda: (src / "dir" / "ready").exists() and (src / "fio.dat").exists(), 30, "workload")
        time.sleep(0.5)
        for _ in range(2):
            new = _start(src, mnt, sock, log, "--take-over", str(sock))
            servers.append(new)
            old = servers[-2]
            assert old.wait(120) == 0, log.read_text()
            assert new.poll() is None, log.read_text()
            assert _mount_id(mnt) == mount_id  # never unmounted
            _wait_until(sock.exists, 10, "new upgrade socket")
            time.sleep(0.5)
        assert verify.poll() is None, "fio ended before the upgrades: make it write longer"
        (src / "dir" / "go").write_text("")
        out, _ = sitter.communicate(timeout=120)
        fio_out, _ = verify.communicate(timeout=600)
        assert verify.returncode == 0, fio_out
        assert "err= 0" in fio_out, fio_out
        assert sitter.returncode == 0
        assert out.splitlines()[0] == str(mnt / "dir")
        assert (src / "dir" / "held").read_text() == "before\nafter\n"
        assert (src / "dir" / "inside").read_text() == "inside\n"
        text = log.read_text()
        assert text.count("took over the mount") == 2, text
        assert text.count("exiting without unmounting") == 2, text
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        if _mount_id(mnt) is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert _mount_id(mnt) is None  # SIGTERM to the last server unmounted it


def test_a_refused_take_over_leaves_the_old_server_serving(tmp_path: Path) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_text("data")
    sock = tmp_path / "upgrade.sock"
    log = tmp_path / "mount.log"
    old = _start(src, mnt, sock, log)
    try:
        _wait_until(lambda: _mount_id(mnt) is not None and sock.exists(), 20, "mount")
        with open(mnt / "f") as held:
            # Other options than the session was negotiated with: the new server refuses it.
            new = _start(src, mnt, sock, log, "--take-over", str(sock), "--no-posix-lock", "--no-flock")
            assert new.wait(60) == 1, log.read_text()
            assert "start it with the source's options" in log.read_text()
            assert old.poll() is None
            assert held.read() == "data"
            assert (mnt / "f").read_text() == "data"
            (mnt / "g").write_text("still served")
        assert (src / "g").read_text() == "still served"
    finally:
        old.send_signal(signal.SIGTERM)
        assert old.wait(20) == 0
    assert _mount_id(mnt) is None
