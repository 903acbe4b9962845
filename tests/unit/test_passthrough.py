"""The passthrough file system against a temporary shared directory, called directly (no FUSE server).

Every test runs with a sibling "canary" directory next to the share; an autouse fixture checks that
nothing in it changed, so any escape from the share shows up as a failure of whichever test caused it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
from pathlib import Path

import pytest

from vhostfs import native
from vhostfs.fs.inodes import InodeTable
from vhostfs.fs.passthrough import Passthrough, prepare_process
from vhostfs.fuse.abi import FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE
from vhostfs.fuse.filesystem import ROOT_ID, STATX_BASIC_STATS, TIME_NOW, Context, SetAttr
from vhostfs.iov import Reader, Writer

CTX = Context(0, 0, 0)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, chown, setfsuid)")


def _tree(path: Path) -> dict[str, tuple]:
    """Everything observable about a directory tree: names, types, modes, owners, times, contents."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = Path(p).read_bytes() if stat.S_ISREG(st.st_mode) else None
            xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(os.listxattr(p)))
            state[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                        st.st_nlink, data, xattrs)
    return state


@pytest.fixture
def dirs(tmp_path: Path):
    share = tmp_path / "share"
    canary = tmp_path / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    (canary / "sub").mkdir()
    (canary / "sub" / "f").write_bytes(b"deep")
    before = _tree(canary)
    yield share, canary
    assert _tree(canary) == before, "the canary directory outside the share changed"


@pytest.fixture
def fs(make) -> Passthrough:
    return make()


@pytest.fixture
def share(dirs) -> Path:
    return dirs[0]


@pytest.fixture
def canary(dirs) -> Path:
    return dirs[1]


def raises_errno(code: int, fn, *args, **kw):
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"


def lookup(fs: Passthrough, path: str) -> int:
    node = ROOT_ID
    for part in path.split("/"):
        node = fs.lookup(CTX, node, part.encode()).nodeid
    return node


def writer(*sizes: int) -> tuple[Writer, list[bytearray]]:
    bufs = [bytearray(n) for n in sizes]
    return Writer([memoryview(b) for b in bufs]), bufs


# -- names ----------------------------------------------------------------------------------------

def test_lookup_getattr_and_refcount(fs, share):
    (share / "a").write_bytes(b"hello")
    e1 = fs.lookup(CTX, ROOT_ID, b"a")
    e2 = fs.lookup(CTX, ROOT_ID, b"a")
    assert e1.nodeid == e2.nodeid != ROOT_ID
    assert e1.attr.st_ino == os.stat(share / "a").st_ino
    attr, timeout = fs.getattr(CTX, e1.nodeid, None)
    assert attr.st_size == 5 and stat.S_ISREG(attr.st_mode) and timeout == 1.0
    fs.forget(e1.nodeid, 1)
    assert fs.getattr(CTX, e1.nodeid, None)[0].st_size == 5
    fs.forget(e1.nodeid, 1)
    raises_errno(errno.EBADF, fs.getattr, CTX, e1.nodeid, None)
    e3 = fs.lookup(CTX, ROOT_ID, b"a")
    assert e3.nodeid != e1.nodeid  # a forgotten nodeid is never reused for the same file


def test_lookup_missing_and_not_a_directory(fs, share):
    (share / "f").write_bytes(b"")
    raises_errno(errno.ENOENT, fs.lookup, CTX, ROOT_ID, b"nope")
    f = lookup(fs, "f")
    raises_errno(errno.ENOTDIR, fs.lookup, CTX, f, b"x")
    raises_errno(errno.ENOTDIR, fs.lookup, CTX, f, b".")


def test_lookup_dot_and_dotdot(fs, share):
    (share / "d" / "e").mkdir(parents=True)
    d = lookup(fs, "d")
    e = fs.lookup(CTX, d, b"e").nodeid
    assert fs.lookup(CTX, d, b".").nodeid == d
    assert fs.lookup(CTX, e, b"..").nodeid == d
    assert fs.lookup(CTX, d, b"..").nodeid == ROOT_ID
    root = fs.lookup(CTX, ROOT_ID, b"..")
    assert root.nodeid == ROOT_ID and root.attr.st_ino == os.stat(share).st_ino
    assert fs.lookup(CTX, ROOT_ID, b".").nodeid == ROOT_ID
    fs.forget(ROOT_ID, 100)  # the root is never dropped
    assert fs.getattr(CTX, ROOT_ID, None)[0].st_ino == os.stat(share).st_ino


