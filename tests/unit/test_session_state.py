"""The session state that live migration moves: saved from one passthrough, loaded into another.

The "guest" is FuseServer.handle with hand-built requests; source and destination are two
Passthrough objects on the same share, as two daemons on one host are. Hostile and broken streams
are built with the format's own encoder, so they pass the framing and reach the checks behind it;
a canary directory next to the share must never change.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

from tests.unit.test_passthrough import _tree
from tests.unit.test_passthrough_locks import Server
from vhostfs.fs import migration
from vhostfs.fs.locks import F_OFD_GETLK, FLOCK, parse_fdinfo_locks
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.server import DEFAULT_WANT
from vhostfs.fuse.session_state import Encoder, StateError, pack_state, unpack_state

WANT = DEFAULT_WANT | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS


@pytest.fixture
def env(tmp_path: Path):
    share, canary = tmp_path / "share", tmp_path / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    os.symlink(canary, share / "to_canary")
    before = _tree(canary)
    made: list[Passthrough] = []

    def make(**kw) -> Server:
        fs = Passthrough(str(share), **kw)
        made.append(fs)
        return Server(fs)

    yield share, make
    for fs in made:
        fs.close()
    assert _tree(canary) == before, "the canary directory outside the share changed"


def lookup(srv: Server, name: bytes, parent: int = 1) -> int:
    err, body = srv.call(abi.FUSE_LOOKUP, name + b"\0", parent)
    assert err == 0, os.strerror(err)
    return abi.ENTRY_OUT.unpack(body)[0]


def open_(srv: Server, nodeid: int, flags: int = os.O_RDWR, opcode: int = abi.FUSE_OPEN) -> int:
    err, body = srv.call(opcode, abi.OPEN_IN.pack(flags, 0), nodeid)
    assert err == 0, os.strerror(err)
    return abi.OPEN_OUT.unpack(body)[0]


def write(srv: Server, nodeid: int, fh: int, offset: int, data: bytes) -> int:
    return srv.call(abi.FUSE_WRITE, abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0) + data, nodeid)[0]


def read(srv: Server, nodeid: int, fh: int, offset: int, size: int) -> tuple[int, bytes]:
    return srv.call(abi.FUSE_READ, abi.READ_IN.pack(fh, offset, size, 0, 0, 0), nodeid)


def readdir_names(srv: Server, nodeid: int, fh: int, offset: int, size: int = 4096) -> tuple[list, int]:
    err, body = srv.call(abi.FUSE_READDIR, abi.READ_IN.pack(fh, offset, size, 0, 0, 0), nodeid)
    assert err == 0, os.strerror(err)
    names, pos, last = [], 0, offset
    while pos < len(body):
        _, off, namelen, _ = struct.unpack_from("<QQII", body, pos)
        names.append(body[pos + 24:pos + 24 + namelen])
        last = off
        pos += (24 + namelen + 7) & ~7
    return names, last


def getattr_(srv: Server, nodeid: int) -> int:
    return srv.call(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0), nodeid)[0]


def move(src: Server, dst: Server) -> bytes:
    data = src.server.save_state()
    dst.server.load_state(data)
    return data


def test_session_moves_with_nodes_handles_dir_position_and_deleted_open_file(env):
    share, make = env
    (share / "d").mkdir()
    for i in range(40):
        (share / "d" / f"entry{i:02}").write_bytes(b"")
    (share / "f").write_bytes(b"hello")
    (share / "tmp").write_bytes(b"temporary content")
    src = make()
    src.init(WANT)
    d = lookup(src, b"d")
    f = lookup(src, b"f")
    lookup(src, b"f")  # two lookups: the count moves too
    tmp = lookup(src, b"tmp")
    fh = open_(src, f)
    tmp_fh = open_(src, tmp)
    dfh = open_(src, d, os.O_RDONLY, abi.FUSE_OPENDIR)
    first, cookie = readdir_names(src, d, dfh, 0, 400)
    assert 2 < len(first) < 42
    assert src.call(abi.FUSE_UNLINK, b"tmp\0")[0] == 0
    os.rename(share / "f", share / "d" / "renamed")  # a host rename: the path is read at save time
    (share / "d" / "entry00").unlink()  # the saved listing keeps the position exact anyway

    dst = make()
    data = move(src, dst)
    assert not [p for p in share.iterdir() if p.name.startswith(migration.UNLINKED_PREFIX)]
    assert write(dst, f, fh, 5, b" world") == 0
    assert (share / "d" / "renamed").read_bytes() == b"hello world"
    assert read(dst, tmp, tmp_fh, 0, 100) == (0, b"temporary content")
    assert write(dst, tmp, tmp_fh, 0, b"T") == 0
    rest, _ = readdir_names(dst, d, dfh, cookie)
    expected = sorted([b".", b".."] + [f"entry{i:02}".encode() for i in range(40)] + [b"renamed"])
    assert sorted(first + rest) == [n for n in expected if n != b"renamed"]
    # Lookup counts moved: two FORGETs of one make the node unknown only after the second.
    dst.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), f, reply=False)
    assert getattr_(dst, f) == 0
    dst.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), f, reply=False)
    assert getattr_(dst, f) == errno.EBADF
    # New ids never collide with the moved ones.
    assert lookup(dst, b"d") == d
    new = lookup(dst, b"entry01", d)
    assert new > tmp
    assert len(data) < 4096


def test_lock_is_taken_again_once_the_source_lets_go(env, monkeypatch):
    share, make = env
    (share / "f").write_bytes(b"x" * 100)
    src = make()
    src.init(WANT)
    f = lookup(src, b"f")
    fh = open_(src, f)
    assert src.lk(abi.FUSE_SETLK, fh, 77, 10, 19, fcntl.F_WRLCK, pid=5, nodeid=f)[0] == 0
    assert src.lk(abi.FUSE_SETLK, fh, 78, 0, 0, fcntl.F_RDLCK, flags=abi.FUSE_LK_FLOCK, nodeid=f)[0] == 0
    data = src.server.save_state()
    locks = unpack_state(data)[b"LOCK"][1]
    assert struct.unpack_from("<I", locks)[0] == 2
    monkeypatch.setattr(migration, "LOCK_RETRY_SECONDS", 10.0)
    dst = make()
    dst.server.load_state(data)
    probe = os.open(share / "f", os.O_RDWR)
    try:
        def conflict() -> int:
            res = fcntl.fcntl(probe, F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, 0, 15, 1, 0))
            return FLOCK.unpack(res)[0]
        assert conflict() == fcntl.F_WRLCK  # the source's lock
        src.server.reset()  # the source exits
        mover = dst.server.fs._mover
        mover._lock_thread.join(5)
        assert conflict() == fcntl.F_WRLCK  # now the destination's
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The guest's owner unlocks through the destination.
        assert dst.lk(abi.FUSE_SETLK, fh, 77, 10, 19, fcntl.F_UNLCK, nodeid=f)[0] == 0
        assert conflict() == fcntl.F_UNLCK
    finally:
        os.close(probe)


@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_file_removed_before_the_destination_loads(env, on_error):
    share, make = env
    (share / "keep").write_bytes(b"k")
    (share / "gone").write_bytes(b"g")
    src = make()
    src.init(WANT)
    keep, gone = lookup(src, b"keep"), lookup(src, b"gone")
    keep_fh, gone_fh = open_(src, keep), open_(src, gone)
    data = src.server.save_state()
    (share / "gone").unlink()
    dst = make(migration_on_error=on_error)
    if on_error == "abort":
        with pytest.raises(StateError, match="node 3 .*gone.* cannot be found again"):
            dst.server.load_state(data)
        assert not dst.server.initialized
        assert getattr_(dst, keep) == errno.EIO  # no session: the server waits for INIT
        assert len(dst.server.fs._inodes) == 1  # nothing half-loaded: the root alone
        return
    dst.server.load_state(data)
    assert read(dst, keep, keep_fh, 0, 10) == (0, b"k")
    assert getattr_(dst, gone) == errno.EIO
    assert read(dst, gone, gone_fh, 0, 10)[0] == errno.EIO
    assert dst.call(abi.FUSE_RELEASE, abi.RELEASE_IN.pack(gone_fh, 0, 0, 0), gone)[0] == 0
    dst.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), gone, reply=False)
    assert getattr_(dst, gone) == errno.EBADF


def test_open_deleted_file_under_abort_is_copied_and_a_failed_move_cleans_up(env):
    share, make = env
    (share / "t").write_bytes(b"abc")
    src = make()
    src.init(WANT)
    t = lookup(src, b"t")
    open_(src, t)
    (share / "t").unlink()
    src.server.save_state()
    copies = [p for p in share.iterdir() if p.name.startswith(migration.UNLINKED_PREFIX)]
    assert len(copies) == 1 and copies[0].read_bytes() == b"abc"
    src.server.fs.resume_after_save()  # the migration failed: the source goes on
    assert not [p for p in share.iterdir() if p.name.startswith(migration.UNLINKED_PREFIX)]


def test_destination_with_other_options_refuses(env):
    share, make = env
    src = make()
    src.init(WANT)
    data = src.server.save_state()
    dst = make(posix_lock=False)
    with pytest.raises(StateError, match="start it with the source's options"):
        dst.server.load_state(data)


def test_file_handles_mode_and_verify_handles(env):
    share, make = env
    (share / "f").write_bytes(b"data")
    src = make(migration_mode="find-paths", migration_verify_handles=True)
    src.init(WANT)
    f = lookup(src, b"f")
    fh = open_(src, f, os.O_RDONLY)
    data = src.server.save_state()
    # The same name, another file: the handle check sees it.
    os.rename(share / "f", share / "old")
    (share / "f").write_bytes(b"impostor")
    dst = make(migration_verify_handles=True)
    with pytest.raises(StateError, match="another file"):
        dst.server.load_state(data)
    os.replace(share / "old", share / "f")
    dst.server.load_state(data)
    assert read(dst, f, fh, 0, 10) == (0, b"data")


def test_truncated_and_corrupted_streams_are_refused(env):
    share, make = env
    (share / "f").write_bytes(b"x")
    src = make()
    src.init(WANT)
    f = lookup(src, b"f")
    open_(src, f)
    data = src.server.save_state()
    dst = make()
    for cut in range(0, len(data), max(1, len(data) // 50)):
        with pytest.raises(StateError):
            dst.server.load_state(data[:cut])
    for pos in range(0, len(data), max(1, len(data) // 50)):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(StateError):
            dst.server.load_state(bytes(bad))
    assert not dst.server.initialized
    dst.server.load_state(data)
    assert getattr_(dst, f) == 0


def _stream(src_state: bytes, node_payload: bytes) -> bytes:
    """`src_state` with its NODE section replaced (a well-framed, hostile stream)."""
    sections = unpack_state(src_state)
    out = [(tag, v, node_payload if tag == b"NODE" else bytes(p)) for tag, (v, p) in sections.items()]
    return pack_state(out)


def _node_section(nodeid: int, path: bytes, kind: int = 0o100000, nlookup: int = 1, flags: int = 1,
                  next_id: int = 100) -> bytes:
    enc = Encoder()
    enc.u64(next_id)
    enc.u32(1)
    enc.u64(nodeid)
    enc.u64(nlookup)
    enc.u32(kind)
    enc.u8(flags)
    enc.blob(path)
    enc.u32(0)
    return enc.payload()


@pytest.mark.parametrize("payload, match", [
    (_node_section(5, b"../canary/secret"), "not a plain name"),
    (_node_section(5, b"/etc/passwd"), "not a plain name"),
    (_node_section(5, b"a//b"), "not a plain name"),
    (_node_section(5, b"x\0y"), "not a plain name"),
    (_node_section(1, b"f"), "node 1"),
    (_node_section(500, b"f"), "node 500"),
    (_node_section(5, b"f", nlookup=0), "lookup count 0"),
    (_node_section(5, b"f", kind=0o170000), "file type"),
    (_node_section(5, b"f", flags=0x80), "flags"),
    (_node_section(5, b"f", flags=5), "not a copy"),
    (_node_section(5, b"to_canary/secret"), "cannot be found again"),
    (_node_section(5, b"to_canary"), "cannot be found again"),  # a symlink, saved as a file
    (_node_section(5, b"f")[:-3], "truncated"),
    (_node_section(5, b"f") + b"\0", "stray bytes"),
    (b"\xff" * 8 + b"\xff\xff\xff\x7f", "next nodeid"),
])
def test_hostile_node_sections_are_refused(env, payload, match):
    share, make = env
    (share / "f").write_bytes(b"x")
    src = make()
    src.init(WANT)
    dst = make()
    with pytest.raises(StateError, match=match):
        dst.server.load_state(_stream(src.server.save_state(), payload))
    assert not dst.server.initialized


def test_a_count_larger_than_its_section_is_refused(env):
    share, make = env
    src = make()
    src.init(WANT)
    enc = Encoder()
    enc.u64(100)
    enc.u32(1 << 30)
    with pytest.raises(StateError, match="more than its"):
        make().server.load_state(_stream(src.server.save_state(), enc.payload()))


def test_uninitialized_session_moves_as_nothing(env):
    share, make = env
    src = make()
    dst = make()
    move(src, dst)
    assert not dst.server.initialized


def test_framing_errors_say_what_is_wrong():
    good = pack_state([(b"TEST", 1, b"abc")])
    assert unpack_state(good)[b"TEST"][0] == 1
    with pytest.raises(StateError, match="bad magic"):
        unpack_state(b"X" + good[1:])
    with pytest.raises(StateError, match="version 2"):
        unpack_state(good[:8] + struct.pack("<I", 2) + good[12:])
    with pytest.raises(StateError, match="checksum"):
        unpack_state(good[:-6] + b"x" + good[-5:])
    with pytest.raises(StateError, match="not even a header"):
        unpack_state(good[:10])


def test_parse_fdinfo_locks():
    text = ("pos:\t0\nflags:\t02\nmnt_id:\t30\nino:\t12\n"
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 08:01:12 10 19\n"
            "lock:\t2: OFDLCK ADVISORY  READ -1 08:01:12 100 EOF\n"
            "lock:\t3: FLOCK  ADVISORY  WRITE 99 08:01:12 0 EOF\n"
            "lock:\t4: -> OFDLCK ADVISORY  WRITE -1 08:01:12 0 EOF\n")
    assert parse_fdinfo_locks(text) == [
        ("OFDLCK", fcntl.F_WRLCK, 10, 19), ("OFDLCK", fcntl.F_RDLCK, 100, (1 << 63) - 1),
        ("FLOCK", fcntl.F_WRLCK, 0, (1 << 63) - 1)]


def test_fdinfo_lock_lines_of_this_kernel(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, 37, FLOCK.pack(fcntl.F_WRLCK, 0, 2, 3, 0))  # F_OFD_SETLK
        with open(f"/proc/self/fdinfo/{fd}") as f:
            assert parse_fdinfo_locks(f.read()) == [("OFDLCK", fcntl.F_WRLCK, 2, 4)]
    finally:
        os.close(fd)


def test_upgrade_messages_are_checked():
    from vhostfs.fuse import upgrade

    assert upgrade.parse_offer(upgrade.OFFER.pack(upgrade.OFFER_MAGIC, 10)) == 10
    with pytest.raises(upgrade.UpgradeError, match="not a vhostfs mount"):
        upgrade.parse_offer(upgrade.OFFER.pack(b"XXXXXXXX", 10))
    with pytest.raises(upgrade.UpgradeError, match="larger than"):
        upgrade.parse_offer(upgrade.OFFER.pack(upgrade.OFFER_MAGIC, 1 << 40))
    assert upgrade.parse_answer(upgrade.ANSWER.pack(b"OK", 0)) == (True, 0)
    assert upgrade.parse_answer(upgrade.ANSWER.pack(b"NO", 12)) == (False, 12)
    for bad in (upgrade.ANSWER.pack(b"MY", 0), upgrade.ANSWER.pack(b"NO", 1 << 20)):
        with pytest.raises(upgrade.UpgradeError):
            upgrade.parse_answer(bad)


def test_file_handles_mode_finds_renamed_files(env):
    share, make = env
    (share / "f").write_bytes(b"by handle")
    src = make(migration_mode="file-handles")
    src.init(WANT)
    f = lookup(src, b"f")
    fh = open_(src, f, os.O_RDONLY)
    data = src.server.save_state()
    os.rename(share / "f", share / "renamed")  # after the save: a path would be wrong now
    dst = make(migration_mode="file-handles")
    dst.server.load_state(data)
    assert read(dst, f, fh, 0, 20) == (0, b"by handle")
    # Whatever its own mode, a destination finds a node by what the stream carries.
    other = make()
    other.server.load_state(data)
    assert read(other, f, fh, 0, 20) == (0, b"by handle")


@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_with_inode_file_handles_the_destination_loads_in_batches_within_its_fd_cache(env, mode):
    share, make = env
    (share / "d").mkdir()
    for i in range(700):
        (share / "d" / f"f{i}").write_bytes(b"%d" % i)
    src = make(inode_file_handles="prefer", migration_mode=mode)
    src.init(WANT)
    d = lookup(src, b"d")
    nodes = [lookup(src, f"f{i}".encode(), d) for i in range(700)]
    fh = open_(src, nodes[650], os.O_RDONLY)
    data = src.server.save_state()
    before = len(os.listdir("/proc/self/fd"))
    dst = make(inode_file_handles="prefer", fd_budget=1000)
    dst.server.fs._inodes._cache_size = 64
    dst.server.load_state(data)
    if dst.server.fs._inodes.file_handles == "never":
        pytest.skip("the share's file system has no file handles")
    assert len(os.listdir("/proc/self/fd")) - before < 200  # not one fd per node
    assert read(dst, nodes[650], fh, 0, 10) == (0, b"650")
    assert getattr_(dst, nodes[3]) == 0


def test_a_name_ending_in_deleted_is_a_name(env):
    share, make = env
    (share / "x (deleted)").write_bytes(b"still here")
    src = make()
    src.init(WANT)
    x = lookup(src, b"x (deleted)")
    fh = open_(src, x, os.O_RDONLY)
    dst = make()
    move(src, dst)
    assert read(dst, x, fh, 0, 20) == (0, b"still here")
