"""The inode table at scale: (st_dev, st_ino, mount id) keys, file handles, and the fd budget."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vhostfs import native
from vhostfs.fs.filehandles import mount_id_from_fdinfo
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse.filesystem import ROOT_ID, Context

CTX = Context(uid=0, gid=0, pid=1)
MS_BIND = 4096
MNT_DETACH = 2
REPO = Path(__file__).resolve().parents[2]


def lookup(fs: Passthrough, path: str) -> int:
    nodeid = ROOT_ID
    for name in path.split("/"):
        nodeid = fs.lookup(CTX, nodeid, name.encode()).nodeid
    return nodeid


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture(params=["never", "mandatory"])
def fs(request, share):
    fs = Passthrough(str(share), inode_file_handles=request.param)
    yield fs
    fs.close()


@pytest.fixture
def mounts():
    """Mounts made by a test (root only), detached at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a bind mount or tmpfs needs root")
    made: list[bytes] = []

    def mount(source: bytes, target: Path, fstype: bytes = b"", flags: int = 0) -> None:
        try:
            native.mount(source, bytes(target), fstype, flags, b"")
        except OSError as e:
            pytest.skip(f"mount(2) is not allowed here: {e}")
        made.append(bytes(target))

    yield mount
    for target in reversed(made):
        native.umount2(target, MNT_DETACH)


def test_one_file_by_two_paths_is_one_inode(fs, share):
    (share / "d").mkdir()
    (share / "d" / "f").write_bytes(b"x")
    os.link(share / "d" / "f", share / "g")
    a = lookup(fs, "d/f")
    assert lookup(fs, "g") == a
    assert lookup(fs, "d/../d/f") == a
    assert fs.getattr(CTX, a, None)[0].st_nlink == 2


def test_bind_mount_with_the_same_inode_numbers_stays_distinct(fs, share, mounts):
    (share / "d").mkdir()
    (share / "d" / "f").write_bytes(b"x")
    (share / "b").mkdir()
    mounts(bytes(share / "d"), share / "b", flags=MS_BIND)
    assert os.stat(share / "d" / "f").st_ino == os.stat(share / "b" / "f").st_ino
    assert os.stat(share / "d" / "f").st_dev == os.stat(share / "b" / "f").st_dev
    assert lookup(fs, "b/f") != lookup(fs, "d/f")
    assert lookup(fs, "b") != lookup(fs, "d")


def test_tmpfs_mounts_with_colliding_inode_numbers_stay_distinct(fs, share, mounts):
    for name in ("m1", "m2"):
        (share / name).mkdir()
        mounts(b"tmpfs", share / name, b"tmpfs")
        (share / name / "f").write_bytes(name.encode())
    assert os.stat(share / "m1" / "f").st_ino == os.stat(share / "m2" / "f").st_ino
    a, b = lookup(fs, "m1/f"), lookup(fs, "m2/f")
    assert a != b
    for nodeid, data in ((a, b"m1"), (b, b"m2")):
        fh = fs.open(CTX, nodeid, os.O_RDONLY).fh
        assert fs.read(CTX, nodeid, fh, 0, 10) == data
        fs.release(CTX, nodeid, fh, 0)


def test_mount_id_from_fdinfo_matches_statx(share):
    fd = os.open(share, os.O_PATH)
    try:
        assert mount_id_from_fdinfo(fd) == native.mount_id(fd)
    finally:
        os.close(fd)


def test_mandatory_file_handles_on_a_file_system_without_them_fails_at_start():
    # procfs makes no file handles (it has no export operations).
    with pytest.raises(ValueError, match="cannot make file handles"):
        Passthrough("/proc", inode_file_handles="mandatory")


def test_prefer_falls_back_to_fds_where_there_are_no_handles():
    fs = Passthrough("/proc", inode_file_handles="prefer")
    try:
        assert fs._inodes.file_handles == "never"
        assert fs.getattr(CTX, lookup(fs, "self"), None)[0]
    finally:
        fs.close()


def test_unknown_file_handle_mode_is_refused(share):
    with pytest.raises(ValueError):
        Passthrough(str(share), inode_file_handles="sometimes")


