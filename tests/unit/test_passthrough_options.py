"""Passthrough options (virtiofsd's flags), ownership of new files, and the xattr map, against a
temporary share next to a canary directory that must stay untouched."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import subprocess

import pytest

from tests.unit.test_passthrough_locks import Server
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.abi import FUSE_WRITE_KILL_SUIDGID
from vhostfs.fuse.filesystem import ROOT_ID, ConnectionInfo, Context, SetAttr
from vhostfs.fuse.server import DEFAULT_WANT

CTX = Context(0, 0, 1)
USER = Context(1000, 1000, 2)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setfsuid, mount)")


def want(fs: Passthrough, capable: int) -> int:
    conn = ConnectionInfo(7, 38, capable, DEFAULT_WANT & capable, 1 << 20, 1 << 17, 256)
    fs.init(conn)
    return conn.want


def host_flags(fs: Passthrough, fh: int) -> int:
    with fs._handles.use(fh) as handle:
        return fcntl.fcntl(handle.fd, fcntl.F_GETFL)


# -- options ---------------------------------------------------------------------------------------------

OPTIONAL = (abi.FUSE_WRITEBACK_CACHE | abi.FUSE_SUBMOUNTS | abi.FUSE_HANDLE_KILLPRIV_V2
            | abi.FUSE_DIRECT_IO_ALLOW_MMAP)
ALL = DEFAULT_WANT | OPTIONAL
READDIRPLUS = abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO


def test_defaults_want_readdirplus_and_nothing_optional(make):
    got = want(make(), ALL)
    assert got & READDIRPLUS == READDIRPLUS and not got & OPTIONAL


def test_options_add_and_remove_init_flags(make):
    fs = make(readdirplus=False, writeback=True, announce_submounts=True, killpriv_v2=True, allow_mmap=True)
    got = want(fs, ALL)
    assert not got & READDIRPLUS and got & OPTIONAL == OPTIONAL


def test_no_readdirplus_reaches_the_init_reply(make):
    srv = Server(make(readdirplus=False))
    assert not srv.init(DEFAULT_WANT) & READDIRPLUS
    srv = Server(make())
    assert srv.init(DEFAULT_WANT) & READDIRPLUS == READDIRPLUS


def test_cache_never_drops_readdirplus_unless_asked(make):
    # With zero timeouts the guest would throw the attributes of READDIRPLUS away (virtiofsd agrees).
    assert not Server(make(cache="never")).init(DEFAULT_WANT) & READDIRPLUS
    assert Server(make(cache="never", readdirplus=True)).init(DEFAULT_WANT) & READDIRPLUS == READDIRPLUS


def test_allow_mmap_is_a_flags2_bit_in_the_init_reply(make):
    srv = Server(make(cache="never", allow_mmap=True))
    err, body = srv.call(abi.FUSE_INIT, abi.INIT_IN.pack(7, 38, 1 << 17, DEFAULT_WANT | abi.FUSE_INIT_EXT,
                                                           abi.FUSE_DIRECT_IO_ALLOW_MMAP >> 32))
    assert err == 0 and abi.INIT_OUT.unpack(body)[10] << 32 & abi.FUSE_DIRECT_IO_ALLOW_MMAP


def test_writeback_opens_read_write_without_append(make, share):
    (share / "f").write_bytes(b"")
    for writeback, expect in ((False, os.O_WRONLY | os.O_APPEND), (True, os.O_RDWR)):
        fs = make(writeback=writeback)
        node = fs.lookup(CTX, ROOT_ID, b"f").nodeid
        flags = host_flags(fs, fs.open(CTX, node, os.O_WRONLY | os.O_APPEND).fh)
        assert flags & (os.O_ACCMODE | os.O_APPEND) == expect
        _, created = fs.create(CTX, ROOT_ID, b"g", 0o600, os.O_WRONLY | os.O_APPEND, 0)
        assert host_flags(fs, created.fh) & (os.O_ACCMODE | os.O_APPEND) == expect


@pytest.mark.parametrize("option, flag", [("allow_direct_io", os.O_DIRECT),
                                          ("preserve_noatime", os.O_NOATIME)])
def test_direct_io_and_noatime_pass_only_when_allowed(make, share, option, flag):
    (share / "f").write_bytes(b"x" * 4096)
    for allowed in (False, True):
        fs = make(**{option: allowed})
        node = fs.lookup(CTX, ROOT_ID, b"f").nodeid
        assert bool(host_flags(fs, fs.open(CTX, node, os.O_RDONLY | flag).fh) & flag) == allowed


@ROOT_ONLY
def test_announce_submounts_flags_a_host_mount_point(make, share):
    (share / "plain").mkdir()
    (share / "mnt").mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "vhostfs-test", str(share / "mnt")],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (mount(8) failed)")
    try:
        fs = make(announce_submounts=True)
        assert fs.lookup(CTX, ROOT_ID, b"mnt").attr_flags == abi.FUSE_ATTR_SUBMOUNT
        assert fs.lookup(CTX, ROOT_ID, b"plain").attr_flags == 0
        srv = Server(fs)
        srv.init(DEFAULT_WANT | abi.FUSE_SUBMOUNTS)
        err, body = srv.call(abi.FUSE_LOOKUP, b"mnt\0")
        assert err == 0 and abi.ENTRY_OUT.unpack(body)[-1] == abi.FUSE_ATTR_SUBMOUNT
        assert make().lookup(CTX, ROOT_ID, b"mnt").attr_flags == 0  # off by default
    finally:
        subprocess.run(["umount", "-l", str(share / "mnt")], check=True)


# -- ownership and privileges ------------------------------------------------------------------------------

@ROOT_ONLY
def test_setgid_directory_passes_its_group_on(make, share):
    d = share / "team"
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2777)
    fs = make()
    team = fs.lookup(CTX, ROOT_ID, b"team").nodeid
    f, _ = fs.create(USER, team, b"file", 0o644, os.O_RDWR, 0)
    sub = fs.mkdir(USER, team, b"sub", 0o755, 0)
    assert (f.attr.st_uid, f.attr.st_gid) == (1000, 4321)
    assert (sub.attr.st_uid, sub.attr.st_gid) == (1000, 4321) and sub.attr.st_mode & stat.S_ISGID
    # Outside it, the guest user's own group.
    g, _ = fs.create(USER, sub.nodeid, b"deeper", 0o644, os.O_RDWR, 0)
    assert g.attr.st_gid == 4321
    os.chmod(share / "team" / "sub", 0o777)
    h, _ = fs.create(USER, sub.nodeid, b"plain", 0o644, os.O_RDWR, 0)
    assert h.attr.st_gid == 1000


@ROOT_ONLY
def test_non_member_cannot_create_setgid_file(make, share):
    d = share / "other"
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2777)
    fs = make()
    other = fs.lookup(CTX, ROOT_ID, b"other").nodeid
    f = fs.mknod(USER, other, b"f", stat.S_IFREG | 0o2755, 0, 0)
    assert f.attr.st_gid == 4321 and not f.attr.st_mode & stat.S_ISGID


@ROOT_ONLY
def test_chown_clears_setuid(make, share):
    (share / "prog").write_bytes(b"#!")
    os.chmod(share / "prog", 0o6755)
    fs = make()
    node = fs.lookup(CTX, ROOT_ID, b"prog").nodeid
    attr, _ = fs.setattr(CTX, node, SetAttr(uid=1000, gid=1000))
    assert attr.st_uid == 1000 and not attr.st_mode & (stat.S_ISUID | stat.S_ISGID)


@pytest.mark.parametrize("killpriv_v2", [True, False])
def test_o_trunc_open_by_a_user_clears_setuid(make, share, killpriv_v2):
    # With FUSE_ATOMIC_O_TRUNC the guest kernel sends no SETATTR for an O_TRUNC open, with or
    # without killpriv_v2: the open is where the bits must go.
    p = share / "prog"
    for who, kept in ((CTX, True), (USER, False)):
        p.write_bytes(b"data")
        os.chmod(p, 0o6775)
        fs = make(killpriv_v2=killpriv_v2)
        node = fs.lookup(CTX, ROOT_ID, b"prog").nodeid
        fs.open(who, node, os.O_WRONLY | os.O_TRUNC)
        mode = os.stat(p).st_mode
        assert bool(mode & stat.S_ISUID) == kept and bool(mode & stat.S_ISGID) == kept
        assert p.read_bytes() == b""


# -- xattr map -----------------------------------------------------------------------------------------------

def test_xattrmap_stores_names_under_the_prefix_and_lists_them_back(make, share):
    (share / "f").write_bytes(b"")
    fs = make(xattr=True, xattrmap=":map:trusted.:user.virtiofs.:")
    node = fs.lookup(CTX, ROOT_ID, b"f").nodeid
    fs.setxattr(CTX, node, b"trusted.overlay.opaque", b"y", 0)
    fs.setxattr(CTX, node, b"user.plain", b"p", 0)
    assert os.getxattr(share / "f", "user.virtiofs.trusted.overlay.opaque") == b"y"
    assert sorted(fs.listxattr(CTX, node)) == [b"trusted.overlay.opaque", b"user.plain"]
    assert fs.getxattr(CTX, node, b"trusted.overlay.opaque") == b"y"
    with pytest.raises(PermissionError):
        fs.getxattr(CTX, node, b"user.virtiofs.trusted.overlay.opaque")
    fs.removexattr(CTX, node, b"trusted.overlay.opaque")
    assert fs.listxattr(CTX, node) == [b"user.plain"]


def test_remapped_capability_is_removed_on_write_and_chown(make, share):
    (share / "f").write_bytes(b"")
    fs = make(xattr=True, xattrmap=":map::user.virtiofs.:")
    node = fs.lookup(CTX, ROOT_ID, b"f").nodeid
    cap = b"\x01\x00\x00\x02" + bytes(16)
    fs.setxattr(CTX, node, b"security.capability", cap, 0)
    fs.setxattr(CTX, node, b"user.keep", b"k", 0)
    assert os.getxattr(share / "f", "user.virtiofs.security.capability") == cap
    _, handle = fs.create(CTX, ROOT_ID, b"f", 0o644, os.O_RDWR, 0)
    fs.write(CTX, node, handle.fh, 0, b"changed", 0)
    assert fs.listxattr(CTX, node) == [b"user.keep"]
    fs.setxattr(CTX, node, b"security.capability", cap, 0)
    fs.setattr(CTX, node, SetAttr(uid=os.geteuid()))
    assert fs.listxattr(CTX, node) == [b"user.keep"]
    fs.setxattr(CTX, node, b"security.capability", cap, 0)
    fs.write(CTX, node, handle.fh, 0, b"again", FUSE_WRITE_KILL_SUIDGID)
    assert fs.listxattr(CTX, node) == [b"user.keep"]


# -- POSIX ACLs ----------------------------------------------------------------------------------------------

ACL_FLAGS = abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT
_ACL_HEADER = struct.Struct("<I")  # posix_acl_xattr_header: a_version
_ACL_ENTRY = struct.Struct("<HHI")  # posix_acl_xattr_entry: e_tag, e_perm, e_id
assert (_ACL_HEADER.size, _ACL_ENTRY.size) == (4, 8)
_NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value (version 2) of (tag, perm, id) entries, in the kernel's order."""
    return _ACL_HEADER.pack(2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)


