"""Scatter-gather views: a request's bytes as a list of memoryview segments, read or filled in order.

A virtio descriptor chain and a /dev/fuse buffer both become a `Reader` (the bytes the server consumes)
and a `Writer` (the room it replies into). The segments are views of guest memory or of a transport
buffer; the bulk paths (`Reader.write_to_fd`, `Writer.read_from_fd`) hand them straight to
os.pwritev/os.preadv, so file data never passes through a Python bytes object.

This module sits below both the virtqueue layer and the FUSE layer, which share it without knowing
about each other.
"""

from __future__ import annotations

import os
import struct

#: Linux limit on the iovecs one preadv/pwritev call takes.
IOV_MAX = 1024

_U32 = struct.Struct("<I")
assert _U32.size == 4


def _take(segs: list[memoryview], idx: int, off: int, size: int) -> tuple[list[memoryview], int, int]:
    """Up to `size` bytes of views starting at segs[idx][off:]; returns (views, new idx, new off)."""
    views = []
    n = len(segs)
    while size > 0 and idx < n:
        seg = segs[idx]
        avail = len(seg) - off
        if avail <= size:
            views.append(seg[off:] if off else seg)
            size -= avail
            idx += 1
            off = 0
        else:
            views.append(seg[off:off + size])
            off += size
            size = 0
    return views, idx, off


def _transfer(call, fd: int, segs: list[memoryview], idx: int, off: int, size: int, offset: int) -> int:
    """Runs os.preadv or os.pwritev over `size` bytes of segs[idx][off:], IOV_MAX views at a time.

    Returns the bytes transferred; stops early on a short transfer (end of file, full disk).
    """
    if off == 0 and size == sum(map(len, segs[idx:idx + IOV_MAX])) and len(segs) - idx <= IOV_MAX:
        # The usual case, a request's whole data area: the segments go to the kernel as they are.
        return call(fd, segs[idx:] if idx else segs, offset)
    views, _, _ = _take(segs, idx, off, size)
    done = 0
    for start in range(0, len(views), IOV_MAX):
        batch = views[start:start + IOV_MAX]
        want = sum(map(len, batch))
        n = call(fd, batch, offset + done)
        done += n
        if n < want:
            break
    return done


class Reader:
    """Consumes the device-readable bytes of a request, front to back.

    `remaining` is the number of bytes not yet consumed. Reads past the end return what is left
    (short), never raise; callers check lengths against `remaining` first.
    """

    __slots__ = ("_segs", "_idx", "_off", "remaining")

    def __init__(self, segs: list[memoryview]) -> None:
        self._segs = segs
        self._idx = 0
        self._off = 0
        self.remaining = sum(map(len, segs))

    def read(self, size: int) -> bytes:
        """Copies and consumes up to `size` bytes (for headers and small arguments, not file data)."""
        size = min(size, self.remaining)
        if size <= 0:
            return b""
        seg = self._segs[self._idx]
        off = self._off
        if len(seg) - off > size:
            self._off = off + size
            self.remaining -= size
            return bytes(seg[off:off + size])
        views, self._idx, self._off = _take(self._segs, self._idx, off, size)
        self.remaining -= size
        return b"".join(views)

    def peek_u32(self, offset: int) -> int | None:
        """The little-endian u32 at `offset` bytes ahead, without consuming anything; None if short.

        For a look at a header field (the device routes requests by their FUSE opcode) that costs
        no copy when, as usual, the field lies in the first view.
        """
        seg = self._segs[self._idx] if self._idx < len(self._segs) else b""
        start = self._off + offset
        if start + 4 <= len(seg):
            return _U32.unpack_from(seg, start)[0]
        if offset + 4 > self.remaining:
            return None
        views, _, _ = _take(self._segs, self._idx, self._off, offset + 4)
        return _U32.unpack_from(b"".join(views), offset)[0]

    def peek_u64(self, offset: int) -> int | None:
        """The little-endian u64 at `offset` bytes ahead, without consuming anything; None if short."""
        low, high = self.peek_u32(offset), self.peek_u32(offset + 4)
        return None if low is None or high is None else low | high << 32

    def skip(self, size: int) -> int:
        """Consumes up to `size` bytes without copying them; returns how many were skipped."""
        size = min(size, self.remaining)
        _, self._idx, self._off = _take(self._segs, self._idx, self._off, size)
        self.remaining -= size
        return size

    def views(self, size: int) -> list[memoryview]:
        """Consumes up to `size` bytes and returns them as views (no copy)."""
        size = min(size, self.remaining)
        views, self._idx, self._off = _take(self._segs, self._idx, self._off, size)
        self.remaining -= size
        return views

    def write_to_fd(self, fd: int, size: int, offset: int) -> int:
        """Writes the next `size` bytes to `fd` at `offset` with os.pwritev, straight from the views.

        Returns the bytes written (short only if the file system wrote short); consumes exactly those.
        Raises OSError from pwritev.
        """
        size = min(size, self.remaining)
        idx, off = self._idx, self._off
        done = _transfer(os.pwritev, fd, self._segs, idx, off, size, offset)
        if done == self.remaining:
            self._idx, self._off = len(self._segs), 0
        else:
            _, self._idx, self._off = _take(self._segs, idx, off, done)
        self.remaining -= done
        return done


