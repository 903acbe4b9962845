"""FUSE passthrough in the server and the passthrough file system, with a recording backing registry.

The kernel side (FUSE_DEV_IOC_BACKING_OPEN on a real mount) is in tests/integration/test_fuse_fast.py;
here the INIT negotiation, the open replies and the per-node bookkeeping are checked byte by byte.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from vhostfs import seccomp
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi, fusedev
from vhostfs.fuse.server import DEFAULT_WANT, FuseServer
from vhostfs.iov import Reader, Writer

OFFERED = DEFAULT_WANT | abi.FUSE_INIT_EXT | abi.FUSE_WRITEBACK_CACHE
PASSTHROUGH_HI = abi.FUSE_PASSTHROUGH >> 32


class Recorder:
    """A BackingFiles that hands out ids as the kernel does (lowest free, from 1) and records calls."""

    max_stack_depth = 1

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.nodes: dict[int, list[int]] = {}
        self.handles: set[tuple[int, int]] = set()
        self.opened: list[tuple[int, int, int]] = []
        self.closed: list[int] = []

    def open(self, nodeid: int, fh: int, fd: int) -> int | None:
        self.opened.append((nodeid, fh, fd))
        os.fstat(fd)  # the fd is open while the transport registers it
        if self.refuse:
            return None
        entry = self.nodes.get(nodeid)
        if entry is None:
            used = {e[0] for e in self.nodes.values()}
            entry = self.nodes[nodeid] = [min(set(range(1, len(used) + 2)) - used), 0]
        entry[1] += 1
        self.handles.add((nodeid, fh))
        return entry[0]

    def release(self, nodeid: int, fh: int) -> None:
        if (nodeid, fh) not in self.handles:
            return
        self.handles.discard((nodeid, fh))
        entry = self.nodes[nodeid]
        entry[1] -= 1
        if not entry[1]:
            del self.nodes[nodeid]
            self.closed.append(entry[0])

    def clear(self) -> None:
        self.closed.extend(e[0] for e in self.nodes.values())
        self.nodes.clear()
        self.handles.clear()


class Srv:
    def __init__(self, fs: Passthrough, backing: Recorder | None) -> None:
        self.server = FuseServer(fs, backing=backing)
        self.unique = 0

    def call(self, opcode: int, body: bytes = b"", nodeid: int = abi.ROOT_ID) -> tuple[int, bytes]:
        self.unique += 1
        data = abi.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, 4242, 0, 0) + body
        out = bytearray(1 << 16)
        n = self.server.handle(Reader([memoryview(bytearray(data))]), Writer([memoryview(out)]))
        length, error, _ = abi.OUT_HEADER.unpack_from(out)
        assert n == length
        return -error, bytes(out[16:n])

    def init(self, flags: int = OFFERED, flags2: int = PASSTHROUGH_HI) -> tuple:
        err, body = self.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, 40, 1 << 17, flags, flags2))
        assert err == 0
        return abi.INIT_OUT.unpack(body)

    def lookup(self, name: bytes) -> int:
        err, body = self.call(abi.FUSE_LOOKUP, name + b"\0")
        assert err == 0
        return abi.ENTRY_OUT.unpack(body)[0]

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> tuple[int, int, int]:
        """(fh, open_flags, backing_id)"""
        err, body = self.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(flags, 0), nodeid)
        assert err == 0, os.strerror(err)
        return abi.OPEN_OUT.unpack(body)

    def create(self, name: bytes, flags: int = os.O_RDWR) -> tuple[int, int, int, int]:
        """(nodeid, fh, open_flags, backing_id)"""
        err, body = self.call(abi.FUSE_CREATE, abi.CREATE_IN.pack(flags, 0o100644, 0, 0) + name + b"\0")
        assert err == 0, os.strerror(err)
        return (abi.ENTRY_OUT.unpack_from(body)[0], *abi.OPEN_OUT.unpack_from(body, abi.ENTRY_OUT.size))

    def release(self, nodeid: int, fh: int) -> None:
        assert self.call(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)[0] == 0


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"data")
    return d


def make(share: Path, backing: Recorder | None = None, **opts) -> tuple[Srv, Passthrough]:
    fs = Passthrough(str(share), **opts)
    return Srv(fs, backing), fs


def test_init_negotiates_passthrough_and_the_stack_depth_with_a_backing(share):
    srv, fs = make(share, Recorder())
    out = srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    flags2, max_stack_depth = out[10], out[11]
    assert flags2 & PASSTHROUGH_HI and max_stack_depth == 1
    fs.close()


@pytest.mark.parametrize("backing, opts, offered2", [
    (None, {}, PASSTHROUGH_HI),                       # a transport without backing files (virtio-fs)
    (Recorder(), {}, 0),                              # a kernel without FUSE_PASSTHROUGH
    (Recorder(), {"cache": "never"}, PASSTHROUGH_HI),  # direct I/O promised
    (Recorder(), {"writeback": True}, PASSTHROUGH_HI),  # the kernel refuses both together
    (Recorder(), {"killpriv_v2": True}, PASSTHROUGH_HI),
    (Recorder(), {"xattr": True, "xattrmap": ":map::user.virtiofs.:"}, PASSTHROUGH_HI),
    (Recorder(), {"passthrough": False}, PASSTHROUGH_HI),
])
def test_no_passthrough_where_it_cannot_or_must_not(share, backing, opts, offered2):
    srv, fs = make(share, backing, **opts)
    out = srv.init(flags2=offered2)
    assert not out[10] & PASSTHROUGH_HI and out[11] == 0
    fh, open_flags, backing_id = srv.open(srv.lookup(b"f"))
    assert not open_flags & abi.FOPEN_PASSTHROUGH and backing_id == 0
    assert backing is None or not backing.opened
    fs.close()


def test_opens_of_one_node_share_its_backing_id_until_the_last_release(share):
    rec = Recorder()
    srv, fs = make(share, rec)
    srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    node = srv.lookup(b"f")
    fh1, flags1, id1 = srv.open(node, os.O_RDONLY)
    fh2, flags2, id2 = srv.open(node, os.O_WRONLY)
    other, fh3, flags3, id3 = srv.create(b"g")
    assert flags1 & flags2 & flags3 & abi.FOPEN_PASSTHROUGH
    assert id1 == id2 == 1 and id3 == 2
    srv.release(node, fh1)
    assert rec.closed == []
    srv.release(node, fh2)
    assert rec.closed == [1]
    srv.release(other, fh3)
    assert rec.closed == [1, 2]
    # The ids are free again: a new open gets the lowest.
    assert srv.open(node)[2] == 1
    fs.close()


def test_a_refused_backing_file_is_served_by_the_daemon(share):
    srv, fs = make(share, Recorder(refuse=True))
    srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    node = srv.lookup(b"f")
    fh, open_flags, backing_id = srv.open(node)
    assert not open_flags & abi.FOPEN_PASSTHROUGH and backing_id == 0
    err, body = srv.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 100, 0, 0, 0), node)
    assert err == 0 and body == b"data"
    fs.close()


def test_o_direct_is_served_and_the_first_open_decides_for_the_node(share):
    srv, fs = make(share, Recorder())
    srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    node = srv.lookup(b"f")
    fh1, flags1, _ = srv.open(node, os.O_RDWR | os.O_DIRECT)
    assert not flags1 & abi.FOPEN_PASSTHROUGH
    # Still open without passthrough: the kernel would refuse a passed-through open next to it.
    fh2, flags2, _ = srv.open(node)
    assert not flags2 & abi.FOPEN_PASSTHROUGH
    srv.release(node, fh1)
    srv.release(node, fh2)
    fh3, flags3, _ = srv.open(node)
    assert flags3 & abi.FOPEN_PASSTHROUGH
    # And now an O_DIRECT open joins the passed-through ones.
    assert srv.open(node, os.O_RDWR | os.O_DIRECT)[1] & abi.FOPEN_PASSTHROUGH
    fs.close()


def test_o_direct_is_passed_through_with_allow_direct_io(share):
    srv, fs = make(share, Recorder(), allow_direct_io=True)
    srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    assert srv.open(srv.lookup(b"f"), os.O_RDWR | os.O_DIRECT)[1] & abi.FOPEN_PASSTHROUGH
    fs.close()


def test_the_session_end_forgets_every_backing_id(share):
    rec = Recorder()
    srv, fs = make(share, rec)
    srv.init(flags=OFFERED & ~abi.FUSE_WRITEBACK_CACHE)
    srv.open(srv.lookup(b"f"))
    srv.server.reset()
    assert rec.closed == [1] and not rec.nodes
    assert stat.S_ISREG(os.stat(share / "f").st_mode)
    fs.close()


# -- the /dev/fuse transport's Backing, with the ioctls recorded -----------------------------------

class Kernel:
    """fcntl.ioctl for FUSE_DEV_IOC_BACKING_OPEN/CLOSE: refuses while `refuse` is set, else hands out ids."""

    def __init__(self) -> None:
        self.refuse: int | None = None
        self.open: dict[int, int] = {}  # backing id -> fd
        self.calls: list[str] = []
        self.next = 1

    def ioctl(self, fd: int, request: int, arg: bytes | bytearray) -> int:
        if request == fusedev.FUSE_DEV_IOC_BACKING_OPEN:
            self.calls.append("open")
            map_fd, flags, padding = fusedev.BACKING_MAP.unpack(bytes(arg))
            assert (flags, padding) == (0, 0)
            if self.refuse is not None:
                raise OSError(self.refuse, os.strerror(self.refuse))
            self.open[self.next] = map_fd
            self.next += 1
            return self.next - 1
        assert request == fusedev.FUSE_DEV_IOC_BACKING_CLOSE
        self.calls.append("close")
        (backing_id,) = fusedev.BACKING_ID.unpack(bytes(arg))
        del self.open[backing_id]
        return 0


@pytest.fixture
def kernel(monkeypatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(fusedev.fcntl, "ioctl", k.ioctl)
    return k


def test_backing_ids_per_node_closed_with_the_last_handle(kernel):
    b = fusedev.Backing(99)
    assert b.open(5, 1, 10) == 1 and b.open(5, 2, 11) == 1 and b.open(6, 3, 12) == 2
    assert kernel.open == {1: 10, 2: 12} and len(b) == 2
    b.release(5, 1)
    assert kernel.open == {1: 10, 2: 12}
    b.release(6, 2)  # another node's fh: ignored (fhs need only be unique per node)
    assert kernel.open == {1: 10, 2: 12}
    b.release(5, 2)
    b.release(5, 2)  # twice: ignored
    assert kernel.open == {2: 12}
    b.clear()
    assert kernel.open == {} and len(b) == 0


def test_a_refused_node_stays_served_until_its_handles_are_gone(kernel, caplog):
    b = fusedev.Backing(99)
    kernel.refuse = errno.ENOMEM
    assert b.open(5, 1, 10) is None
    kernel.refuse = None
    # The kernel would refuse a passed-through open next to the served one: no second try.
    assert b.open(5, 2, 10) is None and kernel.calls == ["open"]
    assert b.open(6, 3, 12) == 1
    b.release(5, 1)
    b.release(5, 2)
    assert b.open(5, 4, 10) == 2
    assert len([r for r in caplog.records if "refused a backing file" in r.getMessage()]) == 1


def test_eperm_turns_registration_off_for_the_session(kernel):
    b = fusedev.Backing(99)
    kernel.refuse = errno.EPERM
    assert b.open(5, 1, 10) is None
    kernel.refuse = None
    assert b.open(6, 2, 11) is None and kernel.calls == ["open"]


def test_the_seccomp_list_lets_the_backing_ioctls_through():
    assert "ioctl" in seccomp.SYSCALLS_X86_64  # on the list without argument checks
