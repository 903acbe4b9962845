"""The session state stream: the container that live migration and live upgrade carry (pure).

A FUSE session is state on both sides: the client keeps node ids, file handles, lock owners and what
INIT negotiated, and expects the server to know them all. Moving a session to a new server (a
migrated VM's destination back end, a new `vhostfs mount`) means moving that state. Each part saves
and loads its own piece as a *section*; this module only frames them. docs/session-state.md is the
format's reference.

Layout (every integer little-endian)::

    magic      8 bytes   b"VHFSSTAT"
    version    u32       FORMAT_VERSION
    count      u32       number of sections
    section*   tag (4 bytes), version u32, length u64, payload (length bytes)
    crc        u32       zlib.crc32 of everything before it

`unpack_state` checks the magic, the format version, every length against what is left, that no tag
appears twice and the checksum, so a truncated or corrupted stream is refused before any part looks
at its payload. Within a payload, `Decoder` reads fields with bounds checks and `StateError` names
what was cut off or out of range.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"VHFSSTAT"
FORMAT_VERSION = 1
#: Largest stream accepted: the per-node and per-handle records are small, so this is far above any
#: real session (about 100 bytes per inode plus its path), and it bounds what a hostile sender can
#: make the receiver hold.
MAX_STATE_SIZE = 1 << 30

_HEADER = struct.Struct("<8sII")
assert _HEADER.size == 16
_SECTION = struct.Struct("<4sIQ")
assert _SECTION.size == 16
_CRC = struct.Struct("<I")
assert _CRC.size == 4

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


class StateError(ValueError):
    """A state stream that cannot be loaded: truncated, corrupt, of another version, or naming
    something the receiver cannot account for. The message says which."""


def pack_state(sections: list[tuple[bytes, int, bytes]]) -> bytes:
    """The stream of `sections`, each (4-byte tag, section version, payload)."""
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, len(sections))]
    tags = set()
    for tag, version, payload in sections:
        if len(tag) != 4 or tag in tags:
            raise ValueError(f"section tag {tag!r} must be 4 bytes and unique")
        tags.add(tag)
        parts.append(_SECTION.pack(tag, version, len(payload)))
        parts.append(payload)
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def unpack_state(data: bytes | memoryview) -> dict[bytes, tuple[int, memoryview]]:
    """Checks the framing of stream `data`; returns tag -> (section version, payload view)."""
    view = memoryview(data)
    if len(view) > MAX_STATE_SIZE:
        raise StateError(f"state of {len(view)} bytes is larger than {MAX_STATE_SIZE}")
    if len(view) < _HEADER.size + _CRC.size:
        raise StateError(f"state truncated: {len(view)} bytes, not even a header")
    magic, version, count = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateError("not a vhostfs session state (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(f"state format version {version}; this vhostfs reads version {FORMAT_VERSION}")
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    body = view[:len(view) - _CRC.size]
    sections: dict[bytes, tuple[int, memoryview]] = {}
    pos = _HEADER.size
    for i in range(count):
        if pos + _SECTION.size > len(body):
            raise StateError(f"state truncated in the header of section {i + 1} of {count}")
        tag, sversion, length = _SECTION.unpack_from(body, pos)
        pos += _SECTION.size
        if length > len(body) - pos:
            raise StateError(f"state truncated: section {tag!r} needs {length} bytes, "
                             f"{len(body) - pos} are left")
        if tag in sections:
            raise StateError(f"section {tag!r} appears twice")
        sections[tag] = (sversion, body[pos:pos + length])
        pos += length
    if pos != len(body):
        raise StateError(f"{len(body) - pos} stray bytes after the last section")
    if zlib.crc32(body) != crc:
        raise StateError("state checksum mismatch: the stream was corrupted")
    return sections


def section(sections: dict[bytes, tuple[int, memoryview]], tag: bytes, version: int) -> Decoder:
    """A Decoder over section `tag`, which must be there with `version`."""
    found = sections.get(tag)
    if found is None:
        raise StateError(f"state has no {tag.decode(errors='replace')} section")
    if found[0] != version:
        raise StateError(f"section {tag.decode(errors='replace')} has version {found[0]}, "
                         f"this vhostfs reads version {version}")
    return Decoder(found[1], tag.decode(errors="replace"))


class Encoder:
    """Builds one section's payload field by field."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self._parts.append(_U8.pack(v))

    def u16(self, v: int) -> None:
        self._parts.append(_U16.pack(v))

    def u32(self, v: int) -> None:
        self._parts.append(_U32.pack(v))

    def u64(self, v: int) -> None:
        self._parts.append(_U64.pack(v))

    def i64(self, v: int) -> None:
        self._parts.append(_I64.pack(v))

    def blob(self, v: bytes) -> None:
        """A byte string up to 4 GiB, with its u32 length."""
        self._parts.append(_U32.pack(len(v)))
        self._parts.append(bytes(v))

    def raw(self, v: bytes) -> None:
        self._parts.append(bytes(v))

    def record(self, st: struct.Struct, *values: int) -> None:
        """Fixed fields in one struct (a record header: one pack call instead of one per field)."""
        self._parts.append(st.pack(*values))

    def payload(self) -> bytes:
        return b"".join(self._parts)


class Decoder:
    """Reads one section's payload; every read is bounds-checked (StateError when cut short)."""

    def __init__(self, data: bytes | memoryview, what: str = "state") -> None:
        self._view = memoryview(data)
        self._pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def _take(self, st: struct.Struct, field: str) -> int:
        if self.remaining < st.size:
            raise StateError(f"{self.what} section truncated reading {field}")
        (v,) = st.unpack_from(self._view, self._pos)
        self._pos += st.size
        return v

    def record(self, st: struct.Struct, what: str) -> tuple:
        """The fields of one `st` record."""
        pos = self._pos
        if len(self._view) - pos < st.size:
            raise StateError(f"{self.what} section truncated reading {what}")
        self._pos = pos + st.size
        return st.unpack_from(self._view, pos)

    def u8(self, field: str) -> int:
        return self._take(_U8, field)

    def u16(self, field: str) -> int:
        return self._take(_U16, field)

    def u32(self, field: str) -> int:
        return self._take(_U32, field)

    def u64(self, field: str) -> int:
        return self._take(_U64, field)

    def i64(self, field: str) -> int:
        return self._take(_I64, field)

    def count(self, field: str, record_size: int) -> int:
        """A u32 record count, refused if `record_size`-byte records that many could not fit."""
        n = self.u32(field)
        if n * record_size > self.remaining:
            raise StateError(f"{self.what} section claims {n} {field}, more than its "
                             f"{self.remaining} bytes can hold")
        return n

    def blob(self, field: str, limit: int) -> bytes:
        """A length-prefixed byte string of at most `limit` bytes."""
        n = self.u32(field)
        if n > limit:
            raise StateError(f"{self.what}: {field} of {n} bytes is longer than {limit}")
        if n > self.remaining:
            raise StateError(f"{self.what} section truncated reading {field}")
        v = bytes(self._view[self._pos:self._pos + n])
        self._pos += n
        return v

    def end(self) -> None:
        """Checks that the payload was read to its last byte."""
        if self.remaining:
            raise StateError(f"{self.what} section has {self.remaining} stray bytes at its end")
