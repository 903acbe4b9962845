"""Escapes tried through FuseServer.handle with hand-built requests against the passthrough.

Each test runs with a canary directory next to the share (and the share holds symlinks into it); the
fixture checks after every test that nothing in the canary changed. Nothing aims at the host's own
files: a regression would damage the canary, not the machine.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.unit.test_passthrough import _tree
from tests.unit.test_passthrough_locks import Server
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.server import DEFAULT_WANT


@pytest.fixture
def env(tmp_path: Path):
    share, canary = tmp_path / "share", tmp_path / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    (canary / "dir").mkdir()
    os.symlink(canary, share / "to_canary")
    os.symlink(canary / "secret", share / "to_secret")
    before = _tree(canary)
    fs = Passthrough(str(share), xattr=True)
    srv = Server(fs)
    srv.init(DEFAULT_WANT)
    yield srv, share, canary
    fs.close()
    assert _tree(canary) == before, "the canary directory outside the share changed"


def lookup(srv: Server, name: bytes, parent: int = 1) -> tuple[int, int]:
    """(errno, nodeid) of LOOKUP `name` in `parent`."""
    err, body = srv.call(abi.FUSE_LOOKUP, name + b"\0", parent)
    return err, abi.ENTRY_OUT.unpack(body)[0] if not err else 0


def create(srv: Server, name: bytes, parent: int = 1, flags: int = os.O_RDWR) -> int:
    return srv.call(abi.FUSE_CREATE, abi.CREATE_IN.pack(flags, 0o100644, 0, 0) + name + b"\0", parent)[0]


def setattr_mode(mode: int) -> bytes:
    return abi.SETATTR_IN.pack(abi.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0)


@pytest.mark.parametrize("name", [b"../canary/secret", b"to_canary/secret", b"/canary/secret", b"a/b", b"..",
                                  b".", b""])
def test_names_with_slash_or_dots_are_refused(env, name):
    srv, share, _ = env
    assert create(srv, name) == errno.EINVAL
    assert srv.call(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + name + b"\0")[0] == errno.EINVAL
    assert srv.call(abi.FUSE_UNLINK, name + b"\0")[0] == errno.EINVAL
    assert srv.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(1) + b"to_secret\0" + name + b"\0")[0] == errno.EINVAL
    assert sorted(os.listdir(share)) == ["to_canary", "to_secret"]


def test_dotdot_of_the_root_is_the_root(env):
    srv, share, _ = env
    err, node = lookup(srv, b"..")
    assert err == 0 and node == 1
    assert create(srv, b"made", node) == 0 and (share / "made").exists()


def test_absolute_symlink_target_is_stored_as_data(env):
    srv, share, canary = env
    target = os.fsencode(canary / "secret")
    err, body = srv.call(abi.FUSE_SYMLINK, b"abs\0" + target + b"\0")
    assert err == 0
    node = abi.ENTRY_OUT.unpack(body)[0]
    assert os.readlink(share / "abs") == os.fsdecode(target)
    assert srv.call(abi.FUSE_READLINK, b"", node) == (0, target)
    assert srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0), node)[0] == errno.ELOOP
    assert srv.call(abi.FUSE_SETATTR, setattr_mode(0o777), node)[0] == errno.EOPNOTSUPP
    # The symlink's own attributes, never the target's: user.* refused, as lsetxattr(2) refuses it.
    assert srv.call(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0y", node)[0] \
        == errno.EPERM


@pytest.mark.parametrize("link", [b"to_canary", b"to_secret"])
def test_host_symlinks_inside_the_share_lead_nowhere(env, link):
    srv, share, _ = env
    err, node = lookup(srv, link)
    assert err == 0
    # The node is the symlink itself: it is neither opened, nor a directory to create in.
    assert srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0), node)[0] == errno.ELOOP
    assert srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0), node)[0] == errno.ENOTDIR
    assert create(srv, b"passwd", node) == errno.ENOTDIR
    assert lookup(srv, b"secret", node)[0] == errno.ENOTDIR
    assert srv.call(abi.FUSE_SETATTR, setattr_mode(0o777), node)[0] == errno.EOPNOTSUPP
    size = abi.SETATTR_IN.pack(abi.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert srv.call(abi.FUSE_SETATTR, size, node)[0] == errno.EINVAL
    assert srv.call(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0y", node)[0] \
        == errno.EPERM
    if os.geteuid() == 0:
        # An attribute a symlink can have lands on the symlink (the canary check covers the targets).
        assert srv.call(abi.FUSE_SETXATTR, abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"trusted.x\0y", node)[0] == 0
        assert os.getxattr(share / link.decode(), "trusted.x", follow_symlinks=False) == b"y"
        target = os.readlink(share / link.decode())
        assert "trusted.x" not in os.listxattr(target)
    # Creating over the link's name does not write through it either.
    assert create(srv, link, flags=os.O_RDWR | os.O_TRUNC) == errno.ELOOP


def test_directory_swapped_for_a_symlink_after_lookup(env):
    srv, share, canary = env
    (share / "d").mkdir()
    err, d = lookup(srv, b"d")
    assert err == 0
    os.rename(share / "d", share / "d.old")
    os.symlink(canary, share / "d")
    # The nodeid holds the directory itself, wherever it now is: nothing lands in the canary.
    assert create(srv, b"secret", d, flags=os.O_RDWR | os.O_TRUNC) == 0
    assert (share / "d.old" / "secret").exists()
    assert srv.call(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"dir\0", d)[0] == 0
    # A fresh lookup finds the symlink, which is never a directory.
    err, link = lookup(srv, b"d")
    assert err == 0 and create(srv, b"x", link) == errno.ENOTDIR


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a device node")
def test_device_fifo_socket_are_never_opened(env):
    srv, share, _ = env
    os.mknod(share / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(share / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(share / "sock"))
        for name in (b"null", b"fifo", b"sock"):
            err, node = lookup(srv, name)
            assert err == 0
            assert srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0), node)[0] == errno.EBADF
            assert create(srv, name) == errno.EBADF  # the existing node is not opened either


def test_nodeids_and_fhs_never_issued_forgotten_or_of_another_inode(env):
    srv, share, _ = env
    (share / "f").write_bytes(b"data")
    (share / "g").write_bytes(b"gggg")
    for node in (0, 2, 999, 1 << 63):
        assert srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), node)[0] == errno.EBADF
        assert lookup(srv, b"f", node)[0] == errno.EBADF
    err, f = lookup(srv, b"f")
    err, g = lookup(srv, b"g")
    err, body = srv.call(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), f)
    fh = abi.OPEN_OUT.unpack(body)[0]
    read = abi.READ_IN.pack(fh, 0, 4, 0, 0, 0)
    assert srv.call(abi.FUSE_READ, read, f) == (0, b"data")
    for bad_fh in (0, fh + 1, 1 << 40):
        assert srv.call(abi.FUSE_READ, abi.READ_IN.pack(bad_fh, 0, 4, 0, 0, 0), f)[0] == errno.EBADF
    # An fh names the file it was opened on, whatever nodeid comes with it.
    assert srv.call(abi.FUSE_READ, read, g) == (0, b"data")
    assert srv.call(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(fh, 0, 0, 0), f) == (0, b"")
    assert srv.call(abi.FUSE_READ, read, f)[0] == errno.EBADF
    srv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), f, reply=False)
    assert srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), f)[0] == errno.EBADF


def test_link_or_rename_into_an_unlinked_directory(env):
    srv, share, _ = env
    (share / "gone").mkdir()
    (share / "f").write_bytes(b"x")
    _, gone = lookup(srv, b"gone")
    _, f = lookup(srv, b"f")
    os.rmdir(share / "gone")
    assert srv.call(abi.FUSE_LINK, abi.LINK_IN.pack(f) + b"l\0", gone)[0] == errno.ENOENT
    assert srv.call(abi.FUSE_RENAME, abi.RENAME_IN.pack(gone) + b"f\0r\0")[0] == errno.ENOENT
    assert create(srv, b"c", gone) == errno.ENOENT
    assert sorted(os.listdir(share)) == ["f", "to_canary", "to_secret"]
