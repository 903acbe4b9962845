"""Fuzzing the session state loader with hostile streams.

A source passthrough saves a session (nodes in subdirectories, open files, an open directory half
read, a lock); each example then rewrites its sections (a section's payload with bytes flipped,
cut, extended, or with fields replaced by edge values; paths aimed at a canary next to the share
through "..", symlinks and absolute names) and frames the result again, so that it passes the
checksum and reaches the parsers behind it. Loading must either succeed or raise StateError,
change nothing when it raises, never touch the canary, and leave no fd behind once the file
system is closed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_passthrough import _tree
from tests.unit.test_passthrough_locks import Server
from tests.unit.test_session_state import WANT, lookup, open_, readdir_names
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse import abi
from vhostfs.fuse.session_state import StateError, pack_state, unpack_state

EDGES = [0, 1, 2, 0xFF, 0xFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1]
NAMES = [b"..", b"../canary/secret", b"/etc/passwd", b"to_canary/secret", b"to_canary", b"sub/../..",
         b"sub/f0", b"f\0", b"", b"a" * 300]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _setup(base: Path) -> tuple[Path, Path, bytes]:
    share, canary = base / "share", base / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    os.symlink(canary, share / "to_canary")
    (share / "sub").mkdir()
    for i in range(5):
        (share / "sub" / f"f{i}").write_bytes(b"x" * i)
    fs = Passthrough(str(share))
    try:
        src = Server(fs)
        src.init(WANT)
        sub = lookup(src, b"sub")
        for i in range(5):
            node = lookup(src, f"f{i}".encode(), sub)
            if i < 2:
                fh = open_(src, node)
        assert src.lk(abi.FUSE_SETLK, fh, 9, 0, 9, 1, nodeid=node)[0] == 0
        dfh = open_(src, sub, os.O_RDONLY, abi.FUSE_OPENDIR)
        readdir_names(src, sub, dfh, 0, 100)
        data = src.server.save_state()
    finally:
        fs.close()
    return share, canary, data


_BASE = Path(tempfile.mkdtemp(prefix="vhostfs-fuzz-state-"))
SHARE, CANARY, STATE = _setup(_BASE)
CANARY_TREE = _tree(CANARY)
SECTIONS = {tag: (v, bytes(p)) for tag, (v, p) in unpack_state(STATE).items()}


@st.composite
def mutated(draw) -> bytes:
    sections = dict(SECTIONS)
    for _ in range(draw(st.integers(1, 3))):
        tag = draw(st.sampled_from(sorted(sections)))
        version, payload = sections[tag]
        buf = bytearray(payload)
        kind = draw(st.sampled_from(["flip", "cut", "extend", "field", "name", "version", "drop"]))
        if kind == "flip" and buf:
            at = draw(st.integers(0, len(buf) - 1))
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del buf[draw(st.integers(0, len(buf))):]
        elif kind == "extend":
            buf += draw(st.binary(max_size=64))
        elif kind == "field" and len(buf) >= 8:
            at = draw(st.integers(0, len(buf) - 8))
            width = draw(st.sampled_from([1, 4, 8]))
            value = draw(st.sampled_from(EDGES)) & ((1 << (8 * width)) - 1)
            buf[at:at + width] = value.to_bytes(width, "little")
        elif kind == "name":
            # Replace one saved path (a length-prefixed "sub/..." string) with a hostile one.
            at = bytes(buf).find(b"sub")
            if at >= 4:
                old_len = int.from_bytes(buf[at - 4:at], "little")
                new = draw(st.sampled_from(NAMES))
                buf[at - 4:at + old_len] = len(new).to_bytes(4, "little") + new
        elif kind == "version":
            version = draw(st.sampled_from([0, 2, 0xFFFFFFFF]))
        elif kind == "drop":
            sections.pop(tag)
            continue
        sections[tag] = (version, bytes(buf))
    return pack_state([(tag, v, p) for tag, (v, p) in sections.items()])


@given(mutated())
def test_hostile_streams_load_or_are_refused_cleanly(data: bytes) -> None:
    before = _fds()
    fs = Passthrough(str(SHARE))
    try:
        dst = Server(fs)
        try:
            dst.server.load_state(data)
        except StateError:
            assert not dst.server.initialized
            assert len(fs._inodes) == 1  # nothing half-loaded: the root alone
        else:
            assert dst.server.initialized
    finally:
        fs.close()
    assert _tree(CANARY) == CANARY_TREE
    assert sorted(p.name for p in SHARE.iterdir()) == ["sub", "to_canary"]
    assert _fds() == before, "the loader leaked fds"