class Writer:
    """Fills the device-writable bytes of a reply, front to back.

    `written` counts the bytes written so far, `available` the room left. Writing more than
    `available` raises ValueError: the server sizes replies against `available` before writing.
    """

    __slots__ = ("_segs", "_idx", "_off", "available", "written")

    def __init__(self, segs: list[memoryview]) -> None:
        self._segs = segs
        self._idx = 0
        self._off = 0
        self.available = sum(map(len, segs))
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copies `data` into the next bytes; returns len(data)."""
        size = len(data)
        if size > self.available:
            raise ValueError(f"reply of {size} bytes exceeds the {self.available} writable bytes")
        if size == 0:
            return 0
        seg = self._segs[self._idx]
        off = self._off
        if len(seg) - off > size:
            seg[off:off + size] = data
            self._off = off + size
        else:
            views, self._idx, self._off = _take(self._segs, self._idx, off, size)
            pos = 0
            src = memoryview(data).cast("B") if not isinstance(data, bytes) else data
            for v in views:
                n = len(v)
                v[:] = src[pos:pos + n]
                pos += n
        self.available -= size
        self.written += size
        return size

    def views(self, size: int) -> list[memoryview]:
        """Claims the next `size` bytes (at most `available`) as views to fill in place, counted written."""
        size = min(size, self.available)
        views, self._idx, self._off = _take(self._segs, self._idx, self._off, size)
        self.available -= size
        self.written += size
        return views

    def read_from_fd(self, fd: int, size: int, offset: int) -> int:
        """Fills up to `size` bytes from `fd` at `offset` with os.preadv, straight into the views.

        Stops at end of file; returns the bytes read and counts exactly those as written.
        Raises OSError from preadv.
        """
        size = min(size, self.available)
        idx, off = self._idx, self._off
        done = _transfer(os.preadv, fd, self._segs, idx, off, size, offset)
        if done == self.available:
            self._idx, self._off = len(self._segs), 0
        else:
            _, self._idx, self._off = _take(self._segs, idx, off, done)
        self.available -= done
        self.written += done
        return done

    def split_at(self, offset: int) -> Writer:
        """Splits the unwritten room: this writer keeps the first `offset` bytes, the returned one the rest.

        Used for the FUSE out header: the data is filled through the second writer, then the header,
        whose length depends on it, through the first.
        """
        if offset > self.available:
            raise ValueError(f"split at {offset} beyond the {self.available} writable bytes")
        head, idx, off = _take(self._segs, self._idx, self._off, offset)
        tail = self._segs[idx:]
        if tail and off:
            tail[0] = tail[0][off:]
        rest = Writer(tail)
        self._segs = head
        self._idx = 0
        self._off = 0
        self.available = offset
        return rest