def test_nodes_reopened_from_handles_are_the_same_files(share):
    fs = Passthrough(str(share), inode_file_handles="mandatory")
    try:
        (share / "d").mkdir()
        (share / "d" / "f").write_bytes(b"data")
        os.symlink("../../canary/secret", share / "d" / "link")
        d, f, link = lookup(fs, "d"), lookup(fs, "d/f"), lookup(fs, "d/link")
        assert fs._inodes.shrink() >= 3  # every idle node's fd is closed; only the handles remain
        assert fs.readlink(CTX, link) == b"../../canary/secret"
        fh = fs.open(CTX, f, os.O_RDONLY).fh
        assert fs.read(CTX, f, fh, 0, 10) == b"data"
        fs.release(CTX, f, fh, 0)
        assert fs.lookup(CTX, d, b"f").nodeid == f
        # A file removed and replaced under the same name: the old node does not reach the new file.
        os.unlink(share / "d" / "f")
        (share / "d" / "f").write_bytes(b"other")
        fs._inodes.shrink()
        with pytest.raises(OSError) as e:
            fs.getattr(CTX, f, None)
        assert e.value.errno == errno.ESTALE
        assert fs.lookup(CTX, d, b"f").nodeid != f
    finally:
        fs.close()


_WALK = textwrap.dedent("""
    import json, os, sys
    from vhostfs.fs.passthrough import Passthrough
    from vhostfs.fuse.filesystem import ROOT_ID, Context
    ctx = Context(uid=0, gid=0, pid=1)
    share, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fs = Passthrough(share, inode_file_handles=mode)
    d = fs.lookup(ctx, ROOT_ID, b"d").nodeid
    nodes, failures = [], {}
    for i in range(count):
        try:
            nodes.append(fs.lookup(ctx, d, b"f%d" % i).nodeid)
        except OSError as e:
            failures[e.errno] = failures.get(e.errno, 0) + 1
    # every node known is still usable, the oldest included
    sizes = {fs.getattr(ctx, n, None)[0].st_size for n in nodes[:50] + nodes[-50:]}
    print(json.dumps([len(nodes), len(os.listdir("/proc/self/fd")), sorted(sizes), sorted(failures.items())]))
""")


