"""The daemon in its sandbox (--sandbox namespace|chroot): it serves the share through the front end,
and no path it can name leads outside the share."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.unit.test_passthrough_options import ALL_RWX
from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient, expect_errno

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


@pytest.mark.parametrize("mode", ["chroot", "namespace"])
def test_sandboxed_daemon_serves_xattrs_and_acls(tmp_path, mode):
    """No /proc is visible inside the sandbox, yet extended attributes and the default-ACL check of
    --posix-acl reach the nodes."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root (CAP_SYS_ADMIN, CAP_SYS_CHROOT)")
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"")
    os.symlink("f", share / "l")
    (share / "inherit").mkdir()
    os.setxattr(share / "inherit", "system.posix_acl_default", ALL_RWX)
    daemon = start_daemon(tmp_path, f"--sandbox={mode}", "--xattr", "--posix-acl")
    value = b"set in the sandbox"
    try:
        with daemon.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init(abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT)
            node = client.lookup(ROOT, b"f")[0]
            client.call(abi.FUSE_SETXATTR, node,
                        abi.SETXATTR_IN.pack(len(value), 0, 0) + b"user.where\0" + value)
            assert os.getxattr(share / "f", "user.where") == value
            assert client.call(abi.FUSE_GETXATTR, node, abi.GETXATTR_IN.pack(64) + b"user.where\0") == value
            assert b"user.where\0" in client.call(abi.FUSE_LISTXATTR, node, abi.GETXATTR_IN.pack(4096))
            client.call(abi.FUSE_REMOVEXATTR, node, b"user.where\0")
            assert "user.where" not in os.listxattr(share / "f")
            # The symlink's own attributes: user.* refused as lsetxattr(2) refuses it.
            link = client.lookup(ROOT, b"l")[0]
            expect_errno(errno.EPERM, client.call, abi.FUSE_SETXATTR, link,
                         abi.SETXATTR_IN.pack(1, 0, 0) + b"user.where\0x")
            # The default ACL replaces the guest's umask; elsewhere the umask applies.
            inherit = client.lookup(ROOT, b"inherit")[0]
            client.call(abi.FUSE_MKDIR, inherit, abi.MKDIR_IN.pack(0o777, 0o077) + b"sub\0")
            client.call(abi.FUSE_MKDIR, ROOT, abi.MKDIR_IN.pack(0o777, 0o077) + b"plain\0")
        assert daemon.wait(30) == 0
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()
    assert stat.S_IMODE(os.stat(share / "inherit" / "sub").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(share / "plain").st_mode) == 0o700
