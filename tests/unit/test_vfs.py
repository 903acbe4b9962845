"""The Vfs through FuseServer.handle: node id mapping, the pseudo tree, (un)mounting, negotiation."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_passthrough_locks import Server
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fs.vfs import INNER_MASK, TAG_SHIFT, MountOptions, Vfs, VfsOptions, split_path
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import ROOT_ID, ConnectionInfo, Entry, Filesystem, Stat
from vhostfs.fuse.server import DEFAULT_WANT


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def dirs(tmp_path: Path):
    made = []
    for name in ("one", "two", "three"):
        d = tmp_path / name
        d.mkdir()
        (d / "file").write_bytes(name.encode() * 3)
        (d / "sub").mkdir()
        made.append(d)
    return made


@pytest.fixture
def vfs():
    v = Vfs()
    yield v
    v.close()


def lookup(srv: Server, parent: int, name: bytes) -> tuple:
    err, body = srv.call(abi.FUSE_LOOKUP, name + b"\0", parent)
    if err:
        raise OSError(err, os.strerror(err))
    return abi.ENTRY_OUT.unpack(body)


def getattr_(srv: Server, nodeid: int) -> tuple:
    err, body = srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), nodeid)
    if err:
        raise OSError(err, os.strerror(err))
    return abi.ATTR_OUT.unpack(body)


def open_read(srv: Server, nodeid: int, size: int = 100) -> tuple[int, bytes]:
    err, body = srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
    assert err == 0
    fh = abi.OPEN_OUT.unpack(body)[0]
    err, data = srv.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, size, 0, 0, os.O_RDONLY), nodeid)
    assert err == 0
    return fh, data


def readdir_names(srv: Server, nodeid: int) -> list[bytes]:
    err, body = srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), nodeid)
    assert err == 0
    fh = abi.OPEN_OUT.unpack(body)[0]
    err, data = srv.call(abi.FUSE_READDIR, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0), nodeid)
    assert err == 0
    names, pos = [], 0
    while pos < len(data):
        _, _, namelen, _ = abi.DIRENT.unpack_from(data, pos)
        names.append(data[pos + abi.DIRENT.size:pos + abi.DIRENT.size + namelen])
        pos += (abi.DIRENT.size + namelen + 7) & ~7
    srv.call(abi.FUSE_RELEASEDIR, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)
    return names


# -- paths ------------------------------------------------------------------------------------------
def test_split_path():
    assert split_path("/") == ()
    assert split_path("/a/b") == (b"a", b"b")
    assert split_path("//a//b/") == (b"a", b"b")
    for bad in ("a/b", "", "/a/../b", "/..", "/a/.", "/a\0b", "/" + "x" * 5000):
        with pytest.raises(OSError) as e:
            split_path(bad)
        assert e.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as e:
        split_path("/" + "x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG


# -- node ids and the pseudo tree -------------------------------------------------------------------
def test_node_ids_carry_the_mount_tag(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    vfs.mount(Passthrough(str(dirs[1])), "/b/c")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    b = lookup(srv, ROOT_ID, b"b")[0]
    c = lookup(srv, b, b"c")[0]
    # Pseudo directories live in tag 0; each mount's root is its tag with inner node id 1.
    assert b >> TAG_SHIFT == 0 and b != ROOT_ID
    assert a & INNER_MASK == ROOT_ID and c & INNER_MASK == ROOT_ID
    assert a >> TAG_SHIFT != c >> TAG_SHIFT and a >> TAG_SHIFT and c >> TAG_SHIFT
    fa = lookup(srv, a, b"file")
    fc = lookup(srv, c, b"file")
    assert fa[0] >> TAG_SHIFT == a >> TAG_SHIFT and fc[0] >> TAG_SHIFT == c >> TAG_SHIFT
    # The same inner node id (2, each passthrough's first) in both mounts, different client ids.
    assert fa[0] & INNER_MASK == fc[0] & INNER_MASK
    assert open_read(srv, fa[0])[1] == b"oneoneone"
    assert open_read(srv, fc[0])[1] == b"twotwotwo"
    # Without FUSE_SUBMOUNTS the inode numbers carry the tag too, so none collide.
    inos = {getattr_(srv, n)[2] for n in (ROOT_ID, a, b, c, fa[0], fc[0])}
    assert len(inos) == 6
    assert getattr_(srv, fa[0])[2] == os.stat(dirs[0] / "file").st_ino ^ (a >> TAG_SHIFT << TAG_SHIFT)
    # ".." of a mount's root is the pseudo directory it is mounted in.
    assert lookup(srv, c, b"..")[0] == b
    assert lookup(srv, b, b"..")[0] == ROOT_ID


def test_submounts_when_the_client_offers_them(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    vfs.mount(Passthrough(str(dirs[1])), "/b", options=MountOptions(submount=False))
    srv = Server(vfs)
    srv.init(DEFAULT_WANT | abi.FUSE_SUBMOUNTS)
    a = lookup(srv, ROOT_ID, b"a")
    b = lookup(srv, ROOT_ID, b"b")
    attr_flags = len(abi.ENTRY_OUT.format) - 2  # fuse_attr.flags is the entry's last field
    assert a[attr_flags] & abi.FUSE_ATTR_SUBMOUNT
    assert not b[attr_flags] & abi.FUSE_ATTR_SUBMOUNT
    # In a submount inode numbers are the file system's own (it has its own st_dev in the client).
    st = os.stat(dirs[0] / "file")
    assert getattr_(srv, lookup(srv, a[0], b"file")[0])[2] == st.st_ino
    assert getattr_(srv, lookup(srv, b[0], b"file")[0])[2] != os.stat(dirs[1] / "file").st_ino


def test_pseudo_tree_follows_mounts(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/x/y/z")
    vfs.mount(Passthrough(str(dirs[1])), "/x/w")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    x = lookup(srv, ROOT_ID, b"x")[0]
    assert sorted(readdir_names(srv, ROOT_ID)) == [b".", b"..", b"x"]
    assert sorted(readdir_names(srv, x)) == [b".", b"..", b"w", b"y"]
    attr = getattr_(srv, x)
    assert stat.S_ISDIR(attr[11]) and attr[11] & 0o777 == 0o555
    # The pseudo tree is read-only.
    err, _ = srv.call(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"new\0", x)
    assert err == errno.EROFS
    vfs.umount("/x/y/z")
    assert sorted(readdir_names(srv, x)) == [b".", b"..", b"w"]
    with pytest.raises(OSError) as e:
        lookup(srv, x, b"y")
    assert e.value.errno == errno.ENOENT
    vfs.umount("/x/w")
    assert sorted(readdir_names(srv, ROOT_ID)) == [b".", b".."]
    # The removed pseudo directory's node id is stale.
    assert srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), x)[0] == errno.ESTALE
    assert vfs.mounts() == []


def test_readdirplus_entries_are_mapped(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    err, body = srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), a)
    fh = abi.OPEN_OUT.unpack(body)[0]
    err, data = srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, 0, 8192, 0, 0, 0), a)
    assert err == 0
    ids, pos = {}, 0
    while pos < len(data):
        entry = abi.ENTRY_OUT.unpack_from(data, pos)
        _, _, namelen, _ = abi.DIRENT.unpack_from(data, pos + abi.ENTRY_OUT.size)
        start = pos + abi.ENTRY_OUT.size + abi.DIRENT.size
        ids[data[start:start + namelen]] = entry[0]
        pos += (abi.ENTRY_OUT.size + abi.DIRENT.size + namelen + 7) & ~7
    assert ids[b"file"] >> TAG_SHIFT == a >> TAG_SHIFT
    assert ids[b"file"] == lookup(srv, a, b"file")[0]


def test_cross_mount_rename_and_link_are_exdev(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    vfs.mount(Passthrough(str(dirs[1])), "/b")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    b = lookup(srv, ROOT_ID, b"b")[0]
    f = lookup(srv, a, b"file")[0]
    assert srv.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(b) + b"file\0moved\0", a)[0] == errno.EXDEV
    assert srv.call(abi.FUSE_LINK, abi.LINK_IN.pack(f) + b"linked\0", b)[0] == errno.EXDEV
    assert srv.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(ROOT_ID) + b"file\0moved\0", a)[0] == errno.EXDEV
    # Within one mount both work.
    assert srv.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(a) + b"file\0moved\0", a)[0] == 0
    assert srv.call(abi.FUSE_LINK, abi.LINK_IN.pack(f) + b"linked\0", a)[0] == 0
    assert (dirs[0] / "moved").exists() and (dirs[0] / "linked").exists()
    assert sorted(p.name for p in dirs[1].iterdir()) == ["file", "sub"]


# -- mounting errors and the limit ------------------------------------------------------------------
def test_mount_errors(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    cases = [("/a", errno.EEXIST), ("/a/sub", errno.ENOTDIR), ("/a/file", errno.ENOTDIR),
             ("/", errno.EBUSY), ("/b/../c", errno.EINVAL), ("relative", errno.EINVAL)]
    for path, err in cases:
        fs = Passthrough(str(dirs[1]))
        with pytest.raises(OSError) as e:
            vfs.mount(fs, path)
        fs.close()
        assert e.value.errno == err, path
    vfs.mount(Passthrough(str(dirs[1])), "/p/q")
    with pytest.raises(OSError) as e:
        vfs.mount(Passthrough(str(dirs[2])), "/p")
    assert e.value.errno == errno.EBUSY
    for path, err in (("/nothing", errno.ENOENT), ("/p", errno.ENOENT), ("/a/..", errno.EINVAL)):
        with pytest.raises(OSError) as e:
            vfs.umount(path)
        assert e.value.errno == err, path
    assert [m.path for m in vfs.mounts()] == ["/a", "/p/q"]


def test_mount_limit(dirs):
    vfs = Vfs(VfsOptions(max_mounts=3))
    for i in range(3):
        vfs.mount(Filesystem(), f"/m{i}")
    with pytest.raises(OSError) as e:
        vfs.mount(Filesystem(), "/m3")
    assert e.value.errno == errno.ENOSPC
    vfs.umount("/m0")
    vfs.mount(Filesystem(), "/m3")
    with pytest.raises(ValueError):
        VfsOptions(max_mounts=0)


def test_root_mount_alone(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    assert getattr_(srv, ROOT_ID)[2] == os.stat(dirs[0]).st_ino
    f = lookup(srv, ROOT_ID, b"file")[0]
    assert f >> TAG_SHIFT and open_read(srv, f)[1] == b"oneoneone"
    assert lookup(srv, ROOT_ID, b".")[0] == ROOT_ID
    sub = lookup(srv, ROOT_ID, b"sub")[0]
    assert lookup(srv, sub, b"..")[0] == ROOT_ID
    with pytest.raises(OSError) as e:
        vfs.mount(Passthrough(str(dirs[1])), "/x")
    assert e.value.errno == errno.ENOTDIR
    srv.call(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(1, 0, 0, 0), f)
    vfs.umount("/")
    assert srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), f)[0] == errno.ESTALE
    assert readdir_names(srv, ROOT_ID) == [b".", b".."]


# -- unmounting -------------------------------------------------------------------------------------
def test_umount_busy_then_forced(vfs, dirs):
    fds = _fds()
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    vfs.mount(Passthrough(str(dirs[1])), "/b")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    f = lookup(srv, a, b"file")[0]
    fh, _ = open_read(srv, f)
    info = {m.path: m for m in vfs.mounts()}["/a"]
    assert info.counters["open_handles"] == 1 and info.counters["handles"] == 1
    with pytest.raises(OSError) as e:
        vfs.umount("/a")
    assert e.value.errno == errno.EBUSY
    assert open_read(srv, f)[1] == b"oneoneone"
    vfs.umount("/a", force=True)
    # Every later request on the old node ids and handle: ESTALE; the calls without answer succeed.
    assert srv.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0), f)[0] == errno.ESTALE
    assert srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), a)[0] == errno.ESTALE
    assert srv.call(abi.FUSE_LOOKUP, b"file\0", a)[0] == errno.ESTALE
    assert srv.call(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), f)[0] == 0
    srv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), f, reply=False)
    # A new mount at the same place gets another tag: the old ids still name nothing.
    vfs.mount(Passthrough(str(dirs[2])), "/a")
    a2 = lookup(srv, ROOT_ID, b"a")[0]
    assert a2 != a and a2 >> TAG_SHIFT != a >> TAG_SHIFT
    f2 = lookup(srv, a2, b"file")[0]
    assert f2 & INNER_MASK == f & INNER_MASK
    assert srv.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 10, 0, 0, 0), f)[0] == errno.ESTALE
    assert open_read(srv, f2)[1] == b"threethreethree"
    vfs.umount("/a", force=True)
    vfs.umount("/b")
    assert _fds() == fds


def test_tags_are_not_reused_at_once(vfs):
    seen = set()
    for _ in range(50):
        vfs.mount(Filesystem(), "/m")
        m = vfs._by_path[(b"m",)]
        assert m.tag not in seen
        seen.add(m.tag)
        vfs.umount("/m")


# -- negotiation ------------------------------------------------------------------------------------
class Recorder(Filesystem):
    """Records the ConnectionInfo of init and asks for `wants`."""

    def __init__(self, wants: int = 0) -> None:
        self.wants = wants
        self.conns: list[ConnectionInfo] = []

    def init(self, conn: ConnectionInfo) -> None:
        self.conns.append(replace(conn))
        conn.want |= self.wants

    def getattr(self, ctx, nodeid, fh):
        return Stat(st_ino=nodeid, st_mode=stat.S_IFDIR | 0o755), 1.0

    def open(self, ctx, nodeid, flags):
        raise AssertionError("open must not be called with no_open")

    def lookup(self, ctx, parent, name):
        if name == b"huge":
            return Entry(1 << TAG_SHIFT, Stat(st_ino=9, st_mode=stat.S_IFREG))
        return Entry(5, Stat(st_ino=5, st_mode=stat.S_IFREG | 0o644))


def test_negotiation_once_and_each_fs_told():
    early = Recorder(wants=abi.FUSE_POSIX_LOCKS)
    vfs = Vfs(VfsOptions(writeback=True, killpriv_v2=True, offer=~abi.FUSE_FLOCK_LOCKS))
    vfs.mount(early, "/early")
    srv = Server(vfs)
    flags = srv.init(DEFAULT_WANT | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS
                     | abi.FUSE_HANDLE_KILLPRIV_V2)
    assert flags & abi.FUSE_WRITEBACK_CACHE and flags & abi.FUSE_POSIX_LOCKS
    assert flags & abi.FUSE_HANDLE_KILLPRIV_V2
    assert early.conns and early.conns[0].want & abi.FUSE_WRITEBACK_CACHE
    # A file system mounted while the session runs is told the agreement; what it adds is not agreed.
    late = Recorder(wants=abi.FUSE_FLOCK_LOCKS)
    vfs.mount(late, "/late")
    (conn,) = late.conns
    assert conn.want == vfs.agreed.want
    assert conn.want & abi.FUSE_POSIX_LOCKS and not vfs.agreed.want & abi.FUSE_FLOCK_LOCKS
    vfs.close()


def test_no_open_per_mount():
    vfs = Vfs(VfsOptions(no_open=True))
    vfs.mount(Recorder(), "/a", options=MountOptions(no_open=True))
    srv = Server(vfs)
    srv.init(DEFAULT_WANT | abi.FUSE_NO_OPEN_SUPPORT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    f = lookup(srv, a, b"x")[0]
    assert srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), f)[0] == errno.ENOSYS


def test_node_ids_beyond_48_bits_are_refused():
    vfs = Vfs()
    vfs.mount(Recorder(), "/a")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    assert srv.call(abi.FUSE_LOOKUP, b"huge\0", a)[0] == errno.EOVERFLOW
    assert lookup(srv, a, b"small")[0] == a >> TAG_SHIFT << TAG_SHIFT | 5


def test_a_request_using_the_root_keeps_its_fd_past_close(tmp_path):
    fs = Passthrough(str(tmp_path))
    inode = fs._inodes.use(ROOT_ID)
    fd = inode.fd
    fs.close()  # as a forced umount does, while a request still runs in the root directory
    os.fstat(fd)
    fs._inodes.unuse(inode)
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


def test_a_new_session_drops_the_old_ones_handles(vfs, dirs):
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    f = lookup(srv, lookup(srv, ROOT_ID, b"a")[0], b"file")[0]
    open_read(srv, f)
    assert vfs.mounts()[0].counters["open_handles"] == 1
    assert srv.call(abi.FUSE_DESTROY)[0] == 0
    srv.init(DEFAULT_WANT)
    assert vfs.mounts()[0].counters["open_handles"] == 0
    vfs.umount("/a")


def test_requests_racing_a_forced_umount_never_see_the_next_mount(vfs, dirs):
    import threading

    (dirs[2] / "file").write_bytes(b"xxxxxxxxx")
    vfs.mount(Passthrough(str(dirs[0])), "/a")
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    a = lookup(srv, ROOT_ID, b"a")[0]
    f = lookup(srv, a, b"file")[0]
    fh, _ = open_read(srv, f)
    seen: set = set()
    stop = threading.Event()

    def reader() -> None:
        # The same FuseServer, with uniques of its own.
        mine = Server(vfs)
        mine.server, mine.unique = srv.server, 1 << 40
        while not stop.is_set():
            err, data = mine.call(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 100, 0, 0, 0), f)
            seen.add(data if not err else err)
            err, _ = mine.call(abi.FUSE_LOOKUP, b"file\0", a)
            seen.add(err or "lookup ok")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(20):
            vfs.umount("/a", force=True)
            vfs.mount(Passthrough(str(dirs[2])), "/a")
    finally:
        stop.set()
        t.join()
    assert b"xxxxxxxxx" not in seen
    assert seen <= {b"oneoneone", "lookup ok", errno.ESTALE, errno.EBADF}, seen
    assert errno.ESTALE in seen


def test_entries_carry_the_mounts_generation(vfs, dirs):
    srv = Server(vfs)
    srv.init(DEFAULT_WANT)
    gens = []
    for _ in range(3):
        vfs.mount(Passthrough(str(dirs[0])), "/a")
        a = lookup(srv, ROOT_ID, b"a")
        f = lookup(srv, a[0], b"file")
        # The mount point keeps generation 0: Linux gives a submount's root that one.
        assert a[1] == 0 and f[1] != 0
        gens.append(f[1] & 0xFFFFFFFF)
        vfs.umount("/a", force=True)
    # A client keeping only the low 32 bits still tells the mounts apart.
    assert len(set(gens)) == 3