# ACL_USER_OBJ 0x01, ACL_USER 0x02, ACL_GROUP_OBJ 0x04, ACL_MASK 0x10, ACL_OTHER 0x20
USER_1000_READS = acl((0x01, 6, _NO_ID), (0x02, 4, 1000), (0x04, 4, _NO_ID), (0x10, 4, _NO_ID),
                      (0x20, 0, _NO_ID))
ALL_RWX = acl((0x01, 7, _NO_ID), (0x04, 7, _NO_ID), (0x20, 7, _NO_ID))


def setxattr_request(name: bytes, value: bytes, setxattr_flags: int = 0) -> bytes:
    return abi.SETXATTR_IN.pack(len(value), 0, setxattr_flags) + name + b"\0" + value


@pytest.mark.parametrize("options, capable, granted", [
    ({}, ACL_FLAGS, 0),
    ({"posix_acl": True}, ACL_FLAGS, ACL_FLAGS),
    # Without setxattr_flags the guest could not ask for set-group-ID bits to go: no ACLs then.
    ({"posix_acl": True}, abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK, 0),
])
def test_posix_acl_is_negotiated_only_with_the_option(make, options, capable, granted):
    assert Server(make(**options)).init(DEFAULT_WANT | capable) & ACL_FLAGS == granted


