"""The passthrough with --translate-uid/--translate-gid: every place an ID crosses, both ways, on a real
host directory (as root, so that files can have any owner)."""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from tests.unit.test_passthrough import raises_errno
from vhostfs.fs.idmap import IdMap
from vhostfs.fuse.filesystem import ROOT_ID, Context, SetAttr

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setfsuid)")

ROOT = Context(0, 0, 1)
USER = Context(1000, 1000, 2)
# Guest 0-1999 <-> host 100000-101999; guest 5000 is forbidden; guest gids 0-1999 <-> host 200000-...
UIDS = ["map:0:100000:2000", "forbid-guest:5000:1"]
GIDS = ["map:0:200000:2000"]


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _ids(value: bytes) -> set[tuple[int, int]]:
    return {struct.unpack_from("<HHI", value, off)[0::2] for off in range(4, len(value), 8)}


@pytest.fixture
def fs(make, share):
    share.chmod(0o777)
    os.chown(share, 100000, 200000)
    return make(xattr=True, posix_acl=True, translate_uid=IdMap(UIDS),
                translate_gid=IdMap(GIDS, "--translate-gid"))


def _owner(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def test_created_nodes_get_the_host_ids_and_replies_the_guest_ids(fs, share):
    entry, opened = fs.create(USER, ROOT_ID, b"file", 0o644, os.O_WRONLY, 0)
    fs.release(USER, entry.nodeid, opened.fh, 0)
    assert _owner(share / "file") == (101000, 201000)
    assert (entry.attr.st_uid, entry.attr.st_gid) == (1000, 1000)
    d = fs.mkdir(USER, ROOT_ID, b"dir", 0o755, 0)
    n = fs.mknod(ROOT, ROOT_ID, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    s = fs.symlink(USER, ROOT_ID, b"link", b"file")
    assert _owner(share / "dir") == _owner(share / "link") == (101000, 201000)
    assert _owner(share / "fifo") == (100000, 200000)
    assert (d.attr.st_uid, n.attr.st_uid, s.attr.st_uid) == (1000, 0, 1000)


def test_getattr_lookup_statx_readdirplus_show_guest_ids(fs, share):
    (share / "f").write_text("x")
    os.chown(share / "f", 101234, 201500)
    nodeid = fs.lookup(ROOT, ROOT_ID, b"f").nodeid
    attr, _ = fs.getattr(ROOT, nodeid, None)
    assert (attr.st_uid, attr.st_gid) == (1234, 1500)
    assert attr.st_size == 1 and stat.S_ISREG(attr.st_mode)  # the rest as it is on the host
    sx, _ = fs.statx(ROOT, nodeid, None, 0, 0)
    assert (sx.uid, sx.gid) == (1234, 1500)
    fh = fs.opendir(ROOT, ROOT_ID, 0).fh
    entries = [d for d in fs.readdir(ROOT, ROOT_ID, fh, 0, True) if d.name == b"f"]
    assert [(d.entry.attr.st_uid, d.entry.attr.st_gid) for d in entries] == [(1234, 1500)]


def test_host_ids_no_rule_names_are_shown_unchanged(fs, share):
    (share / "g").write_text("x")
    os.chown(share / "g", 7, 9)
    attr = fs.lookup(ROOT, ROOT_ID, b"g").attr
    assert (attr.st_uid, attr.st_gid) == (7, 9)


def test_setattr_owner_is_translated_and_the_reply_too(fs, share):
    (share / "f").write_text("x")
    nodeid = fs.lookup(ROOT, ROOT_ID, b"f").nodeid
    attr, _ = fs.setattr(ROOT, nodeid, SetAttr(uid=1001, gid=1002))
    assert _owner(share / "f") == (101001, 201002)
    assert (attr.st_uid, attr.st_gid) == (1001, 1002)
    fs.setattr(ROOT, nodeid, SetAttr(gid=3))
    assert _owner(share / "f") == (101001, 200003)


def test_forbidden_guest_id_is_eperm_everywhere(fs, share):
    (share / "f").write_text("x")
    nodeid = fs.lookup(ROOT, ROOT_ID, b"f").nodeid
    before = _owner(share / "f")
    raises_errno(errno.EPERM, fs.setattr, ROOT, nodeid, SetAttr(uid=5000))
    assert _owner(share / "f") == before
    forbidden = Context(5000, 1000, 3)
    raises_errno(errno.EPERM, fs.mkdir, forbidden, ROOT_ID, b"nope", 0o755, 0)
    raises_errno(errno.EPERM, fs.create, forbidden, ROOT_ID, b"nope2", 0o644, os.O_WRONLY, 0)
    raises_errno(errno.EPERM, fs.setxattr, ROOT, nodeid, b"system.posix_acl_access",
                 _acl((1, 6, 0xFFFFFFFF), (2, 6, 5000), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
                      (0x20, 4, 0xFFFFFFFF)), 0)
    assert not (share / "nope").exists() and not (share / "nope2").exists()
    assert b"system.posix_acl_access" not in [os.fsencode(n) for n in os.listxattr(share / "f")]


def test_acl_entries_are_host_ids_on_the_host_and_guest_ids_in_the_guest(fs, share):
    (share / "f").write_text("x")
    nodeid = fs.lookup(ROOT, ROOT_ID, b"f").nodeid
    guest_acl = _acl((1, 6, 0xFFFFFFFF), (2, 6, 1000), (4, 4, 0xFFFFFFFF), (8, 4, 1500),
                     (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF))
    fs.setxattr(ROOT, nodeid, b"system.posix_acl_access", guest_acl, 0)
    host_ids = _ids(os.getxattr(share / "f", "system.posix_acl_access"))
    assert (2, 101000) in host_ids and (8, 201500) in host_ids
    assert fs.getxattr(ROOT, nodeid, b"system.posix_acl_access") == guest_acl
    # A default ACL of a directory, the same way.
    d = fs.mkdir(ROOT, ROOT_ID, b"d", 0o755, 0).nodeid
    fs.setxattr(ROOT, d, b"system.posix_acl_default", guest_acl, 0)
    assert (2, 101000) in _ids(os.getxattr(share / "d", "system.posix_acl_default"))
    assert fs.getxattr(ROOT, d, b"system.posix_acl_default") == guest_acl


def test_capability_root_id_is_translated(fs, share):
    (share / "prog").write_text("#!/bin/sh\n")
    nodeid = fs.lookup(ROOT, ROOT_ID, b"prog").nodeid
    # A v3 capability (cap_net_raw, effective) whose namespace root is guest uid 1000.
    cap = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, 1000)
    fs.setxattr(ROOT, nodeid, b"security.capability", cap, 0)
    host = os.getxattr(share / "prog", "security.capability")
    assert struct.unpack("<IIIIII", host)[5] == 101000
    assert fs.getxattr(ROOT, nodeid, b"security.capability") == cap


def test_access_compares_guest_ids(fs, share):
    (share / "mine").write_text("x")
    os.chown(share / "mine", 101000, 201000)
    os.chmod(share / "mine", 0o600)
    nodeid = fs.lookup(ROOT, ROOT_ID, b"mine").nodeid
    fs.access(USER, nodeid, os.R_OK | os.W_OK)
    raises_errno(errno.EACCES, fs.access, Context(1001, 1001, 4), nodeid, os.R_OK)


def test_without_rules_nothing_changes(make, share):
    (share / "f").write_text("x")
    os.chown(share / "f", 101234, 201500)
    fs = make()
    attr = fs.lookup(ROOT, ROOT_ID, b"f").attr
    assert type(attr) is os.stat_result  # no wrapper on the plain path
    assert (attr.st_uid, attr.st_gid) == (101234, 201500)
