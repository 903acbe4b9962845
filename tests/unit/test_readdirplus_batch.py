"""READDIRPLUS of the passthrough through the FUSE server: the batched native path (HostDirentsPlus)
answers what the per-entry path answers, record for record, and counts the same lookups; entries gone
meanwhile are left out, host mount points flagged, and every node is the one LOOKUP gives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.unit import test_passthrough_scale
from tests.unit.test_passthrough_locks import Server
from vhostfs.fs.idmap import IdMap
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import HostDirentsPlus
from vhostfs.fuse.server import DEFAULT_WANT


class PerEntry(Passthrough):
    """The passthrough with its READDIRPLUS listing hidden behind a plain iterator: the server then
    packs entry by entry from DirEntry objects."""

    def readdir(self, ctx, nodeid, fh, offset, plus):
        listing = super().readdir(ctx, nodeid, fh, offset, plus)
        return iter(listing) if plus else listing


#: Mounts made by a test (root only), detached at the end.
mounts = test_passthrough_scale.mounts


def fill(share: Path) -> None:
    (share / "d").mkdir()
    for i in range(300):
        (share / "d" / f"file-{i:03d}-{'x' * (i % 37)}").write_bytes(b"y" * i)
    (share / "d" / "sub").mkdir()
    os.symlink("nowhere", share / "d" / "link")
    os.mkfifo(share / "d" / "fifo")


def server(fs: Passthrough) -> Server:
    srv = Server(fs)
    srv.init(DEFAULT_WANT | abi.FUSE_DO_READDIRPLUS)
    return srv


def lookup(srv: Server, name: bytes, parent: int = 1) -> tuple:
    err, body = srv.call(abi.FUSE_LOOKUP, name + b"\0", parent)
    assert err == 0
    return abi.ENTRY_OUT.unpack(body)


def list_plus(srv: Server, nodeid: int, size: int) -> list[bytes]:
    """Every READDIRPLUS reply body of one listing of `nodeid` in `size`-byte requests."""
    err, body = srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), nodeid)
    assert err == 0
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    replies, offset = [], 0
    while True:
        err, body = srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, offset, size, 0, 0, 0), nodeid)
        assert err == 0 and len(body) <= size
        if not body:
            break
        replies.append(body)
        offset = records(body)[-1][1]
    assert srv.call(abi.FUSE_RELEASEDIR, abi.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)[0] == 0
    return replies


def records(body: bytes) -> list[tuple[tuple, int, bytes]]:
    """(fuse_entry_out fields, cookie, name) of each fuse_direntplus record of `body`."""
    out, pos = [], 0
    while pos < len(body):
        values = abi.DIRENTPLUS.unpack_from(body, pos)
        entry, (_ino, cookie, namelen, _type) = values[:-4], values[-4:]
        start = pos + abi.DIRENTPLUS.size
        out.append((entry, cookie, body[start:start + namelen]))
        pos += (abi.DIRENTPLUS.size + namelen + 7) & ~7
    return out


def by_name(replies: list[bytes], fs: Passthrough) -> dict[bytes, tuple]:
    """name -> (entry fields but the node id, cookie, lookup count of the node) of a listing."""
    out = {}
    for body in replies:
        for entry, cookie, name in records(body):
            nid = entry[0]
            out[name] = (entry[1:], cookie, fs._inodes._by_id[nid].nlookup if nid else 0)
    return out


def counts(fs: Passthrough) -> dict[int, int]:
    return {nid: inode.nlookup for nid, inode in fs._inodes._by_id.items()}


@pytest.mark.parametrize("size", [4096, 600, 200])
def test_batched_replies_equal_the_per_entry_ones(share, size):
    fill(share)
    fast_fs, slow_fs = Passthrough(str(share)), PerEntry(str(share))
    try:
        fast, slow = server(fast_fs), server(slow_fs)
        d = lookup(fast, b"d")[0]
        assert lookup(slow, b"d")[0] == d
        # The first listing makes the nodes, the second finds them known. Node ids may differ (the
        # per-entry path makes, then forgets, the node of the entry that did not fit): they are
        # compared through the names they were listed as.
        for _ in range(2):
            got, want = list_plus(fast, d, size), list_plus(slow, d, size)
            assert [len(body) for body in got] == [len(body) for body in want]
            assert by_name(got, fast_fs) == by_name(want, slow_fs)
        names = [name for body in got for _, _, name in records(body)]
        assert len(names) == len(set(names)) == 305
    finally:
        fast_fs.close()
        slow_fs.close()


def test_entries_carry_what_lookup_answers(make, share):
    fill(share)
    fs = make()
    srv = server(fs)
    d = lookup(srv, b"d")[0]
    for body in list_plus(srv, d, 4096):
        for entry, _, name in records(body):
            if name in (b".", b".."):
                assert entry == (0,) * len(entry)
                continue
            again = lookup(srv, name, d)
            assert entry == again
            st = os.lstat(share / "d" / name.decode())
            assert (entry[6], entry[7], entry[15]) == (st.st_ino, st.st_size, st.st_mode)


def test_forgetting_every_listed_node_empties_the_table(make, share):
    fill(share)
    fs = make()
    srv = server(fs)
    d = lookup(srv, b"d")[0]
    before = counts(fs)
    listed = [entry[0] for body in list_plus(srv, d, 1024) for entry, _, _ in records(body) if entry[0]]
    assert len(listed) == 303
    for nid in listed:
        srv.call(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nid, reply=False)
    assert counts(fs) == before


def test_entries_gone_before_their_lookup_are_left_out(make, share):
    fill(share)
    fs = make()
    srv = server(fs)
    d = lookup(srv, b"d")[0]
    err, body = srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), d)
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    err, body = srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, 0, 1024, 0, 0, 0), d)
    first = records(body)
    gone = {f"file-{i:03d}-{'x' * (i % 37)}".encode() for i in range(0, 300, 3)}
    for name in gone:
        os.unlink(share / "d" / name.decode())
    names, offset = [n for _, _, n in first], first[-1][1]
    before = counts(fs)
    counted = 0
    while True:
        err, body = srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, offset, 1024, 0, 0, 0), d)
        assert err == 0
        if not body:
            break
        for entry, cookie, name in records(body):
            names.append(name)
            counted += 1
            offset = cookie
            assert entry[0]
    later = set(names[len(first):])
    assert not later & gone and len(names) == len(set(names))
    assert set(names) >= set(os.listdir(os.fsencode(share / "d")))
    assert sum(counts(fs).values()) - sum(before.values()) == counted


def test_a_buffer_too_small_for_one_entry_is_einval_and_counts_nothing(make, share):
    fill(share)
    fs = make()
    srv = server(fs)
    d = lookup(srv, b"d")[0]
    err, body = srv.call(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), d)
    fh = abi.OPEN_OUT.unpack_from(body)[0]
    before = counts(fs)
    # Entry 2 is the first file, whose record takes more than 160 bytes.
    assert srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, 2, 160, 0, 0, 0), d)[0] == errno.EINVAL
    assert counts(fs) == before
    # Past the end is the end, not an error.
    err, body = srv.call(abi.FUSE_READDIRPLUS, abi.READ_IN.pack(fh, 10**6, 4096, 0, 0, 0), d)
    assert (err, body) == (0, b"")


def test_the_passthrough_answers_a_batched_listing(make, share):
    fill(share)
    fs = make()
    d = fs.lookup(None, 1, b"d").nodeid
    fh = fs.opendir(None, d, 0).fh
    assert isinstance(fs.readdir(None, d, fh, 0, True), HostDirentsPlus)
    assert not isinstance(fs.readdir(None, d, fh, 0, False), HostDirentsPlus)


def test_host_mount_points_are_flagged_and_their_files_stay_distinct(make, share, mounts):
    for name in ("m1", "m2"):
        (share / name).mkdir()
        mounts(b"tmpfs", share / name, b"tmpfs")
        (share / name / "f").write_bytes(name.encode())
    (share / "plain").mkdir()
    srv = server(make(announce_submounts=True))
    flags = {name: entry[-1] for body in list_plus(srv, 1, 4096) for entry, _, name in records(body)}
    assert flags[b"m1"] == flags[b"m2"] == abi.FUSE_ATTR_SUBMOUNT and flags[b"plain"] == 0
    # The same inode number on two tmpfs mounts: two nodes, each the one LOOKUP gives.
    nodes = {}
    for name in (b"m1", b"m2"):
        parent = lookup(srv, name)[0]
        (entry, _, _), = [r for body in list_plus(srv, parent, 4096) for r in records(body) if r[2] == b"f"]
        assert entry[0] == lookup(srv, b"f", parent)[0]
        nodes[name] = entry[0]
    assert nodes[b"m1"] != nodes[b"m2"]
    plain = server(make())
    assert all(entry[-1] == 0 for body in list_plus(plain, 1, 4096) for entry, _, _ in records(body))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_translated_owners_are_the_guest_ids_lookup_gives(make, share):
    fill(share)
    for i, path in enumerate(sorted((share / "d").iterdir())):
        os.lchown(path, 100000 + i, 200000 + 2 * i)
    fs = make(translate_uid=IdMap(["map:0:100000:2000"]), translate_gid=IdMap(["map:0:200000:2000"],
                                                                             "--translate-gid"))
    srv = server(fs)
    d = lookup(srv, b"d")[0]
    seen = 0
    for body in list_plus(srv, d, 4096):
        for entry, _, name in records(body):
            if entry[0]:
                st = os.lstat(share / "d" / name.decode())
                assert (entry[17], entry[18]) == (st.st_uid - 100000, st.st_gid - 200000)
                assert entry == lookup(srv, name, d)
                seen += 1
    assert seen == 303