def test_acl_round_trip_through_the_server(make, share):
    (share / "f").write_bytes(b"")
    srv = Server(make(posix_acl=True))  # no xattr=True: posix_acl implies it
    srv.init(DEFAULT_WANT | ACL_FLAGS)
    err, body = srv.call(abi.FUSE_LOOKUP, b"f\0")
    node = abi.ENTRY_OUT.unpack_from(body)[0]
    assert srv.call(abi.FUSE_SETXATTR, setxattr_request(b"system.posix_acl_access", USER_1000_READS),
                    node) == (0, b"")
    assert os.getxattr(share / "f", "system.posix_acl_access") == USER_1000_READS
    err, value = srv.call(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(4096) + b"system.posix_acl_access\0", node)
    assert (err, value) == (0, USER_1000_READS)
    assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o640  # the mask entry is the group bits
    assert srv.call(abi.FUSE_REMOVEXATTR, b"system.posix_acl_access\0", node) == (0, b"")
    with pytest.raises(OSError) as exc:
        os.getxattr(share / "f", "system.posix_acl_access")
    assert exc.value.errno == errno.ENODATA


@pytest.mark.parametrize("setxattr_flags, sgid_kept", [(0, True), (abi.FUSE_SETXATTR_ACL_KILL_SGID, False)])
def test_acl_kill_sgid_clears_the_setgid_bit(make, share, setxattr_flags, sgid_kept):
    (share / "f").write_bytes(b"")
    os.chmod(share / "f", 0o2770)
    srv = Server(make(posix_acl=True))
    srv.init(DEFAULT_WANT | ACL_FLAGS)
    node = abi.ENTRY_OUT.unpack_from(srv.call(abi.FUSE_LOOKUP, b"f\0")[1])[0]
    request = setxattr_request(b"system.posix_acl_access", USER_1000_READS, setxattr_flags)
    assert srv.call(abi.FUSE_SETXATTR, request, node) == (0, b"")
    mode = os.stat(share / "f").st_mode
    assert bool(mode & stat.S_ISGID) == sgid_kept and stat.S_IMODE(mode) & 0o777 == 0o640
    assert os.getxattr(share / "f", "system.posix_acl_access") == USER_1000_READS


