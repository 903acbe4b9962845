"""The daemon serving an overlay (--overlay-lower) through the project's front end, in the sandbox and
under the seccomp filter that are its defaults elsewhere: lower layers outside the shared directory
stay readable after pivot_root, copy-up and whiteouts work with the filter's system calls, and
option combinations that cannot work are refused at start."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time

import pytest

from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient, expect_errno

from .conftest import Daemon, start_daemon, stop_daemon

ROOT = abi.ROOT_ID


@pytest.mark.parametrize("sandbox", ["namespace", "chroot", "none"])
def test_daemon_serves_an_overlay_in_its_sandbox(tmp_path, sandbox):
    if os.geteuid() != 0:
        pytest.skip("whiteouts and the sandbox need root")
    upper, lower1, lower2 = tmp_path / "share", tmp_path / "lower1", tmp_path / "lower2"
    for d in (upper, lower1, lower2):
        d.mkdir()
    (lower2 / "base").write_bytes(b"from the bottom layer")
    (lower1 / "top").write_bytes(b"from the top layer")
    (lower2 / "top").write_bytes(b"hidden")
    (lower2 / "opq").mkdir()
    (lower2 / "opq" / "below").write_bytes(b"hidden by the opaque directory above")
    (lower1 / "opq").mkdir()
    os.setxattr(lower1 / "opq", b"trusted.overlay.opaque", b"y")
    d = start_daemon(tmp_path, f"--sandbox={sandbox}", "--seccomp=kill", "--xattr",
                     "--overlay-lower", str(lower1), "--overlay-lower", str(lower2), shared=upper)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            assert sorted(client.readdir_names(ROOT)) == [b".", b"..", b"base", b"opq", b"top"]
            opq = client.lookup(ROOT, b"opq")[0]
            assert sorted(client.readdir_names(opq)) == [b".", b".."]
            top = client.lookup(ROOT, b"top")[0]
            fh = client.open(top)
            assert client.read(top, fh, 0, 100) == b"from the top layer"
            client.release(top, fh)
            base = client.lookup(ROOT, b"base")[0]
            fh = client.open(base, os.O_RDWR)
            assert client.write(base, fh, 0, b"FROM") == 4
            client.release(base, fh)
            client.unlink(ROOT, b"top")
            expect_errno(errno.ENOENT, client.lookup, ROOT, b"top")
            expect_errno(errno.EPERM, client.call, abi.FUSE_MKNOD, ROOT,
                         abi.MKNOD_IN.pack(stat.S_IFCHR | 0o644, 0, 0) + b"forged\0")
            assert sorted(client.readdir_names(ROOT)) == [b".", b"..", b"base", b"opq"]
    finally:
        stop_daemon(d)
    log = d.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert d.proc.returncode == 0, log
    assert (upper / "base").read_bytes() == b"FROM the bottom layer"
    assert (lower2 / "base").read_bytes() == b"from the bottom layer"
    st = os.lstat(upper / "top")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert sorted(os.listdir(upper)) == ["base", "top"]


@pytest.mark.parametrize("extra", [["--readonly"], ["--xattrmap", ":map:trusted.:user.virtiofs.:"],
                                   ["--posix-acl"], ["--writeback"], ["--security-label"],
                                   ["--overlay-lower", "/nonexistent-lower"]])
def test_overlay_option_combinations_that_cannot_work_are_refused(tmp_path, extra):
    lower = tmp_path / "lower"
    lower.mkdir()
    (tmp_path / "share").mkdir()
    proc = subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", str(tmp_path / "s.sock"),
                           "--shared-dir", str(tmp_path / "share"), "--overlay-lower", str(lower), *extra],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "overlay" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_lower_layer_changing_under_the_daemon(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("whiteouts and the sandbox need root")
    upper, lower, canary = tmp_path / "share", tmp_path / "lower", tmp_path / "canary"
    for d in (upper, lower, canary):
        d.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    (lower / "d").mkdir()
    (lower / "d" / "f").write_bytes(b"f")
    (lower / "g").write_bytes(b"g")
    d = start_daemon(tmp_path, "--sandbox=namespace", "--seccomp=kill", "--xattr",
                     "--overlay-lower", str(lower), shared=upper)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            dir_id = client.lookup(ROOT, b"d")[0]
            f = client.lookup(dir_id, b"f")[0]
            g = client.lookup(ROOT, b"g")[0]
            fh = client.open(g)
            # The lower layer changes: the directory becomes a symlink out of it, the files go.
            (lower / "d" / "f").unlink()
            (lower / "d").rmdir()
            os.symlink(canary, lower / "d")
            (lower / "g").unlink()
            assert client.read(g, fh, 0, 10) == b"g"  # the open file is still the old one
            client.release(g, fh)
            for call in (lambda: client.open(g, os.O_RDWR), lambda: client.open(f, os.O_RDWR),
                         lambda: client.lookup(dir_id, b"secret"), lambda: client.readdir_names(dir_id),
                         lambda: client.create(dir_id, b"new"), lambda: client.unlink(ROOT, b"d"),
                         lambda: client.lookup(client.lookup(ROOT, b"d")[0], b"secret")):
                try:
                    call()
                except OSError:
                    pass
            assert client.getattr(ROOT)
            assert b"d" in client.readdir_names(ROOT)
    finally:
        stop_daemon(d)
    log = d.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert d.proc.returncode == 0, log
    assert sorted(os.listdir(canary)) == ["secret"]
    assert (canary / "secret").read_bytes() == b"do not touch"
    assert not any(p.is_symlink() for p in upper.rglob("*"))


def test_vfs_mount_of_an_overlay_in_the_sandbox(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("whiteouts and the sandbox need root")
    upper, lower, other = tmp_path / "upper", tmp_path / "lower", tmp_path / "other"
    for d in (upper, lower, other):
        d.mkdir()
    (lower / "opq").mkdir()
    (lower / "opq" / "x").write_bytes(b"")
    (lower / "f").write_bytes(b"lower")
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", b"trusted.overlay.opaque", b"y")
    (other / "plain").write_bytes(b"a passthrough beside it")
    sock, log_path = tmp_path / "vfs.sock", tmp_path / "daemon.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostfs", "--socket-path", str(sock),
                                 "--sandbox=namespace", "--seccomp=kill", "--xattr",
                                 "--mount", f"/ovl={upper}:lowerdir={lower}",
                                 "--mount", f"/other={other}:ro"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    d = Daemon(proc, str(sock), upper, log_path)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            ovl = client.lookup(ROOT, b"ovl")[0]
            assert sorted(client.readdir_names(ovl)) == [b".", b"..", b"f", b"opq"]
            assert sorted(client.readdir_names(client.lookup(ovl, b"opq")[0])) == [b".", b".."]
            client.unlink(ovl, b"f")
            assert client.lookup(client.lookup(ROOT, b"other")[0], b"plain")
    finally:
        stop_daemon(d)
    log = d.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert stat.S_ISCHR(os.lstat(upper / "f").st_mode)
    assert (lower / "f").read_bytes() == b"lower"
