"""The daemon in its sandbox (--sandbox namespace|chroot): it serves the share through the front end,
and no path it can name leads outside the share."""

from __future__ import annotations

import os

import pytest

from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient

from .conftest import start_daemon, stop_daemon

ROOT = abi.ROOT_ID


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture(params=["namespace", "chroot"])
def sandboxed(request, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root (CAP_SYS_ADMIN, CAP_SYS_CHROOT)")
    d = start_daemon(tmp_path, f"--sandbox={request.param}")
    (d.shared / "inside").write_bytes(b"served from the sandbox")
    yield request.param, d
    stop_daemon(d)
    assert "Traceback" not in d.log_text(), d.log_text()
    assert d.proc.returncode == 0, d.log_text()
    assert not os.path.exists(d.socket), "the socket was left behind"


def test_sandboxed_daemon_serves_the_share(sandboxed):
    mode, daemon = sandboxed
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        nodeid = client.lookup(ROOT, b"inside")[0]
        fh = client.open(nodeid)
        assert client.read(nodeid, fh, 0, 100) == b"served from the sandbox"
        client.release(nodeid, fh)
        entry, (fh, _) = client.create(ROOT, b"written")
        assert client.write(entry[0], fh, 0, b"out") == 3
        client.release(entry[0], fh)
    assert (daemon.shared / "written").read_bytes() == b"out"
    assert daemon.wait(30) == 0


def test_sandboxed_daemon_cannot_name_host_paths(sandboxed):
    mode, daemon = sandboxed
    with daemon.connect() as fe:
        fe.setup(queues=2)  # the sandbox is locked down before the daemon accepts
        server = daemon.proc.pid
        if mode == "namespace":
            # The outer process waits; the daemon is its only child, pid 1 of a new pid namespace.
            (server,) = _children(daemon.proc.pid)
            with open(f"/proc/{server}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            assert nspid[-1] == "1"
            assert os.readlink(f"/proc/{server}/ns/net") != os.readlink("/proc/self/ns/net")
            assert os.readlink(f"/proc/{server}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        root = f"/proc/{server}/root"
        # Its root directory is the share: "/" names the share, and nothing above it exists.
        assert (os.stat(root).st_dev, os.stat(root).st_ino) == (os.stat(daemon.shared).st_dev,
                                                                 os.stat(daemon.shared).st_ino)
        assert sorted(os.listdir(root)) == sorted(os.listdir(daemon.shared))
        assert not os.path.exists(os.path.join(root, "etc", "passwd"))
        if mode == "namespace":
            # The old root is detached: the share is the only mount the daemon can reach.
            with open(f"/proc/{server}/mountinfo") as f:
                mount_points = {line.split()[4] for line in f}
            assert mount_points == {"/"}, mount_points
