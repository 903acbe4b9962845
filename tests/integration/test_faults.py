"""The daemon under faults around it: a front end that vanishes, a guest that reboots, a share that
disappears, turns read-only or fills up, too few fds, and a request that blocks on the host.

Each case ends with the daemon still serving (or, when the front end is gone, exited with status 0)
and no Traceback in its log.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.needs import skip_unless_ci
from vhostfs.fuse import abi
from vhostfs.testing.frontend import Frontend
from vhostfs.testing.fuse_client import FuseClient, expect_errno
from vhostfs.vhost_user import messages as m

from .conftest import Daemon, check_statfs, start_daemon, stop_daemon

ROOT = abi.ROOT_ID
R = m.Request


def _assert_clean_exit(daemon: Daemon) -> None:
    assert daemon.wait(30) == 0, daemon.log_text()
    assert not os.path.exists(daemon.socket)
    assert not os.path.exists(daemon.socket + ".pid")
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


# -- the front end goes away -------------------------------------------------------------------------
def test_disconnect_with_requests_in_flight(daemon):
    (daemon.shared / "big").write_bytes(os.urandom(1 << 20))
    fe = daemon.connect()
    fe.setup(queues=2)
    client = FuseClient(fe)
    client.init()
    nodeid = client.lookup(ROOT, b"big")[0]
    fh = client.open(nodeid)
    ring = fe.rings[1]
    # Several 1 MiB reads posted and kicked, then the front end is gone before any answer is read.
    for _ in range(8):
        data = client.message(abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, 0, 1 << 20, 0, 0, 0))
        src, dst = fe.alloc(len(data)), fe.alloc(1 << 20 | 16)
        fe.view[src:src + len(data)] = data
        fe.publish(ring, fe.make_chain(ring, [(src, len(data))], [(dst, 1 << 20 | 16)]))
    fe.close()
    _assert_clean_exit(daemon)


def test_disconnect_in_the_middle_of_a_message(daemon):
    fe = daemon.connect()
    fe.negotiate()
    fe.raw(m.HEADER.pack(R.VHOST_USER_SET_MEM_TABLE, m.VHOST_USER_VERSION, 200) + b"\0" * 20)
    fe.close()
    _assert_clean_exit(daemon)


# -- the guest reboots ---------------------------------------------------------------------------------
def _stop_rings(fe: Frontend) -> None:
    for index in list(fe.rings):
        fe.call(R.VHOST_USER_GET_VRING_BASE, m.VRING_STATE.pack(index, 0))


def _restart(fe: Frontend, how: str) -> None:
    """What the VMM sends when the guest reboots, then the device set up again from scratch."""
    if how == "reset_owner":
        _stop_rings(fe)
        fe.send(R.VHOST_USER_RESET_OWNER)
    elif how == "reset_device":
        assert fe.ack(R.VHOST_USER_RESET_DEVICE) == 0
    else:  # QEMU 7.2 resetting a vhost-user-fs device: the rings stopped with GET_VRING_BASE only
        _stop_rings(fe)
    for ring in fe.rings.values():
        os.close(ring.kick)
        os.close(ring.call)
    fe.rings.clear()
    fe.negotiate()
    assert fe.set_mem_table() == 0
    for index in range(2):
        fe.add_ring(index)
    fe.sync()


@pytest.mark.parametrize("how", [
    "reset_owner",
    "reset_device",
    "rings_stopped",
])
def test_guest_reboot_resets_and_serves_again(daemon, how):
    (daemon.shared / "kept").write_bytes(b"still here")
    with daemon.connect() as fe:
        fe.setup(queues=2)
        client = FuseClient(fe)
        client.init()
        client.lookup(ROOT, b"kept")
        _restart(fe, how)
        client = FuseClient(fe)
        if how != "rings_stopped":
            # The device was reset, the FUSE session with it: nothing is served before a new INIT.
            expect_errno(errno.EIO, client.lookup, ROOT, b"kept")
        client.init()
        nodeid = client.lookup(ROOT, b"kept")[0]
        fh = client.open(nodeid)
        assert client.read(nodeid, fh, 0, 100) == b"still here"
        client.release(nodeid, fh)
    assert daemon.wait(30) == 0


def test_new_memory_table_under_running_queues(session):
    """A new SET_MEM_TABLE (memory hot-plug, or the table a rebooting guest gets) while queues run:
    they switch to it and the session goes on."""
    client, daemon = session
    (daemon.shared / "f").write_bytes(b"data")
    nodeid = client.lookup(ROOT, b"f")[0]
    assert client.fe.set_mem_table() == 0
    fh = client.open(nodeid)
    assert client.read(nodeid, fh, 0, 10) == b"data"
    client.release(nodeid, fh)


# -- the share changes under the daemon ----------------------------------------------------------------
def test_shared_directory_removed(session):
    client, daemon = session
    d = client.mkdir(ROOT, b"sub")[0]
    shutil.rmtree(daemon.shared)
    expect_errno(errno.ENOENT, client.lookup, ROOT, b"sub")
    expect_errno(errno.ENOENT, client.create, ROOT, b"new")
    expect_errno(errno.ENOENT, client.mkdir, d, b"deeper")
    client.statfs()  # the daemon still answers


def _mount(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")


@pytest.fixture
def tmpfs_share(tmp_path):
    """A 1 MiB tmpfs as the share, unmounted afterwards."""
    share = tmp_path / "share"
    share.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "vhostfs-test", str(share))
    yield share
    subprocess.run(["umount", "-l", str(share)], check=False)


@pytest.fixture
def tmpfs_session(tmp_path, tmpfs_share):
    d = start_daemon(tmp_path, shared=tmpfs_share)
    try:
        with d.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            yield client, d
    finally:
        stop_daemon(d)
    assert "Traceback" not in d.log_text(), d.log_text()


def test_shared_directory_made_read_only(tmpfs_session):
    client, daemon = tmpfs_session
    entry, (fh, _) = client.create(ROOT, b"f")
    client.release(entry[0], fh)
    _mount("-o", "remount,ro", str(daemon.shared))
    expect_errno(errno.EROFS, client.create, ROOT, b"g")
    expect_errno(errno.EROFS, client.mkdir, ROOT, b"d")
    expect_errno(errno.EROFS, client.unlink, ROOT, b"f")
    expect_errno(errno.EROFS, client.open, entry[0], os.O_RDWR)
    fh = client.open(entry[0])
    assert client.read(entry[0], fh, 0, 10) == b""
    client.release(entry[0], fh)


def test_full_host_file_system_gives_enospc(tmpfs_session):
    client, daemon = tmpfs_session
    entry, (fh, _) = client.create(ROOT, b"fill")
    nodeid = entry[0]
    chunk = b"x" * (256 << 10)
    written, error = 0, None
    for _ in range(8):  # 2 MiB into a 1 MiB file system
        try:
            n = client.write(nodeid, fh, written, chunk)
        except OSError as e:
            error = e.errno
            break
        written += n
        if n < len(chunk):
            continue
    assert error == errno.ENOSPC
    assert written == os.stat(daemon.shared / "fill").st_size
    client.release(nodeid, fh)
    check_statfs(client, daemon.shared)  # still serving


# -- too few fds ---------------------------------------------------------------------------------------
NOFILE = 64


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def test_emfile_is_an_error_not_a_crash(tmp_path):
    shared = tmp_path / "share"
    shared.mkdir()
    sock = str(tmp_path / "vfs.sock")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vhostfs", "--socket-path", sock, "--shared-dir",
                                 str(shared)], stdout=out, stderr=subprocess.STDOUT, preexec_fn=_low_nofile)
    daemon = Daemon(proc, sock, shared, log)
    try:
        while not os.path.exists(sock):
            assert proc.poll() is None, daemon.log_text()
            time.sleep(0.05)
        with daemon.connect() as fe:
            fe.setup(queues=2)
            client = FuseClient(fe)
            client.init()
            handles, errors = [], set()
            for i in range(2 * NOFILE):
                try:
                    entry, (fh, _) = client.create(ROOT, f"f{i}".encode())
                    handles.append((entry[0], fh))
                except OSError as e:
                    errors.add(e.errno)
            assert errors and errors <= {errno.EMFILE, errno.ENFILE}
            assert len(handles) < 2 * NOFILE
            for nodeid, fh in handles:
                client.release(nodeid, fh)
            entry, (fh, _) = client.create(ROOT, b"after")  # fds are back: served again
            client.release(entry[0], fh)
    finally:
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


# -- a request that blocks on the host -------------------------------------------------------------
def _load_memfs():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "memfs.py"
    spec = importlib.util.spec_from_file_location("memfs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MemFS


class SlowMount:
    """A FUSE file system mounted on the host (through fusermount3) whose LOOKUP of b"block" waits
    until `release` is set: a host file system that hangs, as a dead NFS server makes one."""

    def __init__(self, mountpoint: Path) -> None:
        from vhostfs.fuse.server import FuseServer

        memfs = _load_memfs()
        self.entered = threading.Event()
        self.release = threading.Event()
        outer = self

        class Slow(memfs):
            def lookup(self, ctx, parent, name):
                if name == b"block":
                    outer.entered.set()
                    outer.release.wait()
                return super().lookup(ctx, parent, name)

        ours, theirs = socket.socketpair()
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        result = subprocess.run(["fusermount3", "-o", "rootmode=40000,user_id=0,group_id=0", "--",
                                 str(mountpoint)], env=env, pass_fds=[theirs.fileno()],
                                capture_output=True, text=True)
        theirs.close()
        if result.returncode:
            ours.close()
            pytest.skip(f"cannot mount a FUSE file system here: {result.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        ours.close()
        self.mountpoint = mountpoint
        self.fd = fds[0]
        self.server = FuseServer(Slow(timeout=0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from vhostfs.iov import Reader, Writer

        while True:
            try:
                data = os.read(self.fd, (1 << 20) + 4096)
            except OSError:
                return  # ENODEV: unmounted
            out = bytearray(1 << 17)
            n = self.server.handle(Reader([memoryview(data)]), Writer([memoryview(out)]))
            if n:
                try:
                    os.write(self.fd, out[:n])
                except OSError:
                    pass  # the request was interrupted

    def close(self) -> None:
        self.release.set()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        os.close(self.fd)
        self.thread.join(10)


def test_blocked_request_does_not_stall_other_queues(tmp_path):
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        skip_unless_ci("needs fusermount3 (Debian package fuse3) and /dev/fuse")
    shared = tmp_path / "share"
    (shared / "slow").mkdir(parents=True)
    (shared / "fast").write_bytes(b"fast")
    slow = SlowMount(shared / "slow")
    daemon = start_daemon(tmp_path, shared=shared)
    try:
        with daemon.connect() as fe:
            fe.setup(queues=3)  # hiprio and two request queues
            first, second = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
            first.init()
            slow_dir = first.lookup(ROOT, b"slow")[0]
            ring = fe.rings[1]
            data = first.message(abi.FUSE_LOOKUP, slow_dir, b"block\0")
            src, dst = fe.alloc(len(data)), fe.alloc(4096)
            fe.view[src:src + len(data)] = data
            fe.publish(ring, fe.make_chain(ring, [(src, len(data))], [(dst, 4096)]))
            assert slow.entered.wait(30), "the blocking lookup never reached the slow file system"
            # Queue 1 is stuck in the host kernel; queue 2 is served meanwhile.
            nodeid = second.lookup(ROOT, b"fast")[0]
            fh = second.open(nodeid)
            assert second.read(nodeid, fh, 0, 10) == b"fast"
            second.release(nodeid, fh)
            assert fe.used_idx(ring) == ring.last_used, "the blocked request was answered early"
            slow.release.set()
            fe.wait_used(ring)
            assert abi.OUT_HEADER.unpack_from(fe.view, dst)[1] == -errno.ENOENT
    finally:
        slow.close()
        stop_daemon(daemon)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()
