"""Locks and O_TMPFILE in the passthrough: called directly and through FuseServer.handle.

POSIX record locks are held per guest lock owner as host OFD locks, flock locks on the handle's fd;
both must conflict between guest owners and with host processes, and go away on FLUSH / RELEASE as the
guest kernel expects. Every test runs next to a canary directory that must stay untouched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

from tests.unit.test_passthrough import raises_errno
from vhostfs.fs.locks import F_OFD_SETLK, FLOCK, OFFSET_MAX
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import ROOT_ID, ConnectionInfo, Context, Lock
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer

CTX = Context(0, 0, 4242)
RD, WR, UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
OWNER_A, OWNER_B = 0xA0A0, 0xB0B0


@pytest.fixture
def fs(make) -> Passthrough:
    return make()


def opened(fs: Passthrough, name: bytes = b"f", flags: int = os.O_RDWR) -> tuple[int, int]:
    """Creates (or opens) `name` in the root: (nodeid, fh)."""
    entry, handle = fs.create(CTX, ROOT_ID, name, 0o644, flags, 0)
    return entry.nodeid, handle.fh


def whole(kind: int, pid: int = 0) -> Lock:
    return Lock(0, OFFSET_MAX, kind, pid)


# -- POSIX record locks -----------------------------------------------------------------------------

def test_owners_conflict_and_one_owner_merges(fs):
    node, fh = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, Lock(0, 99, WR, 11), False)
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh, OWNER_B, Lock(50, 60, RD, 22), False)
    # The same owner may re-lock and downgrade its own range; other ranges stay free for others.
    fs.setlk(CTX, node, fh, OWNER_A, Lock(0, 99, RD, 11), False)
    fs.setlk(CTX, node, fh, OWNER_B, Lock(50, 60, RD, 22), False)
    fs.setlk(CTX, node, fh, OWNER_B, Lock(100, 200, WR, 22), False)
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh, OWNER_A, Lock(150, 150, RD, 11), False)


def test_getlk_reports_the_conflicting_lock_and_its_guest_pid(fs):
    node, fh = opened(fs)
    assert fs.getlk(CTX, node, fh, OWNER_B, whole(WR)).type == UN
    fs.setlk(CTX, node, fh, OWNER_A, Lock(10, 19, WR, 11), False)
    got = fs.getlk(CTX, node, fh, OWNER_B, Lock(0, 100, RD, 22))
    assert (got.start, got.end, got.type, got.pid) == (10, 19, WR, 11)
    # An owner never conflicts with itself.
    assert fs.getlk(CTX, node, fh, OWNER_A, whole(WR)).type == UN
    fs.setlk(CTX, node, fh, OWNER_A, Lock(10, 19, UN), False)
    fs.setlk(CTX, node, fh, OWNER_A, Lock(5, OFFSET_MAX, RD, 11), False)
    got = fs.getlk(CTX, node, fh, OWNER_B, whole(WR))
    assert (got.start, got.end, got.type, got.pid) == (5, OFFSET_MAX, RD, 11)


def test_locks_conflict_with_host_processes(fs, share):
    node, fh = opened(fs)
    with open(share / "f", "r+b") as host:
        fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh, OWNER_A, Lock(0, 9, WR), False)
        got = fs.getlk(CTX, node, fh, OWNER_A, whole(RD))
        assert (got.start, got.end, got.type, got.pid) == (0, 9, WR, 0)
        fcntl.lockf(host, fcntl.LOCK_UN, 10, 0)
    fs.setlk(CTX, node, fh, OWNER_A, Lock(0, 9, WR), False)
    with open(share / "f", "r+b") as host:
        with pytest.raises(OSError) as ei:
            fcntl.lockf(host, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 5)
        assert ei.value.errno in (errno.EAGAIN, errno.EACCES)


def test_locks_follow_the_owner_across_handles_and_flush_drops_them(fs):
    node, fh1 = opened(fs)
    _, fh2 = opened(fs)
    fs.setlk(CTX, node, fh1, OWNER_A, whole(WR), False)
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh2, OWNER_B, whole(RD), False)
    # Owner A unlocks through its other handle: POSIX locks belong to the process, not to the fd.
    fs.setlk(CTX, node, fh2, OWNER_A, whole(UN), False)
    fs.setlk(CTX, node, fh2, OWNER_B, whole(RD), False)
    fs.setlk(CTX, node, fh1, OWNER_A, Lock(0, 0, RD), False)
    # A close(2) by owner B, through either handle, drops all of B's locks on the file.
    fs.flush(CTX, node, fh1, OWNER_B)
    fs.setlk(CTX, node, fh2, OWNER_A, whole(WR), False)
    fs.flush(CTX, node, fh2, OWNER_A)
    fs.setlk(CTX, node, fh1, OWNER_B, whole(WR), False)
    assert len(fs._locks) == 1


def test_release_drops_the_owners_still_holding_locks_through_the_handle(fs):
    node, fh1 = opened(fs)
    _, fh2 = opened(fs)
    # The guest's own OFD locks: the owner is the open file, and no FLUSH carries that owner.
    fs.setlk(CTX, node, fh1, 0xF11E, whole(WR), False)
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh2, OWNER_B, whole(WR), False)
    fs.release(CTX, node, fh1, 0)
    fs.setlk(CTX, node, fh2, OWNER_B, whole(WR), False)
    fs.destroy()
    assert len(fs._locks) == 0


def test_unlock_without_locks_and_bad_requests(fs, share):
    node, fh = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, whole(UN), False)
    assert len(fs._locks) == 0  # unlocking nothing opens nothing
    raises_errno(errno.EINVAL, fs.setlk, CTX, node, fh, OWNER_A, Lock(10, 9, WR), False)
    raises_errno(errno.EINVAL, fs.setlk, CTX, node, fh, OWNER_A, Lock(0, 1 << 63, WR), False)
    raises_errno(errno.EINVAL, fs.setlk, CTX, node, fh, OWNER_A, Lock(0, 1, 7), False)
    raises_errno(errno.EBADF, fs.setlk, CTX, node, 999, OWNER_A, whole(WR), False)
    (share / "d").mkdir()
    d = fs.lookup(CTX, ROOT_ID, b"d").nodeid
    dfh = fs.opendir(CTX, d, os.O_RDONLY).fh
    raises_errno(errno.EBADF, fs.setlk, CTX, d, dfh, OWNER_A, whole(RD), False)


def test_read_only_handle_takes_read_locks(fs, share):
    (share / "ro").write_bytes(b"x")
    node = fs.lookup(CTX, ROOT_ID, b"ro").nodeid
    fh = fs.open(CTX, node, os.O_RDONLY).fh
    fs.setlk(CTX, node, fh, OWNER_A, whole(RD), False)
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh, OWNER_B, whole(WR), False)


def in_thread(call, *args) -> tuple[threading.Thread, list[object]]:
    """Runs call(*args) on a thread of its own: its result ("done") or OSError lands in the list."""
    result: list[object] = []

    def run() -> None:
        try:
            call(*args)
            result.append("done")
        except OSError as exc:
            result.append(exc.errno)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def waiting_ctx() -> Context:
    return Context(CTX.uid, CTX.gid, CTX.pid, threading.Event())


def test_setlkw_waits_for_the_holder_without_holding_other_calls(fs):
    node, fh = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, whole(WR), False)
    waiting = threading.Event()
    result: list[object] = []

    def waiter() -> None:
        waiting.set()
        try:
            fs.setlk(CTX, node, fh, OWNER_B, whole(WR), True)
            result.append("locked")
        except OSError as exc:
            result.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    waiting.wait()
    # Other calls, including the holder's unlock, go on while the waiter waits.
    assert fs.getattr(CTX, node, None)[0].st_size == 0
    fs.setlk(CTX, node, fh, OWNER_A, whole(UN), False)
    t.join()
    assert result == ["locked"]
    raises_errno(errno.EAGAIN, fs.setlk, CTX, node, fh, OWNER_A, whole(RD), False)


def test_interrupted_setlkw_answers_eintr_and_takes_nothing(fs, share):
    node, fh = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, whole(WR), False)
    ctx = waiting_ctx()
    ctx.interrupt.set()
    raises_errno(errno.EINTR, fs.setlk, ctx, node, fh, OWNER_B, whole(RD), True)
    # Interrupted while it waits, from another thread.
    ctx = waiting_ctx()
    t, result = in_thread(fs.setlk, ctx, node, fh, OWNER_B, whole(RD), True)
    assert fs.getattr(CTX, node, None)[0].st_size == 0
    ctx.interrupt.set()
    t.join()
    assert result == [errno.EINTR]
    fs.setlk(CTX, node, fh, OWNER_A, whole(UN), False)
    with open(share / "f", "rb+") as host:  # B holds nothing
        fcntl.fcntl(host, F_OFD_SETLK, FLOCK.pack(WR, os.SEEK_SET, 0, 0, 0))


@pytest.mark.parametrize("how", ["flush", "release", "destroy"])
def test_dropping_the_owner_ends_its_wait_with_ebadf(fs, how):
    node, fh = opened(fs)
    _, fh_b = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, whole(WR), False)
    t, result = in_thread(fs.setlk, waiting_ctx(), node, fh_b, OWNER_B, whole(WR), True)
    # The owner's description exists once its request is under way; it is then dropped from under it.
    while len(fs._locks) < 2:
        time.sleep(0.001)
    if how == "flush":
        fs.flush(CTX, node, fh_b, OWNER_B)
    elif how == "release":
        fs.release(CTX, node, fh_b, 0)
    else:
        fs.destroy()
    t.join()
    assert result == [errno.EBADF]


def test_lock_wait_caps_a_blocking_request_with_edeadlk(make):
    fs = make(lock_wait=0.02)
    node, fh = opened(fs)
    fs.setlk(CTX, node, fh, OWNER_A, whole(WR), False)
    raises_errno(errno.EDEADLK, fs.setlk, CTX, node, fh, OWNER_B, whole(RD), True)


def test_locks_disabled_answer_enosys(make):
    fs = make(posix_lock=False, flock=False)
    node, fh = opened(fs)
    raises_errno(errno.ENOSYS, fs.setlk, CTX, node, fh, OWNER_A, whole(WR), False)
    raises_errno(errno.ENOSYS, fs.getlk, CTX, node, fh, OWNER_A, whole(WR))
    raises_errno(errno.ENOSYS, fs.flock, CTX, node, fh, OWNER_A, WR, False)


# -- flock ---------------------------------------------------------------------------------------------

def test_flock_belongs_to_the_open_file(fs, share):
    node, fh1 = opened(fs)
    _, fh2 = opened(fs)
    fs.flock(CTX, node, fh1, 1, WR, False)
    fs.flock(CTX, node, fh1, 1, WR, False)  # the same open file may take it again
    raises_errno(errno.EAGAIN, fs.flock, CTX, node, fh2, 2, RD, False)
    with open(share / "f", "rb") as host:
        with pytest.raises(BlockingIOError):
            fcntl.flock(host, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fs.flock(CTX, node, fh1, 1, RD, False)
    fs.flock(CTX, node, fh2, 2, RD, False)
    raises_errno(errno.EINVAL, fs.flock, CTX, node, fh2, 2, 9, False)
    fs.release(CTX, node, fh1, 0)
    fs.flock(CTX, node, fh2, 2, UN, False)
    with open(share / "f", "rb") as host:
        fcntl.flock(host, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_flock_wait_ends_on_unlock_interrupt_or_release(fs):
    node, fh1 = opened(fs)
    _, fh2 = opened(fs)
    fs.flock(CTX, node, fh1, 1, WR, False)
    t, result = in_thread(fs.flock, waiting_ctx(), node, fh2, 2, WR, True)
    fs.flock(CTX, node, fh1, 1, UN, False)
    t.join()
    assert result == ["done"]
    ctx = waiting_ctx()
    t, result = in_thread(fs.flock, ctx, node, fh1, 1, RD, True)
    ctx.interrupt.set()
    t.join()
    assert result == [errno.EINTR]
    t, result = in_thread(fs.flock, waiting_ctx(), node, fh1, 1, RD, True)
    while not fs._locks._flock_waits:
        time.sleep(0.001)
    fs.release(CTX, node, fh1, 0)
    t.join()
    assert result == [errno.EBADF]


# -- O_TMPFILE -------------------------------------------------------------------------------------------

def test_tmpfile_is_unnamed_until_linked(fs, share):
    (share / "d").mkdir()
    d = fs.lookup(CTX, ROOT_ID, b"d").nodeid
    entry, handle = fs.tmpfile(CTX, d, 0o640, os.O_RDWR, 0o022)
    assert entry.attr.st_nlink == 0 and oct(entry.attr.st_mode & 0o777) == oct(0o640)
    assert fs.write(CTX, entry.nodeid, handle.fh, 0, b"later", 0) == 5
    assert os.listdir(share / "d") == []
    fs.link(CTX, entry.nodeid, d, b"named")
    assert (share / "d" / "named").read_bytes() == b"later"
    raises_errno(errno.ENOTDIR, fs.tmpfile, CTX, fs.lookup(CTX, d, b"named").nodeid, 0o600, os.O_RDWR, 0)


def test_tmpfile_readonly(make):
    fs = make(readonly=True)
    raises_errno(errno.EROFS, fs.tmpfile, CTX, ROOT_ID, 0o600, os.O_RDWR, 0)


# -- through the FUSE server -----------------------------------------------------------------------------

class Server:
    """FuseServer.handle with hand-built requests from uid 0 (the share belongs to root)."""

    def __init__(self, fs: Passthrough) -> None:
        self.server = FuseServer(fs)
        self.unique = 0

    def call(self, opcode: int, body: bytes = b"", nodeid: int = ROOT_ID,
             reply: bool = True) -> tuple[int, bytes]:
        """(errno, reply body); with `reply` False, checks that no reply was written (FORGET)."""
        self.unique += 1
        data = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 4242, 0, 0) + body
        out = bytearray(1 << 16)
        n = self.server.handle(Reader([memoryview(bytearray(data))]), Writer([memoryview(out)]))
        if not reply:
            assert n == 0 and not any(out)
            return 0, b""
        length, error, unique = abi.OUT_HEADER.unpack_from(out)
        assert n == length and unique == self.unique
        return -error, bytes(out[16:n])

    def init(self, flags: int) -> int:
        err, body = self.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, 38, 1 << 17, flags | abi.FUSE_INIT_EXT, 0))
        assert err == 0
        return abi.INIT_OUT.unpack(body)[3]

    def lk(self, opcode: int, fh: int, owner: int, start: int, end: int, kind: int, pid: int = 0,
           flags: int = 0, nodeid: int = 2) -> tuple[int, bytes]:
        return self.call(opcode, abi.LK_IN.pack(fh, owner, start, end, kind, pid, flags), nodeid)


LOCK_FLAGS = abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS


@pytest.mark.parametrize("posix_lock, flock", [(True, True), (False, False), (True, False)])
def test_init_wants_lock_flags_only_when_enabled(make, posix_lock, flock):
    srv = Server(make(posix_lock=posix_lock, flock=flock))
    flags = srv.init(DEFAULT_WANT | LOCK_FLAGS)
    assert bool(flags & abi.FUSE_POSIX_LOCKS) == posix_lock
    assert bool(flags & abi.FUSE_FLOCK_LOCKS) == flock
    conn = ConnectionInfo(7, 38, LOCK_FLAGS, 0, 4096, 0, 1)
    make(posix_lock=posix_lock, flock=flock).init(conn)
    assert conn.want == (abi.FUSE_POSIX_LOCKS if posix_lock else 0) | (abi.FUSE_FLOCK_LOCKS if flock else 0)


def test_server_getlk_setlk_flush_release(fs):
    srv = Server(fs)
    srv.init(DEFAULT_WANT | LOCK_FLAGS)
    node, fh = opened(fs)
    _, fh2 = opened(fs)
    assert node == 2
    assert srv.lk(abi.FUSE_SETLK, fh, OWNER_A, 0, 99, WR, pid=11) == (0, b"")
    assert srv.lk(abi.FUSE_SETLK, fh2, OWNER_B, 0, 0, RD)[0] == errno.EAGAIN
    err, body = srv.lk(abi.FUSE_GETLK, fh2, OWNER_B, 0, OFFSET_MAX, RD, pid=22)
    assert err == 0 and abi.LK_OUT.unpack(body) == (0, 99, WR, 11)
    assert srv.lk(abi.FUSE_SETLKW, fh, OWNER_B, 10, 5, RD)[0] == errno.EINVAL
    assert srv.lk(abi.FUSE_SETLK, 12345, OWNER_B, 0, 0, RD)[0] == errno.EBADF
    # FLUSH with owner A (a close(2) in that guest process) frees the range for owner B.
    assert srv.call(abi.FUSE_FLUSH, abi.FLUSH_IN.pack(fh, OWNER_A), node) == (0, b"")
    assert srv.lk(abi.FUSE_SETLK, fh2, OWNER_B, 0, 0, WR) == (0, b"")
    err, body = srv.lk(abi.FUSE_GETLK, fh, OWNER_A, 0, OFFSET_MAX, WR)
    assert abi.LK_OUT.unpack(body)[2] == WR
    assert srv.call(abi.FUSE_SETLK, b"short", node)[0] == errno.EINVAL


def test_server_flock_and_release_with_flock_unlock(fs, share):
    srv = Server(fs)
    srv.init(DEFAULT_WANT | LOCK_FLAGS)
    node, fh = opened(fs)
    _, fh2 = opened(fs)
    # flock(2) arrives as SETLK(W) with FUSE_LK_FLOCK over the whole file.
    assert srv.lk(abi.FUSE_SETLK, fh, 1, 0, OFFSET_MAX, WR, flags=abi.FUSE_LK_FLOCK) == (0, b"")
    assert srv.lk(abi.FUSE_SETLK, fh2, 2, 0, OFFSET_MAX, RD, flags=abi.FUSE_LK_FLOCK)[0] == errno.EAGAIN
    # POSIX locks and flock locks are independent, as on Linux.
    assert srv.lk(abi.FUSE_SETLK, fh2, 2, 0, OFFSET_MAX, WR) == (0, b"")
    # A handle still used by another request keeps its fd after RELEASE; the explicit unlock asked
    # by FUSE_RELEASE_FLOCK_UNLOCK frees the flock all the same.
    with fs._handles.use(fh):
        body = abi.RELEASE_IN.pack(fh, os.O_RDWR, abi.FUSE_RELEASE_FLOCK_UNLOCK, 1)
        assert srv.call(abi.FUSE_RELEASE, body, node) == (0, b"")
        assert srv.lk(abi.FUSE_SETLK, fh2, 2, 0, OFFSET_MAX, WR, flags=abi.FUSE_LK_FLOCK) == (0, b"")


def test_server_tmpfile_then_link(fs, share):
    srv = Server(fs)
    srv.init(DEFAULT_WANT)
    err, body = srv.call(abi.FUSE_TMPFILE, abi.CREATE_IN.pack(os.O_RDWR, 0o100600, 0o022, 0) + b"/\0")
    assert err == 0 and len(body) == abi.ENTRY_OUT.size + abi.OPEN_OUT.size
    nodeid = abi.ENTRY_OUT.unpack_from(body)[0]
    fh = abi.OPEN_OUT.unpack_from(body, abi.ENTRY_OUT.size)[0]
    err, _ = srv.call(abi.FUSE_WRITE, abi.WRITE_IN.pack(fh, 0, 3, 0, 0, 0) + b"abc", nodeid)
    assert err == 0 and os.listdir(share) == []
    err, _ = srv.call(abi.FUSE_LINK, abi.LINK_IN.pack(nodeid) + b"kept\0")
    assert err == 0 and (share / "kept").read_bytes() == b"abc"
    assert srv.call(abi.FUSE_TMPFILE, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0) + b"/")[0] == errno.EINVAL
    assert srv.call(abi.FUSE_TMPFILE, abi.CREATE_IN.pack(os.O_RDWR, 0o600, 0, 0) + b"/\0",
                    nodeid)[0] == errno.ENOTDIR