def test_mkdir_mknod_symlink_readlink(fs, share):
    d = fs.mkdir(CTX, ROOT_ID, b"dir", 0o777, 0o022)
    assert stat.S_ISDIR(d.attr.st_mode) and stat.S_IMODE(os.stat(share / "dir").st_mode) == 0o755
    f = fs.mknod(CTX, d.nodeid, b"file", stat.S_IFREG | 0o640, 0, 0)
    assert stat.S_ISREG(os.lstat(share / "dir" / "file").st_mode) and stat.S_IMODE(f.attr.st_mode) == 0o640
    p = fs.mknod(CTX, d.nodeid, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    assert stat.S_ISFIFO(p.attr.st_mode)
    s = fs.mknod(CTX, d.nodeid, b"sock", stat.S_IFSOCK | 0o600, 0, 0)
    assert stat.S_ISSOCK(s.attr.st_mode)
    link = fs.symlink(CTX, ROOT_ID, b"ln", b"../anything/at all")
    assert os.readlink(share / "ln") == "../anything/at all"
    assert fs.readlink(CTX, link.nodeid) == b"../anything/at all"
    raises_errno(errno.EINVAL, fs.readlink, CTX, f.nodeid)
    raises_errno(errno.EEXIST, fs.mkdir, CTX, ROOT_ID, b"dir", 0o755, 0)


def test_readlink_non_utf8_target(fs, share):
    os.symlink(b"\xff\xfe/x", bytes(share) + b"/bin")
    assert fs.readlink(CTX, lookup(fs, "bin")) == b"\xff\xfe/x"


@ROOT_ONLY
def test_mknod_device_is_created_but_never_opened(fs, share):
    dev = fs.mknod(CTX, ROOT_ID, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0)
    assert stat.S_ISCHR(os.lstat(share / "null").st_mode)
    raises_errno(errno.EBADF, fs.open, CTX, dev.nodeid, os.O_RDONLY)
    raises_errno(errno.EBADF, fs.open, CTX, dev.nodeid, os.O_WRONLY)


def test_unlink_rmdir(fs, share):
    (share / "d").mkdir()
    (share / "f").write_bytes(b"x")
    raises_errno(errno.EISDIR, fs.unlink, CTX, ROOT_ID, b"d")
    raises_errno(errno.ENOTDIR, fs.rmdir, CTX, ROOT_ID, b"f")
    fs.unlink(CTX, ROOT_ID, b"f")
    fs.rmdir(CTX, ROOT_ID, b"d")
    assert list(share.iterdir()) == []
    raises_errno(errno.ENOENT, fs.unlink, CTX, ROOT_ID, b"f")


def test_rename_and_flags(fs, share):
    (share / "a").write_bytes(b"A")
    (share / "b").write_bytes(b"B")
    (share / "d").mkdir()
    d = lookup(fs, "d")
    raises_errno(errno.EEXIST, fs.rename, CTX, ROOT_ID, b"a", ROOT_ID, b"b", 1)  # RENAME_NOREPLACE
    fs.rename(CTX, ROOT_ID, b"a", ROOT_ID, b"b", 2)  # RENAME_EXCHANGE
    assert (share / "a").read_bytes() == b"B" and (share / "b").read_bytes() == b"A"
    fs.rename(CTX, ROOT_ID, b"a", d, b"moved", 0)
    assert (share / "d" / "moved").read_bytes() == b"B" and not (share / "a").exists()
    fs.rename(CTX, d, b"moved", ROOT_ID, b"b", 0)  # replaces
    assert (share / "b").read_bytes() == b"B"
    raises_errno(errno.EINVAL, fs.rename, CTX, ROOT_ID, b"b", ROOT_ID, b"c", 1 << 10)


def test_link(fs, share):
    (share / "f").write_bytes(b"data")
    f = lookup(fs, "f")
    e = fs.link(CTX, f, ROOT_ID, b"g")
    assert e.nodeid == f and e.attr.st_nlink == 2
    assert os.stat(share / "g").st_ino == os.stat(share / "f").st_ino
    os.symlink("../canary/secret", share / "sl")
    e = fs.link(CTX, lookup(fs, "sl"), ROOT_ID, b"sl2")  # links the symlink itself
    assert os.readlink(share / "sl2") == "../canary/secret" and stat.S_ISLNK(e.attr.st_mode)


# -- attributes -----------------------------------------------------------------------------------

@ROOT_ONLY
def test_setattr_by_path(fs, share):
    (share / "f").write_bytes(b"0123456789")
    f = lookup(fs, "f")
    attr, _ = fs.setattr(CTX, f, SetAttr(mode=0o4711))
    assert stat.S_IMODE(attr.st_mode) == 0o4711
    attr, _ = fs.setattr(CTX, f, SetAttr(uid=1234, gid=5678))
    assert (attr.st_uid, attr.st_gid) == (1234, 5678)
    attr, _ = fs.setattr(CTX, f, SetAttr(size=3))
    assert attr.st_size == 3 and (share / "f").read_bytes() == b"012"
    attr, _ = fs.setattr(CTX, f, SetAttr(atime_ns=1_000_000_123, mtime_ns=2_000_000_456))
    assert (attr.st_atime_ns, attr.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    attr, _ = fs.setattr(CTX, f, SetAttr(mtime_ns=TIME_NOW))
    assert attr.st_atime_ns == 1_000_000_123 and attr.st_mtime_ns > 2_000_000_456
    attr, _ = fs.setattr(CTX, f, SetAttr(atime_ns=TIME_NOW, mtime_ns=TIME_NOW))
    assert attr.st_atime_ns > 1_000_000_123
    fs.setattr(CTX, f, SetAttr(mode=0o6750))
    attr, _ = fs.setattr(CTX, f, SetAttr(kill_suidgid=True))
    assert stat.S_IMODE(attr.st_mode) == 0o750
    d = fs.mkdir(CTX, ROOT_ID, b"d", 0o755, 0).nodeid
    raises_errno(errno.EISDIR, fs.setattr, CTX, d, SetAttr(size=0))


def test_setattr_by_handle(fs, share):
    (share / "f").write_bytes(b"0123456789")
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_RDWR).fh
    attr, _ = fs.setattr(CTX, f, SetAttr(size=4, mode=0o600, mtime_ns=5_000, atime_ns=6_000, fh=fh))
    assert attr.st_size == 4 and stat.S_IMODE(attr.st_mode) == 0o600 and attr.st_mtime_ns == 5_000
    fs.release(CTX, f, fh, 0)
    raises_errno(errno.EBADF, fs.setattr, CTX, f, SetAttr(size=0, fh=fh))
    assert (share / "f").read_bytes() == b"0123"


# -- files ----------------------------------------------------------------------------------------

def test_create_write_read_release(fs, share):
    entry, opened = fs.create(CTX, ROOT_ID, b"new", stat.S_IFREG | 0o666, os.O_RDWR | os.O_CREAT, 0o022)
    assert stat.S_IMODE(os.stat(share / "new").st_mode) == 0o644
    assert fs.write(CTX, entry.nodeid, opened.fh, 0, b"hello world", 0) == 11
    assert fs.read(CTX, entry.nodeid, opened.fh, 6, 100) == b"world"
    fs.flush(CTX, entry.nodeid, opened.fh, 0)
    fs.fsync(CTX, entry.nodeid, opened.fh, True)
    fs.fsync(CTX, entry.nodeid, opened.fh, False)
    fs.release(CTX, entry.nodeid, opened.fh, 0)
    raises_errno(errno.EBADF, fs.read, CTX, entry.nodeid, opened.fh, 0, 10)
    raises_errno(errno.EBADF, fs.release, CTX, entry.nodeid, opened.fh, 0)
    assert (share / "new").read_bytes() == b"hello world"
    assert fs.lookup(CTX, ROOT_ID, b"new").nodeid == entry.nodeid


def test_create_existing(fs, share):
    (share / "f").write_bytes(b"old")
    raises_errno(errno.EEXIST, fs.create, CTX, ROOT_ID, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
    entry, opened = fs.create(CTX, ROOT_ID, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0)
    assert (share / "f").read_bytes() == b""
    fs.release(CTX, entry.nodeid, opened.fh, 0)
    (share / "d").mkdir()
    raises_errno(errno.EISDIR, fs.create, CTX, ROOT_ID, b"d", 0o644, os.O_WRONLY | os.O_CREAT, 0)


def test_open_flags_are_sanitised(fs, share):
    (share / "f").write_bytes(b"abc")
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT).fh
    assert fs.read(CTX, f, fh, 1, 10) == b"bc"  # unaligned read works: O_DIRECT was dropped
    fs.release(CTX, f, fh, 0)
    fh = fs.open(CTX, f, os.O_WRONLY | os.O_TRUNC).fh
    assert (share / "f").read_bytes() == b""
    raises_errno(errno.EBADF, fs.read, CTX, f, fh, 0, 1)  # opened write-only
    fs.release(CTX, f, fh, 0)
    raises_errno(errno.EISDIR, fs.open, CTX, ROOT_ID, os.O_RDONLY)


def test_zero_copy_read_into_and_write_from(fs, share):
    data = os.urandom(3 * 65536 + 123)
    entry, opened = fs.create(CTX, ROOT_ID, b"z", 0o644, os.O_RDWR, 0)
    segs = [bytearray(data[:1000]), bytearray(data[1000:70000]), bytearray(data[70000:])]
    src = Reader([memoryview(b) for b in segs])
    assert fs.write_from(CTX, entry.nodeid, opened.fh, 10, len(data), src, 0) == len(data)
    assert src.remaining == 0
    assert (share / "z").read_bytes() == b"\0" * 10 + data
    dest, bufs = writer(7, 4096, 300000)
    n = fs.read_into(CTX, entry.nodeid, opened.fh, 10, len(data), dest)
    assert n == len(data) == dest.written
    assert b"".join(bufs)[:n] == data
    dest, _ = writer(100)
    assert fs.read_into(CTX, entry.nodeid, opened.fh, len(data) + 10, 100, dest) == 0  # at EOF
    fs.release(CTX, entry.nodeid, opened.fh, 0)


def test_copy_100mb_file(fs, share):
    """What `cp` of a big file does over FUSE: 1 MiB reads into guest buffers, 1 MiB writes out."""
    size = 100 * 1024 * 1024
    chunk = 1024 * 1024
    with open(share / "big", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"middle")
    src = fs.open(CTX, lookup(fs, "big"), os.O_RDONLY).fh
    dst_entry, dst = fs.create(CTX, ROOT_ID, b"copy", 0o644, os.O_WRONLY, 0)
    buf = bytearray(chunk)
    off = 0
    while True:
        dest = Writer([memoryview(buf)[:chunk // 2], memoryview(buf)[chunk // 2:]])
        n = fs.read_into(CTX, 0, src, off, chunk, dest)
        if n == 0:
            break
        assert fs.write_from(CTX, dst_entry.nodeid, dst.fh, off, n, Reader([memoryview(buf)[:n]]), 0) == n
        off += n
    fs.release(CTX, 0, src, 0)
    fs.release(CTX, dst_entry.nodeid, dst.fh, 0)
    assert off == size and os.path.getsize(share / "copy") == size
    with open(share / "copy", "rb") as f:
        f.seek(size // 2)
        assert f.read(6) == b"middle"


def test_write_kill_suidgid(fs, share):
    (share / "f").write_bytes(b"")
    os.chmod(share / "f", 0o6755)
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_WRONLY).fh
    fs.write(CTX, f, fh, 0, b"x", 0)
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o6755
    fs.write_from(CTX, f, fh, 0, 1, Reader([memoryview(b"y")]), 1 << 2)
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o755
    fs.release(CTX, f, fh, 0)


def test_fallocate_lseek_copy_file_range(fs, share):
    entry, opened = fs.create(CTX, ROOT_ID, b"f", 0o644, os.O_RDWR, 0)
    fh = opened.fh
    fs.fallocate(CTX, entry.nodeid, fh, 0, 8192, 0)
    assert os.path.getsize(share / "f") == 8192
    fs.write(CTX, entry.nodeid, fh, 1 << 20, b"tail", 0)
    fs.fallocate(CTX, entry.nodeid, fh, 0, 8192, 0x01 | 0x02)  # KEEP_SIZE | PUNCH_HOLE
    data_at = fs.lseek(CTX, entry.nodeid, fh, 0, os.SEEK_DATA)
    assert 0 < data_at <= 1 << 20
    assert fs.lseek(CTX, entry.nodeid, fh, 0, os.SEEK_HOLE) == 0
    out_entry, out = fs.create(CTX, ROOT_ID, b"g", 0o644, os.O_RDWR, 0)
    n = fs.copy_file_range(CTX, entry.nodeid, fh, 1 << 20, out_entry.nodeid, out.fh, 5, 4, 0)
    assert n == 4 and (share / "g").read_bytes() == b"\0" * 5 + b"tail"
    raises_errno(errno.EINVAL, fs.copy_file_range, CTX, entry.nodeid, fh, 0, out_entry.nodeid, out.fh, 0, 4,
                 1)
    # FUSE's mode is a u32: bits Linux does not define are refused as the host refuses them.
    for mode in (0x80, 0xFFFFFFFF):
        raises_errno(errno.EOPNOTSUPP, fs.fallocate, CTX, entry.nodeid, fh, 0, 10, mode)
    fs.release(CTX, entry.nodeid, fh, 0)
    fs.release(CTX, out_entry.nodeid, out.fh, 0)


# -- directories ----------------------------------------------------------------------------------

def _read_all(fs, nodeid, fh, plus=False, batch=None):
    """Reads a directory the way the server does: `batch` entries per call, resuming at cookies."""
    out, offset = [], 0
    while True:
        got = []
        gen = iter(fs.readdir(CTX, nodeid, fh, offset, plus))
        for de in gen:
            got.append(de)
            if batch is not None and len(got) == batch:
                break
        if not got:
            return out
        out.extend(got)
        offset = got[-1].offset


def test_readdir_small(fs, share):
    (share / "d").mkdir()
    (share / "f").write_bytes(b"")
    os.symlink("nowhere", share / "l")
    os.mkfifo(share / "p")
    fh = fs.opendir(CTX, ROOT_ID, 0).fh
    entries = {de.name: de for de in _read_all(fs, ROOT_ID, fh)}
    assert set(entries) == {b".", b"..", b"d", b"f", b"l", b"p"}
    assert entries[b"d"].type == stat.S_IFDIR >> 12 and entries[b"f"].type == stat.S_IFREG >> 12
    assert entries[b"l"].type == stat.S_IFLNK >> 12 and entries[b"p"].type == stat.S_IFIFO >> 12
    assert entries[b"f"].ino == os.stat(share / "f").st_ino
    assert entries[b".."].ino == entries[b"."].ino == os.stat(share).st_ino
    assert all(de.entry is None for de in entries.values())
    fs.fsyncdir(CTX, ROOT_ID, fh, False)
    fs.releasedir(CTX, ROOT_ID, fh)
    raises_errno(errno.EBADF, lambda: list(fs.readdir(CTX, ROOT_ID, fh, 0, False)))
    raises_errno(errno.ENOTDIR, fs.opendir, CTX, lookup(fs, "f"), 0)


def test_readdir_5000_entries_with_resume(fs, share):
    names = {f"file-{i:05d}".encode() for i in range(5000)}
    for n in names:
        (share / n.decode()).touch()
    fh = fs.opendir(CTX, ROOT_ID, 0).fh
    entries = _read_all(fs, ROOT_ID, fh, batch=97)
    got = [de.name for de in entries]
    assert len(got) == len(set(got)) == 5002
    assert set(got) == names | {b".", b".."}
    offsets = [de.offset for de in entries]
    assert all(o > 0 for o in offsets) and len(set(offsets)) == len(offsets)
    # resuming at any cookie gives exactly the rest of the listing
    rest = [de.name for de in fs.readdir(CTX, ROOT_ID, fh, entries[2500].offset, False)]
    assert rest == got[2501:]
    # entries created after the snapshot do not disturb a listing in progress; a rewind sees them
    (share / "late").touch()
    assert [de.name for de in fs.readdir(CTX, ROOT_ID, fh, entries[-2].offset, False)] == got[-1:]
    assert b"late" in {de.name for de in fs.readdir(CTX, ROOT_ID, fh, 0, False)}
    fs.releasedir(CTX, ROOT_ID, fh)


def test_readdirplus_counts_lookups(fs, share):
    (share / "d").mkdir()
    for i in range(50):
        (share / "d" / f"f{i}").write_bytes(b"x" * i)
    d = lookup(fs, "d")
    before = len(fs._inodes)
    fh = fs.opendir(CTX, d, 0).fh
    entries = _read_all(fs, d, fh, plus=True, batch=7)
    assert len(entries) == 52
    for de in entries:
        if de.name in (b".", b".."):
            assert de.entry is None
        else:
            assert de.entry is not None and de.entry.attr.st_size == int(de.name[1:])
            assert de.entry.nodeid == fs.lookup(CTX, d, de.name).nodeid
            fs.forget(de.entry.nodeid, 2)
    assert len(fs._inodes) == before
    fs.releasedir(CTX, d, fh)


def test_readdirplus_counts_only_pulled_entries(fs, share):
    """Lookups happen as entries are pulled: a server that stops early owes forgets only for those."""
    for name in ("a", "b", "c"):
        (share / name).touch()
    fh = fs.opendir(CTX, ROOT_ID, 0).fh
    before = len(fs._inodes)
    gen = iter(fs.readdir(CTX, ROOT_ID, fh, 2, True))  # just after "." and ".."
    de = next(gen)
    assert de.entry is not None and len(fs._inodes) == before + 1
    gen.close()  # the server found no room for it: it stops and forgets the unsent entry
    assert len(fs._inodes) == before + 1
    fs.forget(de.entry.nodeid, 1)
    assert len(fs._inodes) == before
    fs.releasedir(CTX, ROOT_ID, fh)


def test_readdir_non_root_dotdot_and_mkdir_visible(fs, share):
    (share / "a" / "b").mkdir(parents=True)
    b = lookup(fs, "a/b")
    fh = fs.opendir(CTX, b, 0).fh
    entries = {de.name: de for de in fs.readdir(CTX, b, fh, 0, True)}
    assert entries[b".."].ino == os.stat(share / "a").st_ino and entries[b".."].entry is None
    fs.releasedir(CTX, b, fh)


# -- file system ----------------------------------------------------------------------------------

def test_statfs_access_syncfs(fs, share):
    v = fs.statfs(CTX, ROOT_ID)
    host = os.statvfs(share)
    assert v.f_bsize == host.f_bsize and v.f_blocks == host.f_blocks and v.f_namemax == host.f_namemax
    (share / "f").write_bytes(b"")
    os.chmod(share / "f", 0o640)
    f = lookup(fs, "f")
    fs.access(CTX, f, os.R_OK | os.W_OK)
    raises_errno(errno.EACCES, fs.access, CTX, f, os.X_OK)
    os.chown(share / "f", 1000, 1000)
    fs.access(Context(1000, 1000, 1), f, os.R_OK | os.W_OK)
    fs.access(Context(2000, 1000, 1), f, os.R_OK)
    raises_errno(errno.EACCES, fs.access, Context(2000, 1000, 1), f, os.W_OK)
    raises_errno(errno.EACCES, fs.access, Context(2000, 2000, 1), f, os.R_OK)
    fs.access(Context(2000, 2000, 1), f, os.F_OK)
    fs.syncfs(CTX, ROOT_ID)


def set_user_xattr_or_skip(fs: Passthrough, node: int, name: bytes, value: bytes) -> None:
    """fs.setxattr of a user.* attribute; skips the test where the share's file system has none."""
    try:
        fs.setxattr(CTX, node, name, value, 0)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            pytest.skip("the temporary directory's file system has no user xattrs")
        raise


def test_xattrs(make, share):
    (share / "f").write_bytes(b"")
    os.symlink("f", share / "l")
    off = make()
    f = lookup(off, "f")
    raises_errno(errno.ENOSYS, off.getxattr, CTX, f, b"user.a")
    raises_errno(errno.ENOSYS, off.setxattr, CTX, f, b"user.a", b"1", 0)
    raises_errno(errno.ENOSYS, off.listxattr, CTX, f)
    raises_errno(errno.ENOSYS, off.removexattr, CTX, f, b"user.a")
    fs = make(xattr=True)
    f = lookup(fs, "f")
    set_user_xattr_or_skip(fs, f, b"user.a", b"value")
    assert os.getxattr(share / "f", "user.a") == b"value"
    assert fs.getxattr(CTX, f, b"user.a") == b"value"
    assert b"user.a" in fs.listxattr(CTX, f)
    raises_errno(errno.EEXIST, fs.setxattr, CTX, f, b"user.a", b"v", os.XATTR_CREATE)
    fs.removexattr(CTX, f, b"user.a")
    raises_errno(errno.ENODATA, fs.getxattr, CTX, f, b"user.a")
    # The symlink's own attributes, not its target's: as lgetxattr(2), where user.* has none.
    raises_errno(errno.ENODATA, fs.getxattr, CTX, lookup(fs, "l"), b"user.a")
    raises_errno(errno.EINVAL, fs.getxattr, CTX, f, b"user.\0x")


def _node(share: Path, kind: str) -> Path:
    """Makes share/n, a `kind` ("file", "dir", "symlink" to share/target, or "fifo") node."""
    path = share / "n"
    if kind == "file":
        path.write_bytes(b"")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        (share / "target").write_bytes(b"")
        path.symlink_to("target")
    else:
        os.mkfifo(path)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* attributes need root (CAP_SYS_ADMIN)")
@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_xattrs_are_the_nodes_own_whatever_its_kind(make, share, kind):
    """trusted.* attributes, which symlinks and FIFOs can have (user.* ones they cannot), go to the node
    itself, as the host's l*xattr calls see them: never to a symlink's target, and without opening a
    FIFO (which would hang the test)."""
    path = _node(share, kind)
    fs = make(xattr=True)
    node = lookup(fs, "n")
    fs.setxattr(CTX, node, b"trusted.vhostfs", b"from the guest", 0)
    assert os.getxattr(path, "trusted.vhostfs", follow_symlinks=False) == b"from the guest"
    os.setxattr(path, "trusted.host", b"from the host", follow_symlinks=False)
    assert fs.getxattr(CTX, node, b"trusted.host") == b"from the host"
    assert {b"trusted.vhostfs", b"trusted.host"} <= set(fs.listxattr(CTX, node))
    fs.removexattr(CTX, node, b"trusted.vhostfs")
    assert os.listxattr(path, follow_symlinks=False) == ["trusted.host"]
    raises_errno(errno.ENODATA, fs.getxattr, CTX, node, b"trusted.vhostfs")
    if kind == "symlink":
        assert os.listxattr(share / "target") == []


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_user_xattrs_of_symlinks_and_fifos_are_refused_as_on_the_host(make, share, kind):
    path = _node(share, kind)
    fs = make(xattr=True)
    node = lookup(fs, "n")
    raises_errno(errno.EPERM, os.setxattr, path, "user.a", b"1", follow_symlinks=False)
    raises_errno(errno.EPERM, fs.setxattr, CTX, node, b"user.a", b"1", 0)
    raises_errno(errno.ENODATA, fs.getxattr, CTX, node, b"user.a")


def test_xattr_calls_leave_every_working_directory_alone(make, share):
    """The calls name nodes relative to /proc as the calling thread's working directory: only for the
    call, and never as the working directory of another thread, which would resolve its own relative
    names there."""
    (share / "f").write_bytes(b"")
    fs = make(xattr=True)
    node = lookup(fs, "f")
    set_user_xattr_or_skip(fs, node, b"user.probe", b"")
    cwd = os.getcwd()
    seen: list[object] = []
    done = threading.Event()

    def watch() -> None:  # shares the working directory of the thread that started it (this one)
        while not done.is_set():
            if (now := os.getcwd()) != cwd:
                seen.append(now)

    def work(i: int) -> None:
        name = f"user.t{i}".encode()
        try:
            for j in range(200):
                fs.setxattr(CTX, node, name, b"%d" % j, 0)
                assert fs.getxattr(CTX, node, name) == b"%d" % j
            fs.removexattr(CTX, node, name)
        except BaseException as e:  # reported by the assertion below
            seen.append(e)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    watcher.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    assert seen == []
    assert fs.listxattr(CTX, node) == [b"user.probe"]
    assert os.getcwd() == cwd


def test_readonly(make, share):
    (share / "f").write_bytes(b"data")
    (share / "d").mkdir()
    fs = make(readonly=True)
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_RDONLY).fh
    assert fs.read(CTX, f, fh, 0, 10) == b"data"
    erofs = [
        (fs.setattr, CTX, f, SetAttr(mode=0o600)),
        (fs.symlink, CTX, ROOT_ID, b"s", b"t"),
        (fs.mknod, CTX, ROOT_ID, b"n", stat.S_IFREG | 0o644, 0, 0),
        (fs.mkdir, CTX, ROOT_ID, b"m", 0o755, 0),
        (fs.unlink, CTX, ROOT_ID, b"f"),
        (fs.rmdir, CTX, ROOT_ID, b"d"),
        (fs.rename, CTX, ROOT_ID, b"f", ROOT_ID, b"g", 0),
        (fs.link, CTX, f, ROOT_ID, b"h"),
        (fs.create, CTX, ROOT_ID, b"c", 0o644, os.O_WRONLY, 0),
        (fs.open, CTX, f, os.O_WRONLY),
        (fs.open, CTX, f, os.O_RDWR),
        (fs.open, CTX, f, os.O_RDONLY | os.O_TRUNC),
        (fs.fallocate, CTX, f, fh, 0, 10, 0),
        (fs.copy_file_range, CTX, f, fh, 0, f, fh, 10, 1, 0),
    ]
    for fn, *args in erofs:
        raises_errno(errno.EROFS, fn, *args)
    raises_errno(errno.EROFS, fs.access, CTX, f, os.W_OK)
    fs.release(CTX, f, fh, 0)
    assert (share / "f").read_bytes() == b"data" and sorted(p.name for p in share.iterdir()) == ["d", "f"]


@pytest.mark.parametrize(("cache", "timeout", "file_flags", "dir_flags"), [
    ("never", 0.0, FOPEN_DIRECT_IO, 0),
    ("metadata", 86400.0, FOPEN_DIRECT_IO, 0),
    ("auto", 1.0, 0, 0),
    ("always", 86400.0, FOPEN_KEEP_CACHE, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR),
])
def test_cache_policies(make, share, cache, timeout, file_flags, dir_flags):
    (share / "f").write_bytes(b"")
    fs = make(cache=cache)
    e = fs.lookup(CTX, ROOT_ID, b"f")
    assert e.entry_timeout == e.attr_timeout == timeout
    assert fs.getattr(CTX, e.nodeid, None)[1] == timeout
    opened = fs.open(CTX, e.nodeid, os.O_RDONLY)
    assert opened.flags == file_flags
    assert fs.opendir(CTX, ROOT_ID, 0).flags == dir_flags
    fs.release(CTX, e.nodeid, opened.fh, 0)


def test_unknown_cache_policy(share):
    with pytest.raises(ValueError):
        Passthrough(str(share), cache="sometimes")


def test_destroy_forgets_everything_but_the_root(fs, share):
    (share / "f").write_bytes(b"")
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_RDONLY).fh
    fs.destroy()
    raises_errno(errno.EBADF, fs.getattr, CTX, f, None)
    raises_errno(errno.EBADF, fs.read, CTX, f, fh, 0, 1)
    assert fs.lookup(CTX, ROOT_ID, b"f").attr.st_ino == os.stat(share / "f").st_ino


@ROOT_ONLY
def test_creating_calls_run_as_the_caller(fs, share):
    guest = Context(1000, 1001, 42)
    (share / "open").mkdir(mode=0o777)
    os.chmod(share / "open", 0o777)
    d = lookup(fs, "open")
    made = [
        fs.mkdir(guest, d, b"dir", 0o755, 0),
        fs.mknod(guest, d, b"node", stat.S_IFREG | 0o644, 0, 0),
        fs.symlink(guest, d, b"sym", b"target"),
        fs.create(guest, d, b"file", 0o644, os.O_WRONLY, 0)[0],
    ]
    for e in made:
        assert (e.attr.st_uid, e.attr.st_gid) == (1000, 1001)
    # the host checks the guest user's permission: the root-owned 0755 share root is not writable
    os.chmod(share, 0o755)
    raises_errno(errno.EACCES, fs.mkdir, guest, ROOT_ID, b"nope", 0o755, 0)
    # and the worker thread is back to the daemon's credentials afterwards
    assert native.setfsuid(0xFFFFFFFF) == 0 and native.setfsgid(0xFFFFFFFF) == 0
    fs.mkdir(CTX, ROOT_ID, b"yes", 0o755, 0)
    assert os.stat(share / "yes").st_uid == 0


# -- security -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"a/b", b"/", b"../canary", b"", b"a\0b", b"x" * 256])
def test_bad_names_are_refused(fs, share, name):
    (share / "a").mkdir()
    code = errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL
    raises_errno(code, fs.lookup, CTX, ROOT_ID, name)
    raises_errno(code, fs.mkdir, CTX, ROOT_ID, name, 0o755, 0)
    raises_errno(code, fs.create, CTX, ROOT_ID, name, 0o644, os.O_WRONLY, 0)
    raises_errno(code, fs.mknod, CTX, ROOT_ID, name, stat.S_IFREG | 0o644, 0, 0)
    raises_errno(code, fs.symlink, CTX, ROOT_ID, name, b"t")
    raises_errno(code, fs.unlink, CTX, ROOT_ID, name)
    raises_errno(code, fs.rmdir, CTX, ROOT_ID, name)
    raises_errno(code, fs.rename, CTX, ROOT_ID, b"a", ROOT_ID, name, 0)
    raises_errno(code, fs.link, CTX, lookup(fs, "a"), ROOT_ID, name)
    assert sorted(p.name for p in share.iterdir()) == ["a"]


@pytest.mark.parametrize("name", [b".", b".."])
def test_dot_names_only_in_lookup(fs, share, name):
    (share / "d").mkdir()
    d = lookup(fs, "d")
    raises_errno(errno.EINVAL, fs.mkdir, CTX, d, name, 0o755, 0)
    raises_errno(errno.EINVAL, fs.rmdir, CTX, d, name)
    raises_errno(errno.EINVAL, fs.unlink, CTX, d, name)
    raises_errno(errno.EINVAL, fs.create, CTX, d, name, 0o644, os.O_WRONLY, 0)
    raises_errno(errno.EINVAL, fs.rename, CTX, d, name, ROOT_ID, b"x", 0)
    raises_errno(errno.EINVAL, fs.rename, CTX, ROOT_ID, b"d", d, name, 0)
    raises_errno(errno.EINVAL, fs.symlink, CTX, d, name, b"x")
    assert (share / "d").is_dir()


def test_dotdot_never_climbs_above_the_root(fs, share):
    node = ROOT_ID
    for _ in range(5):
        node = fs.lookup(CTX, node, b"..").nodeid
        assert node == ROOT_ID
    with pytest.raises(OSError):
        fs.lookup(CTX, node, b"canary")
    fh = fs.opendir(CTX, node, 0).fh
    assert b"canary" not in {de.name for de in fs.readdir(CTX, node, fh, 0, True)}
    fs.releasedir(CTX, node, fh)


@pytest.mark.parametrize("target", ["canary file", "canary directory"])
def test_symlink_to_outside_is_never_followed(fs, share, canary, target):
    """Absolute symlinks out of the share, aimed at the canary the fixture checks after the test."""
    dest = str(canary / "secret") if target == "canary file" else str(canary)
    os.symlink(dest, share / "evil")
    os.symlink(str(canary), share / "evildir")
    e = fs.lookup(CTX, ROOT_ID, b"evil")
    assert stat.S_ISLNK(e.attr.st_mode) and e.attr.st_ino == os.lstat(share / "evil").st_ino
    assert fs.readlink(CTX, e.nodeid) == dest.encode()
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
        raises_errno(errno.ELOOP, fs.open, CTX, e.nodeid, flags)
    raises_errno(errno.ELOOP, fs.create, CTX, ROOT_ID, b"evil", 0o644, os.O_WRONLY | os.O_TRUNC, 0)
    raises_errno(errno.EEXIST, fs.create, CTX, ROOT_ID, b"evil", 0o644, os.O_WRONLY | os.O_EXCL, 0)
    raises_errno(errno.EOPNOTSUPP, fs.setattr, CTX, e.nodeid, SetAttr(mode=0o777))
    raises_errno(errno.EINVAL, fs.setattr, CTX, e.nodeid, SetAttr(size=0))
    attr, _ = fs.setattr(CTX, e.nodeid, SetAttr(mtime_ns=123, atime_ns=456))
    assert stat.S_ISLNK(attr.st_mode) and os.lstat(share / "evil").st_mtime_ns == 123  # the link itself
    if os.geteuid() == 0:
        fs.setattr(CTX, e.nodeid, SetAttr(uid=4321, gid=4321))
        assert os.lstat(share / "evil").st_uid == 4321
    d = fs.lookup(CTX, ROOT_ID, b"evildir")
    raises_errno(errno.ENOTDIR, fs.lookup, CTX, d.nodeid, b"secret")
    raises_errno(errno.ENOTDIR, fs.opendir, CTX, d.nodeid, 0)
    raises_errno(errno.ENOTDIR, fs.mkdir, CTX, d.nodeid, b"x", 0o755, 0)
    raises_errno(errno.ENOTDIR, fs.create, CTX, d.nodeid, b"x", 0o644, os.O_WRONLY, 0)
    raises_errno(errno.ENOTDIR, fs.unlink, CTX, d.nodeid, b"secret")
    raises_errno(errno.ENOTDIR, fs.rename, CTX, d.nodeid, b"secret", ROOT_ID, b"stolen", 0)
    raises_errno(errno.ENOTDIR, fs.link, CTX, e.nodeid, d.nodeid, b"x")
    raises_errno(errno.ENOTDIR, fs.mknod, CTX, d.nodeid, b"x", stat.S_IFREG, 0, 0)
    raises_errno(errno.ENOTDIR, fs.symlink, CTX, d.nodeid, b"x", b"y")
    fs.unlink(CTX, ROOT_ID, b"evil")  # removes the link, never the target
    assert not os.path.lexists(share / "evil") and os.path.exists(dest)


def test_symlinked_parent_on_host_is_not_traversed(fs, share, canary):
    """A directory swapped for a symlink on the host after lookup keeps serving the original."""
    (share / "d").mkdir()
    d = lookup(fs, "d")
    os.rename(share / "d", share / "d.old")
    os.symlink(str(canary), share / "d")
    fs.mknod(CTX, d, b"secret", stat.S_IFREG | 0o644, 0, 0)  # lands in d.old, not the canary
    assert (share / "d.old" / "secret").read_bytes() == b""
    raises_errno(errno.ENOTDIR, fs.lookup, CTX, lookup(fs, "d"), b"secret")


@pytest.mark.timeout(20)
def test_fifo_socket_device_are_never_opened(fs, share):
    os.mkfifo(share / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(share / "sock"))
    try:
        for name in ("fifo", "sock"):
            node = lookup(fs, name)
            for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_NONBLOCK):
                raises_errno(errno.EBADF, fs.open, CTX, node, flags)
            raises_errno(errno.ENOTDIR, fs.opendir, CTX, node, 0)
            # existing special file under create without O_EXCL: refused, not opened (would block)
            raises_errno(errno.EBADF, fs.create, CTX, ROOT_ID, name.encode(), 0o644, os.O_WRONLY, 0)
        raises_errno(errno.EINVAL, fs.setattr, CTX, lookup(fs, "fifo"), SetAttr(size=0))
    finally:
        sock.close()


def test_unknown_nodeids_and_handles(fs, share):
    (share / "f").write_bytes(b"x")
    for bogus in (0, 2, 12345, 2**64 - 1, -1):
        raises_errno(errno.EBADF, fs.getattr, CTX, bogus, None)
        raises_errno(errno.EBADF, fs.lookup, CTX, bogus, b"f")
        raises_errno(errno.EBADF, fs.open, CTX, bogus, os.O_RDONLY)
        raises_errno(errno.EBADF, fs.opendir, CTX, bogus, 0)
        raises_errno(errno.EBADF, fs.mkdir, CTX, bogus, b"x", 0o755, 0)
        raises_errno(errno.EBADF, fs.setattr, CTX, bogus, SetAttr(mode=0o600))
        raises_errno(errno.EBADF, fs.readlink, CTX, bogus)
        raises_errno(errno.EBADF, fs.statfs, CTX, bogus)
        fs.forget(bogus, 1)  # ignored, never raises
        raises_errno(errno.EBADF, fs.read, CTX, ROOT_ID, bogus, 0, 1)
        raises_errno(errno.EBADF, fs.write, CTX, ROOT_ID, bogus, 0, b"x", 0)
        raises_errno(errno.EBADF, fs.read_into, CTX, ROOT_ID, bogus, 0, 1, writer(1)[0])
        raises_errno(errno.EBADF, fs.write_from, CTX, ROOT_ID, bogus, 0, 1, Reader([memoryview(b"x")]), 0)
        raises_errno(errno.EBADF, fs.release, CTX, ROOT_ID, bogus, 0)
        raises_errno(errno.EBADF, fs.fsync, CTX, ROOT_ID, bogus, False)
        raises_errno(errno.EBADF, fs.flush, CTX, ROOT_ID, bogus, 0)
        raises_errno(errno.EBADF, lambda b=bogus: list(fs.readdir(CTX, ROOT_ID, b, 0, False)))
    # a file handle is not a directory handle, and a raw host fd number is not a handle
    f = lookup(fs, "f")
    fh = fs.open(CTX, f, os.O_RDONLY).fh
    raises_errno(errno.ENOTDIR, lambda: list(fs.readdir(CTX, f, fh, 0, False)))
    fs.release(CTX, f, fh, 0)
    host_fd = os.open(share / "f", os.O_RDONLY)
    try:
        raises_errno(errno.EBADF, fs.read, CTX, f, host_fd, 0, 1)
    finally:
        os.close(host_fd)


def test_forget_during_use_keeps_the_fd_until_the_use_ends(share):
    fd = os.open(share, os.O_PATH)
    table = InodeTable(fd, os.stat(fd))
    (share / "f").write_bytes(b"")
    child_fd = os.open(share / "f", os.O_PATH)
    inode = table.add(child_fd, os.stat(child_fd))
    with table.use(inode.nodeid):
        table.forget(inode.nodeid, 1)
        os.fstat(child_fd)  # still open for the request in flight
        with pytest.raises(OSError):
            table.use(inode.nodeid)
    with pytest.raises(OSError):
        os.fstat(child_fd)  # closed once the last user left
    os.close(fd)


def test_concurrent_lookups_and_forgets(fs, share):
    for i in range(20):
        (share / f"f{i}").write_bytes(b"")
    errors = []

    def worker():
        try:
            for _ in range(200):
                for i in range(20):
                    e = fs.lookup(CTX, ROOT_ID, f"f{i}".encode())
                    fs.getattr(CTX, e.nodeid, None)
                    fs.forget(e.nodeid, 1)
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(fs._inodes) == 1  # only the root is left


# -- statx, poll, ioctl, bmap ---------------------------------------------------------------------
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOATIME_FL = 0x80


def test_statx_reports_the_basic_stats(fs, share):
    (share / "f").write_bytes(b"12345")
    nodeid = lookup(fs, "f")
    sx, timeout = fs.statx(CTX, nodeid, None, 0, 0xFFF)
    st = os.lstat(share / "f")
    assert sx.mask == STATX_BASIC_STATS and timeout == 1.0
    assert (sx.ino, sx.size, sx.mode, sx.nlink, sx.uid, sx.mtime_ns) == (
        st.st_ino, 5, st.st_mode, 1, st.st_uid, st.st_mtime_ns)


def test_poll_says_files_and_directories_are_ready(fs, share):
    entry, opened = fs.create(CTX, ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0)
    dir_fh = fs.opendir(CTX, ROOT_ID, os.O_RDONLY).fh
    events = select.POLLIN | select.POLLOUT | select.POLLPRI
    assert fs.poll(CTX, entry.nodeid, opened.fh, 0, 0, events) == select.POLLIN | select.POLLOUT
    assert fs.poll(CTX, ROOT_ID, dir_fh, 0, 0, select.POLLIN) == select.POLLIN
    fs.release(CTX, entry.nodeid, opened.fh, 0)
    raises_errno(errno.EBADF, fs.poll, CTX, entry.nodeid, opened.fh, 0, 0, events)


def test_bmap_is_not_supported(fs, share):
    (share / "f").write_bytes(b"x")
    raises_errno(errno.ENOSYS, fs.bmap, CTX, lookup(fs, "f"), 0, 4096)


def test_ioctl_other_than_inode_flags_is_enotty(fs, share):
    entry, opened = fs.create(CTX, ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0)
    # FIONREAD and FS_IOC_GETVERSION: real ioctls of the host, refused all the same.
    for cmd in (0x541B, 0x80087601):
        raises_errno(errno.ENOTTY, fs.ioctl, CTX, entry.nodeid, opened.fh, 0, cmd, 0, b"", 8)


_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_DAX = 0x8000
_FS_DAX_FL = 0x02000000


def test_ioctl_fsxattr_changes_the_flags_and_nothing_else(fs, share):
    """xfs_io's chattr +x (FS_IOC_FSSETXATTR with FS_XFLAG_DAX): the flag reaches the host file, and
    the per-file DAX attribute is what wants_dax reports; a project id change is refused."""
    entry, opened = fs.create(CTX, ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0)
    try:
        _, data = fs.ioctl(CTX, entry.nodeid, opened.fh, 0, _FS_IOC_FSGETXATTR, 0, b"", 28)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            pytest.skip(f"the file system under {share} has no inode flags ({exc.strerror})")
        raise
    assert len(data) == 28 and not fs.wants_dax(entry.nodeid)
    xflags, extsize, nextents, projid, cow = struct.unpack_from("<IIIII", data)
    dax = struct.pack("<IIIII8x", xflags | _FS_XFLAG_DAX, extsize, nextents, projid, cow)
    try:
        fs.ioctl(CTX, entry.nodeid, opened.fh, 0, _FS_IOC_FSSETXATTR, 0, dax, 0)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL):
            pytest.skip(f"the file system under {share} refuses FS_XFLAG_DAX ({exc.strerror})")
        raise
    with open(share / "f", "rb") as f:
        host = bytearray(8)
        fcntl.ioctl(f.fileno(), _FS_IOC_GETFLAGS, host)
    assert int.from_bytes(host[:4], "little") & _FS_DAX_FL
    assert fs.wants_dax(entry.nodeid) and not fs.wants_dax(ROOT_ID)
    other_project = struct.pack("<IIIII8x", xflags, extsize, nextents, projid + 1, cow)
    raises_errno(errno.EOPNOTSUPP, fs.ioctl, CTX, entry.nodeid, opened.fh, 0, _FS_IOC_FSSETXATTR, 0,
                 other_project, 0)


