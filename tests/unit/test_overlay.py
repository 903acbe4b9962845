"""OverlayFs through its Filesystem API, on host directories: markers, copy-up, and bad input.

Whiteouts are character devices, so most tests need root (CAP_MKNOD); the kernel comparison is in
tests/integration/test_overlay_kernel.py. A canary directory beside the layers must never change.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.unit.test_passthrough import _tree
from vhostfs.fs.overlay import OverlayFs
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse.filesystem import ROOT_ID, Context, SetAttr

CTX = Context(uid=0, gid=0, pid=1)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (character devices 0/0) need root")


@pytest.fixture
def layers(tmp_path: Path):
    """(upper, top lower, bottom lower) directories and a canary beside them that must not change."""
    upper, l1, l2, canary = (tmp_path / n for n in ("upper", "l1", "l2", "canary"))
    for d in (upper, l1, l2, canary):
        d.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    before = _tree(canary)
    yield upper, l1, l2
    assert _tree(canary) == before, "the canary directory outside the layers changed"


@pytest.fixture
def make(layers):
    made: list[OverlayFs] = []

    def factory(**kw) -> OverlayFs:
        upper, l1, l2 = layers
        fs = OverlayFs.from_dirs(str(upper), [str(l1), str(l2)], **kw)
        made.append(fs)
        return fs

    yield factory
    for fs in made:
        fs.close()


def walk(fs: OverlayFs, path: str) -> int:
    nodeid = ROOT_ID
    for part in path.split("/"):
        nodeid = fs.lookup(CTX, nodeid, part.encode()).nodeid
    return nodeid


def names(fs: OverlayFs, path: str = "") -> list[bytes]:
    nodeid = walk(fs, path) if path else ROOT_ID
    fh = fs.opendir(CTX, nodeid, os.O_RDONLY).fh
    try:
        return sorted(d.name for d in fs.readdir(CTX, nodeid, fh, 0, False) if d.name not in (b".", b".."))
    finally:
        fs.releasedir(CTX, nodeid, fh)


def read(fs: OverlayFs, path: str) -> bytes:
    nodeid = walk(fs, path)
    fh = fs.open(CTX, nodeid, os.O_RDONLY).fh
    try:
        return fs.read(CTX, nodeid, fh, 0, 1 << 16)
    finally:
        fs.release(CTX, nodeid, fh, 0)


def write(fs: OverlayFs, path: str, data: bytes, offset: int = 0) -> None:
    nodeid = walk(fs, path)
    fh = fs.open(CTX, nodeid, os.O_WRONLY).fh
    try:
        fs.write(CTX, nodeid, fh, offset, data, 0)
    finally:
        fs.release(CTX, nodeid, fh, 0)


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def test_lookup_top_down_with_whiteouts_and_opaque_dirs(make, layers):
    upper, l1, l2 = layers
    (l2 / "both").write_bytes(b"l2")
    (l1 / "both").write_bytes(b"l1")
    (l2 / "wo").write_bytes(b"hidden")
    whiteout(l1 / "wo")
    (l2 / "dir").mkdir()
    (l2 / "dir" / "from_l2").write_bytes(b"")
    (l1 / "dir").mkdir()
    (l1 / "dir" / "from_l1").write_bytes(b"")
    (l2 / "opq").mkdir()
    (l2 / "opq" / "below").write_bytes(b"")
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    (l2 / "file_then_dir").mkdir()
    (l2 / "file_then_dir" / "x").write_bytes(b"")
    (l1 / "file_then_dir").write_bytes(b"a file hides the directory")
    fs = make()
    assert read(fs, "both") == b"l1"
    assert errno_of(fs.lookup, CTX, ROOT_ID, b"wo") == errno.ENOENT
    assert names(fs) == [b"both", b"dir", b"file_then_dir", b"opq"]
    assert names(fs, "dir") == [b"from_l1", b"from_l2"]
    assert names(fs, "opq") == []
    assert stat.S_ISREG(fs.getattr(CTX, walk(fs, "file_then_dir"), None)[0].st_mode)
    # Merged directories have one link, as on the kernel's overlayfs.
    assert fs.getattr(CTX, walk(fs, "dir"), None)[0].st_nlink == 1
    assert fs.getattr(CTX, walk(fs, "opq"), None)[0].st_nlink == 2


def test_copy_up_keeps_mode_owner_times_and_xattrs_and_is_never_partial(make, layers):
    upper, l1, _ = layers
    (l1 / "d").mkdir(mode=0o750)
    os.chown(l1 / "d", 1000, 1001)
    f = l1 / "d" / "f"
    f.write_bytes(b"x" * 3_000_000)
    os.chown(f, 1000, 1001)
    os.chmod(f, 0o4751)
    os.setxattr(f, "user.note", b"kept")
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    os.utime(l1 / "d", ns=(3_000_000_000, 4_000_000_000))
    fs = make()
    ino = fs.getattr(CTX, walk(fs, "d/f"), None)[0].st_ino
    nodeid = walk(fs, "d/f")
    fs.setxattr(CTX, nodeid, b"user.added", b"new", 0)
    up = upper / "d" / "f"
    st = os.lstat(up)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4751, 1000, 1001)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert up.read_bytes() == f.read_bytes()
    assert os.getxattr(up, "user.note") == b"kept"
    assert os.getxattr(up, "user.added") == b"new"
    assert os.listxattr(f) == ["user.note"]
    d = os.lstat(upper / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (0o750, 1000, 1001, 4_000_000_000)
    assert fs.getattr(CTX, nodeid, None)[0].st_ino == ino
    assert sorted(os.listdir(upper / "d")) == ["f"]
    assert f.read_bytes() == b"x" * 3_000_000  # the lower layer is never written


def test_failed_copy_up_leaves_nothing_in_the_upper(layers):
    upper, l1, l2 = layers
    (l1 / "big").write_bytes(b"y" * (3 << 20))

    class FailingLower(Passthrough):
        def read(self, ctx, nodeid, fh, offset, size):
            if offset:
                raise OSError(errno.EIO, "the lower disk failed")
            return super().read(ctx, nodeid, fh, offset, size)

    fs = OverlayFs(Passthrough(str(upper), xattr=True), [FailingLower(str(l1), xattr=True, readonly=True)])
    try:
        nodeid = walk(fs, "big")
        assert errno_of(fs.open, CTX, nodeid, os.O_RDWR) == errno.EIO
        assert os.listdir(upper) == []
        assert read(fs, "big")[:4] == b"yyyy"
    finally:
        fs.close()


def test_unlink_rmdir_and_recreate_leave_the_kernels_markers(make, layers):
    upper, l1, l2 = layers
    (l1 / "f").write_bytes(b"")
    (l2 / "d").mkdir()
    (l2 / "d" / "x").write_bytes(b"")
    fs = make()
    fs.unlink(CTX, ROOT_ID, b"f")
    st = os.lstat(upper / "f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
    assert errno_of(fs.rmdir, CTX, ROOT_ID, b"d") == errno.ENOTEMPTY
    fs.unlink(CTX, walk(fs, "d"), b"x")
    fs.rmdir(CTX, ROOT_ID, b"d")
    assert stat.S_ISCHR(os.lstat(upper / "d").st_mode)
    fs.mkdir(CTX, ROOT_ID, b"d", 0o755, 0)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert names(fs, "d") == []
    assert names(fs) == [b"d"]
    assert sorted(os.listdir(l2 / "d")) == ["x"]


def test_rename_of_lower_directory_is_exdev_and_files_leave_whiteouts(make, layers):
    upper, l1, _ = layers
    (l1 / "ld").mkdir()
    (l1 / "f").write_bytes(b"moved")
    fs = make()
    assert errno_of(fs.rename, CTX, ROOT_ID, b"ld", ROOT_ID, b"ld2", 0) == errno.EXDEV
    fs.rename(CTX, ROOT_ID, b"f", ROOT_ID, b"g", 0)
    assert read(fs, "g") == b"moved"
    assert stat.S_ISCHR(os.lstat(upper / "f").st_mode)
    fs.mkdir(CTX, ROOT_ID, b"new", 0o755, 0)
    fs.rename(CTX, ROOT_ID, b"new", ROOT_ID, b"new2", 0)
    assert sorted(os.listdir(upper)) == ["f", "g", "new2"]


def test_hard_links_stay_one_file(make, layers):
    upper, l1, _ = layers
    (l1 / "a").write_bytes(b"one")
    fs = make()
    a = walk(fs, "a")
    entry = fs.link(CTX, a, ROOT_ID, b"b")
    assert entry.nodeid == a and entry.attr.st_nlink == 2
    write(fs, "b", b"two")
    assert read(fs, "a") == b"two"
    assert os.lstat(upper / "a").st_ino == os.lstat(upper / "b").st_ino


def test_read_handle_opened_before_copy_up_sees_the_copy(make, layers):
    _, l1, _ = layers
    (l1 / "f").write_bytes(b"before")
    fs = make()
    nodeid = walk(fs, "f")
    fh = fs.open(CTX, nodeid, os.O_RDONLY).fh
    fs.setattr(CTX, nodeid, SetAttr(size=2))
    assert fs.read(CTX, nodeid, fh, 0, 100) == b"be"
    fs.release(CTX, nodeid, fh, 0)


# -- bad input: guests forging markers -------------------------------------------------------------

def test_a_forged_whiteout_is_refused(make, layers):
    upper, l1, _ = layers
    (l1 / "victim").write_bytes(b"still here")
    fs = make()
    assert errno_of(fs.mknod, CTX, ROOT_ID, b"forged", stat.S_IFCHR | 0o644, 0, 0) == errno.EPERM
    # Over an existing name the guest would first remove it, which leaves the overlay's own whiteout.
    assert errno_of(fs.mknod, CTX, ROOT_ID, b"victim", stat.S_IFCHR, 0, 0) == errno.EPERM
    assert os.listdir(upper) == []
    # Rename flags that would make whiteouts are refused too.
    assert errno_of(fs.rename, CTX, ROOT_ID, b"victim", ROOT_ID, b"x", 4) == errno.EINVAL
    assert names(fs) == [b"victim"]
    # Other device numbers are plain devices.
    fs.mknod(CTX, ROOT_ID, b"null", stat.S_IFCHR | 0o600, os.makedev(1, 3), 0)
    assert names(fs) == [b"null", b"victim"]


@pytest.mark.parametrize("userxattr", [False, True])
def test_a_forged_opaque_marker_is_escaped(make, layers, userxattr):
    upper, l1, l2 = layers
    prefix = b"user.overlay." if userxattr else b"trusted.overlay."
    (l2 / "d").mkdir()
    (l2 / "d" / "below").write_bytes(b"")
    (l1 / "d").mkdir()
    fs = make(userxattr=userxattr)
    d = walk(fs, "d")
    fs.setxattr(CTX, d, prefix + b"opaque", b"y", 0)
    assert names(fs, "d") == [b"below"], "the guest's marker made the directory opaque"
    assert os.getxattr(upper / "d", prefix + b"overlay.opaque") == b"y"
    with pytest.raises(OSError):
        os.getxattr(upper / "d", prefix + b"opaque")
    assert fs.getxattr(CTX, d, prefix + b"opaque") == b"y"
    assert prefix + b"opaque" in fs.listxattr(CTX, d)
    # A real marker cannot be removed through the overlay either: the name reaches the escaped one.
    fs.unlink(CTX, d, b"below")
    fs.rmdir(CTX, ROOT_ID, b"d")
    fs.mkdir(CTX, ROOT_ID, b"d", 0o755, 0)
    d = walk(fs, "d")
    assert os.getxattr(upper / "d", prefix + b"opaque") == b"y"
    assert prefix + b"opaque" not in fs.listxattr(CTX, d)
    assert errno_of(fs.removexattr, CTX, d, prefix + b"opaque") == errno.ENODATA
    assert os.getxattr(upper / "d", prefix + b"opaque") == b"y"
    assert names(fs, "d") == []


# -- bad input: lower layers changing underneath ---------------------------------------------------

def test_lower_layer_changing_underneath(make, layers, tmp_path):
    upper, l1, _ = layers
    canary = tmp_path / "canary"
    (l1 / "d").mkdir()
    (l1 / "d" / "f").write_bytes(b"f")
    (l1 / "gone").write_bytes(b"")
    fs = make()
    d = walk(fs, "d")
    gone = walk(fs, "gone")
    f = walk(fs, "d/f")
    # The lower directory becomes a symlink to the canary; the lower file disappears.
    (l1 / "d" / "f").unlink()
    (l1 / "d").rmdir()
    os.symlink(canary, l1 / "d")
    (l1 / "gone").unlink()
    for call in (lambda: fs.open(CTX, gone, os.O_RDWR), lambda: fs.setattr(CTX, f, SetAttr(mode=0o600)),
                 lambda: fs.lookup(CTX, d, b"secret"), lambda: names(fs, "d"),
                 lambda: fs.create(CTX, walk(fs, "d"), b"new", 0o644, os.O_RDWR, 0)):
        try:
            call()
        except OSError:
            pass
    assert fs.getattr(CTX, ROOT_ID, None)[0].st_nlink == 1
    assert errno_of(fs.lookup, CTX, walk(fs, "d"), b"secret") in (errno.ENOENT, errno.ENOTDIR)
    # Whatever the overlay made of it (the copy-up of "d/f" may have used the lower directory still
    # held), nothing under the symlink was reached, and the upper holds no symlink.
    assert (canary / "secret").read_bytes() == b"do not touch"
    assert not any(p.is_symlink() for p in upper.rglob("*"))


def test_forgotten_nodes_release_every_layer_node_and_handle(make, layers):
    upper, l1, l2 = layers
    (l2 / "d").mkdir()
    (l2 / "d" / "f").write_bytes(b"f")
    (l1 / "d").mkdir()
    (l1 / "d" / "g").write_bytes(b"g")
    (l1 / "h").write_bytes(b"h")
    fs = make()
    counts: dict[int, int] = {}

    def count(entry):
        counts[entry.nodeid] = counts.get(entry.nodeid, 0) + 1
        return entry

    d = count(fs.lookup(CTX, ROOT_ID, b"d")).nodeid
    f = count(fs.lookup(CTX, d, b"f")).nodeid
    count(fs.lookup(CTX, d, b"g"))
    count(fs.lookup(CTX, d, b".."))
    fh = fs.opendir(CTX, d, os.O_RDONLY).fh
    for entry in fs.readdir(CTX, d, fh, 0, True):
        if entry.entry is not None:
            count(entry.entry)
    fs.releasedir(CTX, d, fh)
    fh = fs.open(CTX, f, os.O_RDWR).fh
    fs.write(CTX, f, fh, 0, b"F", 0)
    fs.release(CTX, f, fh, 0)
    fs.rename(CTX, d, b"f", ROOT_ID, b"f2", 0)
    count(fs.link(CTX, f, d, b"f3"))
    fs.unlink(CTX, ROOT_ID, b"h")
    entry, opened = fs.create(CTX, d, b"new", 0o644, os.O_RDWR, 0)
    count(entry)
    fs.release(CTX, entry.nodeid, opened.fh, 0)
    for nodeid, n in counts.items():
        fs.forget(nodeid, n)
    for layer in fs._layers:
        assert len(layer._inodes) == 1, "a layer node outlived the overlay's nodes"
        assert not layer._handles._by_fh, "a layer handle outlived the overlay's"
    assert set(fs._nodes) == {ROOT_ID}
    assert sorted(os.listdir(upper)) == ["d", "f2", "h"]
    assert sorted(os.listdir(upper / "d")) == ["f", "f3", "new"]


def test_dax_window_maps_the_real_files(make, layers):
    from vhostfs.fuse.filesystem import SETUPMAPPING_NO_FH

    upper, l1, _ = layers
    (l1 / "f").write_bytes(b"z" * 8192)
    (l1 / "g").write_bytes(b"g" * 8192)
    fs = make()
    f = walk(fs, "f")
    ro = fs.open(CTX, f, os.O_RDONLY).fh
    with fs.fd_for_mapping(f, ro, False) as (fd, fd_writable, size):
        assert size == 8192 and os.pread(fd, 1, 0) == b"z"
    assert not (upper / "f").exists(), "a read-only mapping copied the file up"
    rw = fs.open(CTX, f, os.O_RDWR).fh
    with fs.fd_for_mapping(f, rw, True) as (fd, fd_writable, size):
        assert fd_writable and os.fstat(fd).st_ino == os.lstat(upper / "f").st_ino
    g = walk(fs, "g")
    with fs.fd_for_mapping(g, SETUPMAPPING_NO_FH, True) as (fd, fd_writable, size):
        assert fd_writable and os.fstat(fd).st_ino == os.lstat(upper / "g").st_ino
    assert (upper / "g").read_bytes() == (l1 / "g").read_bytes()
    assert errno_of(lambda: fs.fd_for_mapping(ROOT_ID, rw, False).__enter__()) == errno.EBADF
    assert fs.wants_dax(f) is False


def test_an_upper_without_unnamed_files_is_refused(layers):
    upper, l1, _ = layers

    class NoTmpfile(Passthrough):
        def tmpfile(self, ctx, parent, mode, flags, umask):
            raise OSError(errno.EOPNOTSUPP, "not here")

    up, low = NoTmpfile(str(upper), xattr=True), Passthrough(str(l1), xattr=True, readonly=True)
    try:
        with pytest.raises(ValueError, match="O_TMPFILE"):
            OverlayFs(up, [low])
    finally:
        up.close()
        low.close()
    assert os.listdir(upper) == []


def test_st_ino_of_a_copy_stays_and_goes_with_it(make, layers):
    upper, l1, _ = layers
    (l1 / "f").write_bytes(b"f")
    lower_ino = os.lstat(l1 / "f").st_ino
    fs = make()
    f = walk(fs, "f")
    write(fs, "f", b"F")
    assert fs.getattr(CTX, f, None)[0].st_ino == lower_ino
    fs.forget(f, 2)  # the walk and the write's walk
    assert fs.getattr(CTX, walk(fs, "f"), None)[0].st_ino == lower_ino, "st_ino changed after forget"
    assert fs._origin_ino
    fs.unlink(CTX, ROOT_ID, b"f")
    assert not fs._origin_ino


def test_concurrent_copy_ups_lookups_and_listings(make, layers):
    import threading

    upper, l1, _ = layers
    (l1 / "shared").mkdir()
    for i in range(40):
        (l1 / "shared" / f"f{i}").write_bytes(b"%d" % i)
    fs = make()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, 40, 4):
                write(fs, f"shared/f{i}", b"w", 10)
                assert len(names(fs, "shared")) == 40
                fs.rename(CTX, walk(fs, "shared"), f"f{i}".encode(), walk(fs, "shared"), f"g{i}".encode(), 0)
                assert read(fs, f"shared/g{i}") == b"%d" % i + bytes(10 - len(b"%d" % i)) + b"w"
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # The old names are whiteouts now, the new ones the copies.
    assert sorted(os.listdir(upper / "shared")) == sorted([f"f{i}" for i in range(40)]
                                                          + [f"g{i}" for i in range(40)])
    assert names(fs, "shared") == sorted(f"g{i}".encode() for i in range(40))


@pytest.mark.parametrize("options, plus", [({}, True), ({"cache": "never"}, False),
                                           ({"readdirplus": False}, False),
                                           ({"cache": "never", "readdirplus": True}, True)])
def test_readdirplus_follows_the_passthrough_options(make, options, plus):
    from vhostfs.fuse import abi
    from vhostfs.fuse.filesystem import ConnectionInfo

    conn = ConnectionInfo(7, 38, abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO,
                          abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO, 1 << 20, 1 << 20, 32)
    make(**options).init(conn)
    assert bool(conn.want & abi.FUSE_DO_READDIRPLUS) == plus


def test_a_failed_create_keeps_the_lower_name_hidden(layers):
    upper, l1, _ = layers
    (l1 / "x").write_bytes(b"deleted")

    class FullUpper(Passthrough):
        full = False

        def _refuse(self):
            if self.full:
                raise OSError(errno.ENOSPC, "full")

        def create(self, *args):
            self._refuse()
            return super().create(*args)

        def mkdir(self, *args):
            self._refuse()
            return super().mkdir(*args)

        def symlink(self, *args):
            self._refuse()
            return super().symlink(*args)

    up = FullUpper(str(upper), xattr=True)
    fs = OverlayFs(up, [Passthrough(str(l1), xattr=True, readonly=True)])
    try:
        fs.unlink(CTX, ROOT_ID, b"x")
        up.full = True
        for call in (lambda: fs.create(CTX, ROOT_ID, b"x", 0o644, os.O_RDWR, 0),
                     lambda: fs.mkdir(CTX, ROOT_ID, b"x", 0o755, 0),
                     lambda: fs.symlink(CTX, ROOT_ID, b"x", b"t")):
            assert errno_of(call) == errno.ENOSPC
            assert errno_of(fs.lookup, CTX, ROOT_ID, b"x") == errno.ENOENT
        assert stat.S_ISCHR(os.lstat(upper / "x").st_mode)
    finally:
        fs.close()


@pytest.mark.parametrize("spec, parsed", [
    ("/app=/srv/up:lowerdir=/srv/a:/srv/b", ("/app", "/srv/up", {"lowerdir": ["/srv/a", "/srv/b"]})),
    ("/app=/srv/up:ro,userxattr:lowerdir=/srv/a",
     ("/app", "/srv/up", {"readonly": True, "userxattr": True, "lowerdir": ["/srv/a"]})),
    ("/=/srv/up:cache=never:lowerdir=/a", ("/", "/srv/up", {"cache": "never", "lowerdir": ["/a"]})),
])
def test_mount_spec_of_an_overlay(spec, parsed):
    from vhostfs.control import parse_mount_spec

    assert parse_mount_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["/app=/srv/up:lowerdir=", "/app=/srv/up:lowerdir=/a::/b",
                                  "/app=/srv/up:userxattr", "/app=:lowerdir=/a"])
def test_malformed_overlay_mount_specs(spec):
    from vhostfs.control import parse_mount_spec

    with pytest.raises(ValueError):
        parse_mount_spec(spec)