def test_posix_acl_applies_the_umask_unless_a_default_acl_replaces_it(make, share):
    (share / "plain").mkdir()
    (share / "inherit").mkdir()
    os.setxattr(share / "inherit", "system.posix_acl_default", ALL_RWX)
    fs = make(posix_acl=True)
    for dirname, expect in ((b"plain", 0o755), (b"inherit", 0o777)):
        parent = fs.lookup(CTX, ROOT_ID, dirname).nodeid
        assert stat.S_IMODE(fs.mkdir(CTX, parent, b"d", 0o777, 0o022).attr.st_mode) == expect
        f, _ = fs.create(CTX, parent, b"f", 0o666, os.O_RDWR, 0o022)
        assert stat.S_IMODE(f.attr.st_mode) == expect & 0o666
    # Without the option the umask always applies (the guest kernel masked the mode already).
    plain_fs = make()
    parent = plain_fs.lookup(CTX, ROOT_ID, b"inherit").nodeid
    assert stat.S_IMODE(plain_fs.mkdir(CTX, parent, b"e", 0o777, 0o022).attr.st_mode) == 0o755


def test_malformed_xattrmap_is_refused_at_construction(share):
    with pytest.raises(ValueError, match="unknown rule type"):
        Passthrough(str(share), xattrmap=":nope:all:::")


@pytest.mark.parametrize("option", ["posix_acl", "security_label"])
def test_negotiation_modes(make, option):
    flags = {"posix_acl": abi.FUSE_POSIX_ACL, "security_label": abi.FUSE_SECURITY_CTX}[option]
    everything = abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT | abi.FUSE_SECURITY_CTX

    def negotiate(mode, capable):
        conn = ConnectionInfo(7, 39, capable, 0, 1 << 20, 1 << 17, 256)
        make(**{option: mode}).init(conn)
        return conn.want & capable & flags

    assert negotiate("never", everything) == 0
    assert negotiate("auto", everything) == flags
    assert negotiate("auto", 0) == 0
    assert negotiate("always", everything) == flags
    assert negotiate(True, everything) == flags  # the library's bool means "auto"
    with pytest.raises(OSError) as info:
        negotiate("always", 0)  # the kernel cannot: the session fails rather than serve without
    assert info.value.errno == errno.EPROTO
    with pytest.raises(ValueError):
        make(**{option: "sometimes"})