def _walk(share: Path, mode: str, count: int, limit: int) -> tuple[int, int, list[int], dict[int, int]]:
    """Looks up `count` files of share/d in a subprocess whose RLIMIT_NOFILE is `limit`."""
    import resource

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = subprocess.run([sys.executable, "-c", _WALK, str(share), mode, str(count)], capture_output=True,
                         text=True, preexec_fn=lower, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    nodes, fds, sizes, failures = json.loads(out)
    return nodes, fds, sizes, dict(failures)


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    share = tmp_path_factory.mktemp("many")
    (share / "d").mkdir()
    for i in range(20000):
        (share / "d" / f"f{i}").write_bytes(b"x" * (i % 3))
    return share


def test_file_handles_walk_20000_files_under_a_1024_fd_limit(many_files):
    nodes, fds, sizes, failures = _walk(many_files, "mandatory", 20000, 1024)
    assert (nodes, failures) == (20000, {})
    assert sizes == [0, 1, 2]
    assert fds < 1024 - 64  # the idle cache and the reserve keep the daemon below its budget


@pytest.mark.parametrize("mode", ["never", "prefer"])
def test_any_mode_walks_20000_files_under_a_1024_fd_limit(many_files, mode):
    """Without file handles, idle nodes are closed and found again by parent and name."""
    nodes, fds, sizes, failures = _walk(many_files, mode, 20000, 1024)
    assert (nodes, failures) == (20000, {})
    assert sizes == [0, 1, 2]
    assert fds < 1024


_OPEN_ALL = textwrap.dedent("""
    import json, os, sys
    from vhostfs.fs.passthrough import Passthrough
    from vhostfs.fuse.filesystem import ROOT_ID, Context
    ctx = Context(uid=0, gid=0, pid=1)
    fs = Passthrough(sys.argv[1])
    d = fs.lookup(ctx, ROOT_ID, b"d").nodeid
    handles, failures = [], {}
    for i in range(2000):
        try:
            n = fs.lookup(ctx, d, b"f%d" % i).nodeid
            handles.append((n, fs.open(ctx, n, os.O_RDONLY).fh))
        except OSError as e:
            failures[e.errno] = failures.get(e.errno, 0) + 1
    data = {fs.read(ctx, n, fh, 0, 10).decode() for n, fh in handles}
    fds = len(os.listdir("/proc/self/fd"))
    print(json.dumps([len(handles), fds, sorted(data), sorted(failures.items())]))
""")


def test_open_files_beyond_the_budget_are_an_error_reply(many_files):
    """Open files hold their fds: past the budget, opening one more fails with EMFILE, and the rest
    go on working."""
    import resource

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = subprocess.run([sys.executable, "-c", _OPEN_ALL, str(many_files)], capture_output=True, text=True,
                         preexec_fn=lower, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    opened, fds, data, failures = json.loads(out.stdout)
    assert set(dict(failures)) == {errno.EMFILE} and 300 < opened < 1024 and fds < 1024
    assert data == ["", "x", "xx"]


# -- nodes without file handles, found again by parent and name ----------------------------------------

@pytest.fixture
def named(share):
    """A passthrough without file handles, and a way to close every idle node's fd."""
    (share / "d" / "e").mkdir(parents=True)
    (share / "d" / "e" / "f").write_bytes(b"deep")
    fs = Passthrough(str(share), inode_file_handles="never")

    def evict() -> None:
        while fs._inodes.shrink():
            pass

    yield fs, evict
    fs.close()


def _size(fs: Passthrough, nodeid: int) -> int:
    return fs.getattr(CTX, nodeid, None)[0].st_size


def test_closed_nodes_come_back_by_name_up_the_tree(named, share):
    fs, evict = named
    f = lookup(fs, "d/e/f")
    open_fds = len(os.listdir("/proc/self/fd"))
    evict()
    assert len(os.listdir("/proc/self/fd")) <= open_fds - 3  # d, e and f were closed
    assert _size(fs, f) == 4


def test_a_node_renamed_through_the_file_system_is_found_under_its_new_name(named, share):
    fs, evict = named
    d, f = lookup(fs, "d"), lookup(fs, "d/e/f")
    e = lookup(fs, "d/e")
    fs.rename(CTX, e, b"f", d, b"g", 0)
    fs.rename(CTX, d, b"e", ROOT_ID, b"e2", 0)
    evict()
    assert _size(fs, f) == 4 and fs.getattr(CTX, e, None)[0].st_ino == os.stat(share / "e2").st_ino
    (share / "d" / "x").write_bytes(b"x")
    (share / "e2" / "y").write_bytes(b"yy")
    x, y = lookup(fs, "d/x"), lookup(fs, "e2/y")
    fs.rename(CTX, d, b"x", e, b"y", 2)  # RENAME_EXCHANGE
    evict()
    assert (_size(fs, x), _size(fs, y)) == (1, 2)
    assert (share / "e2" / "y").read_bytes() == b"x"


def test_a_node_whose_name_is_gone_is_stale_never_another_file(named, share):
    fs, evict = named
    d = lookup(fs, "d")
    (share / "d" / "a").write_bytes(b"a")
    a = lookup(fs, "d/a")
    os.rename(share / "d" / "a", share / "d" / "b")  # behind the file system's back
    (share / "d" / "a").write_bytes(b"another file")
    evict()
    with pytest.raises(OSError) as exc:
        fs.getattr(CTX, a, None)
    assert exc.value.errno == errno.ESTALE
    # Seen again under its new name, it is found there.
    assert fs.lookup(CTX, d, b"b").nodeid == a and _size(fs, a) == 1
    # Unlinked through the file system, it keeps the fd it has (no name to find it by any more).
    fs.unlink(CTX, d, b"b")
    evict()
    assert fs.getattr(CTX, a, None)[0].st_nlink == 0


def test_an_open_file_keeps_its_node_even_when_unlinked(named, share):
    fs, evict = named
    d = lookup(fs, "d")
    (share / "d" / "o").write_bytes(b"open")
    o = lookup(fs, "d/o")
    fh = fs.open(CTX, o, os.O_RDONLY).fh
    fs.unlink(CTX, d, b"o")
    evict()
    assert _size(fs, o) == 4  # its own fd, never closed while the file is open
    fs.release(CTX, o, fh, 0)
