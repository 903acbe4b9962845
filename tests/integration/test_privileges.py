"""Least privilege of the running daemon, read from /proc/<pid>/status once it serves a front end: only
the passthrough's capabilities (adjusted by --modcaps), no supplementary groups, and the seccomp filter
(--seccomp) on every thread, while it still serves a whole FUSE session."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from vhostfs import caps
from vhostfs.fuse import abi
from vhostfs.testing.fuse_client import FuseClient, expect_errno

from .conftest import check_statfs, start_daemon, stop_daemon

ROOT = abi.ROOT_ID

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs a root daemon")


def _status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


def _threads(pid: int) -> list[dict[str, str]]:
    """The status of every thread of `pid` (capabilities and filters are per thread)."""
    return [_status(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


#: What the daemon keeps, as the documentation (caps.py, README) states it, written out here rather than
#: taken from caps.PASSTHROUGH_CAPABILITIES so that a change to that list shows up as a failure.
DOCUMENTED = frozenset({"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID",
                        "CAP_SETUID", "CAP_MKNOD", "CAP_SETFCAP"})


def _serving_pid(daemon) -> int:
    """The process that serves: under the default namespace sandbox the daemon's only child (the outer
    process stays outside the namespaces and only waits for it), else the daemon itself."""
    with open(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    assert len(children) <= 1, children
    return children[0] if children else daemon.proc.pid


def _held() -> int:
    """The capabilities this test process may have: the daemon cannot hold more."""
    return int(_status(os.getpid())["CapPrm"], 16)


@pytest.fixture
def start(tmp_path):
    started = []

    def start(*args: str):
        daemon = start_daemon(tmp_path, *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        stop_daemon(daemon)
        assert "Traceback" not in daemon.log_text(), daemon.log_text()
        assert daemon.proc.returncode == 0, daemon.log_text()


def _serving(daemon):
    """A front end whose queues are running (the daemon has accepted it and started its workers)."""
    fe = daemon.connect()
    fe.setup(queues=2)
    client = FuseClient(fe)
    client.init()
    return fe, client


def test_daemon_keeps_only_the_passthrough_capabilities(start):
    daemon = start("--xattr")
    fe, client = _serving(daemon)
    with fe:
        expected = caps.mask(DOCUMENTED) & _held()
        pid = _serving_pid(daemon)
        assert pid != daemon.proc.pid, "the default sandbox is the namespace one"
        threads = _threads(pid)
        assert len(threads) > 1, "the queue workers should be running"
        for status in threads:
            assert int(status["CapEff"], 16) == expected, caps.names(int(status["CapEff"], 16))
            assert int(status["CapPrm"], 16) == expected
            assert int(status["CapInh"], 16) == 0
            assert int(status["CapAmb"], 16) == 0
            assert status["Groups"] == ""
        if int(_status(os.getpid())["CapEff"], 16) >> caps.CAPABILITIES["CAP_SETPCAP"] & 1:
            assert int(_status(pid)["CapBnd"], 16) == expected
        # The default filter kills on a call off the list, as --seccomp=kill.
        assert _status(pid)["Seccomp"] == "2"
        # What a dropped capability allowed is refused: trusted.* attributes need CAP_SYS_ADMIN,
        # which this test process holds and the daemon does not.
        assert int(_status(os.getpid())["CapEff"], 16) >> caps.CAPABILITIES["CAP_SYS_ADMIN"] & 1
        (daemon.shared / "f").write_bytes(b"")
        nodeid = client.lookup(ROOT, b"f")[0]
        body = abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"trusted.x\0y"
        expect_errno(errno.EPERM, client.call, abi.FUSE_SETXATTR, nodeid, body)
        body = abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0y"
        client.call(abi.FUSE_SETXATTR, nodeid, body)  # the call itself works
        assert os.getxattr(daemon.shared / "f", "user.x") == b"y"
        assert "trusted.x" not in os.listxattr(daemon.shared / "f")


def test_seccomp_none_installs_no_filter(start):
    daemon = start("--seccomp=none", "--sandbox=none")
    fe, client = _serving(daemon)
    with fe:
        check_statfs(client, daemon.shared)
        assert _serving_pid(daemon) == daemon.proc.pid
        assert all(status["Seccomp"] == "0" for status in _threads(daemon.proc.pid))


@pytest.mark.parametrize("option", ["--modcaps=+sys_admin:-mknod", "-omodcaps=+CAP_SYS_ADMIN:-CAP_MKNOD"])
def test_modcaps_adds_and_removes(start, option):
    daemon = start(option)
    fe, client = _serving(daemon)
    with fe:
        effective = int(_status(_serving_pid(daemon))["CapEff"], 16)
        assert caps.names(effective) == sorted(
            DOCUMENTED - {"CAP_MKNOD"} | {"CAP_SYS_ADMIN"}, key=caps.CAPABILITIES.get)
        # Without CAP_MKNOD the guest's MKNOD of a device node is refused by the host.
        body = abi.MKNOD_IN.pack(stat.S_IFCHR | 0o600, os.makedev(1, 3), 0) + b"null\0"
        expect_errno(errno.EPERM, client.call, abi.FUSE_MKNOD, ROOT, body)


def test_file_handles_keep_dac_read_search(start):
    daemon = start("--inode-file-handles=prefer")
    fe, client = _serving(daemon)
    with fe:
        effective = int(_status(_serving_pid(daemon))["CapEff"], 16)
        assert caps.names(effective) == caps.names(
            caps.mask(DOCUMENTED | {"CAP_DAC_READ_SEARCH"}) & _held())
        (daemon.shared / "f").write_bytes(b"by handle")
        nodeid = client.lookup(ROOT, b"f")[0]
        fh = client.open(nodeid)
        assert client.read(nodeid, fh, 0, 100) == b"by handle"
        client.release(nodeid, fh)


@pytest.mark.parametrize("modcaps", ["+sys_admin:+bogus", "sys_admin", "+chown:-chown", "+"])
def test_bad_modcaps_is_a_command_line_error(tmp_path, modcaps):
    result = subprocess.run([sys.executable, "-m", "vhostfs", "--socket-path", str(tmp_path / "s"),
                             "--shared-dir", str(tmp_path), f"--modcaps={modcaps}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "modcaps" in result.stderr or "capability" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_creates_files_as_the_caller_after_dropping(start):
    daemon = start()
    os.chmod(daemon.shared, 0o777)
    (daemon.shared / "roots").mkdir(mode=0o700)
    fe, _ = _serving(daemon)
    with fe:
        user = FuseClient(fe, uid=1000, gid=1000)
        entry, (fh, _) = user.create(ROOT, b"mine", mode=0o640)
        assert user.write(entry[0], fh, 0, b"by uid 1000") == 11
        user.release(entry[0], fh)
        user.mkdir(ROOT, b"dir", mode=0o750)
        # Creating is checked with the caller's permissions: root's 0700 directory is closed to it.
        expect_errno(errno.EACCES, user.create, user.lookup(ROOT, b"roots")[0], b"nope")
    for name in ("mine", "dir"):
        st = os.stat(daemon.shared / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), name
    assert (daemon.shared / "mine").read_bytes() == b"by uid 1000"


@pytest.mark.parametrize("mode", ["trap", "kill", "log"])
def test_seccomp_filter_on_every_thread(start, mode):
    daemon = start(f"--seccomp={mode}")
    fe, client = _serving(daemon)
    with fe:
        check_statfs(client, daemon.shared)
        threads = _threads(_serving_pid(daemon))
        assert len(threads) > 1, "the queue workers should be running"
        for status in threads:
            assert status["Seccomp"] == "2"  # SECCOMP_MODE_FILTER
            assert status["Seccomp_filters"] == "1"
            assert status["NoNewPrivs"] == "1"


def test_full_session_under_seccomp_kill(start):
    """Every kind of request the guest makes all the time goes through the filter without a kill."""
    daemon = start("--seccomp=kill", "--xattr")
    fe, client = _serving(daemon)
    with fe:
        entry, (fh, _) = client.create(ROOT, b"a", mode=0o644)
        nodeid = entry[0]
        assert client.write(nodeid, fh, 0, b"x" * 100000) == 100000
        assert client.read(nodeid, fh, 99990, 100) == b"x" * 10
        client.call(abi.FUSE_FSYNC, nodeid, abi.FSYNC_IN.pack(fh, 0))
        client.call(abi.FUSE_FLUSH, nodeid, abi.FLUSH_IN.pack(fh, 0))
        client.release(nodeid, fh)
        client.call(abi.FUSE_SETATTR, nodeid,
                    abi.SETATTR_IN.pack(abi.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0))
        assert stat.S_IMODE(os.stat(daemon.shared / "a").st_mode) == 0o600
        client.getattr(nodeid)
        sub = client.mkdir(ROOT, b"sub")[0]
        client.call(abi.FUSE_RENAME, ROOT, abi.RENAME_IN.pack(sub) + b"a\0b\0")
        assert sorted(client.readdir_names(sub)) == [b".", b"..", b"b"]
        check_statfs(client, daemon.shared)
        _xattrs(client, client.lookup(sub, b"b")[0])
        client.unlink(sub, b"b")
        client.call(abi.FUSE_RMDIR, ROOT, b"sub\0")
        assert os.listdir(daemon.shared) == []
    assert daemon.wait(30) == 0, daemon.log_text()


def _xattrs(client: FuseClient, nodeid: int) -> None:
    """SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR of a user. attribute on `nodeid`."""
    value = b"kept"
    client.call(abi.FUSE_SETXATTR, nodeid, abi.SETXATTR_IN_COMPAT.pack(len(value), 0) + b"user.t\0" + value)
    assert client.call(abi.FUSE_GETXATTR, nodeid, abi.GETXATTR_IN.pack(64) + b"user.t\0") == value
    assert b"user.t\0" in client.call(abi.FUSE_LISTXATTR, nodeid, abi.GETXATTR_IN.pack(4096))
    client.call(abi.FUSE_REMOVEXATTR, nodeid, b"user.t\0")


def test_sandboxed_daemon_drops_after_entering_the_namespace(start):
    """The namespace sandbox needs CAP_SYS_ADMIN to set up; the daemon inside holds no more of it."""
    daemon = start("--sandbox=namespace", "--seccomp=kill")
    fe, client = _serving(daemon)
    with fe:
        inner = _serving_pid(daemon)
        assert inner != daemon.proc.pid
        status = _status(inner)
        assert int(status["CapEff"], 16) == caps.mask(DOCUMENTED) & _held()
        assert status["Seccomp"] == "2"
        entry, (fh, _) = client.create(ROOT, b"inside")
        assert client.write(entry[0], fh, 0, b"ok") == 2
        client.release(entry[0], fh)
    assert (daemon.shared / "inside").read_bytes() == b"ok"