def test_ioctl_inode_flags_round_trip(fs, share):
    entry, opened = fs.create(CTX, ROOT_ID, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0)
    try:
        result, data = fs.ioctl(CTX, entry.nodeid, opened.fh, 0, _FS_IOC_GETFLAGS, 0, b"", 4)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            pytest.skip(f"the file system under {share} has no inode flags ({exc.strerror})")
        raise
    assert result == 0 and len(data) == 4
    flags = int.from_bytes(data, "little")
    try:
        fs.ioctl(CTX, entry.nodeid, opened.fh, 0, _FS_IOC_SETFLAGS, 0,
                 (flags | _FS_NOATIME_FL).to_bytes(4, "little"), 4)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"the file system under {share} refuses FS_NOATIME_FL here ({exc.strerror})")
        raise
    _, data = fs.ioctl(CTX, entry.nodeid, opened.fh, 0, _FS_IOC_GETFLAGS, 0, b"", 4)
    assert int.from_bytes(data, "little") & _FS_NOATIME_FL
    fd = os.open(share / "f", os.O_RDONLY)
    try:
        host = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, host)
    finally:
        os.close(fd)
    assert int.from_bytes(host[:4], "little") & _FS_NOATIME_FL, "the flag is set on the host file"


def test_ioctl_setflags_on_a_readonly_share_is_erofs(make, share):
    (share / "f").write_bytes(b"x")
    fs = make(readonly=True)
    nodeid = lookup(fs, "f")
    fh = fs.open(CTX, nodeid, os.O_RDONLY).fh
    raises_errno(errno.EROFS, fs.ioctl, CTX, nodeid, fh, 0, _FS_IOC_SETFLAGS, 0, bytes(4), 4)


def test_the_constructor_leaves_the_process_alone(share):
    """umask and groups are the program's start-up business (prepare_process), not the constructor's."""
    old = os.umask(0o027)
    try:
        Passthrough(str(share)).close()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="supplementary groups are dropped only as root")
def test_as_root_a_passthrough_without_prepare_process_is_warned_about(share, monkeypatch, caplog):
    from vhostfs.fs import passthrough

    groups = os.getgroups()
    os.setgroups([12345])
    monkeypatch.setattr(passthrough, "_prepared", False)
    try:
        Passthrough(str(share)).close()
        assert "prepare_process() was not called" in caplog.text
        assert os.getgroups() == [12345]  # the constructor changed nothing
        prepare_process()
        assert os.getgroups() == [] and os.umask(0) == 0
        caplog.clear()
        Passthrough(str(share)).close()
        assert "prepare_process" not in caplog.text
    finally:
        os.setgroups(groups)
