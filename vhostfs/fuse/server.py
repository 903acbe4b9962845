"""The FUSE server: parses one request, calls the Filesystem, writes the reply.

`FuseServer.handle(reader, writer)` is the whole interface. The transport (a virtio-fs queue or
/dev/fuse) hands it the request bytes as a `Reader` and the room for the reply as a `Writer`; the
server fills in `fuse_out_header` plus the reply body and says how many bytes it wrote.

The guest is untrusted. Every length, count and name is checked before use, a malformed request
gets an error reply (or none, when not even the `unique` can be read or the opcode never takes a
reply), and no size field in a request can make the server allocate beyond the request itself
and the reply room the transport gave it. One instance may serve several queues from several
threads. The only state kept about requests in flight is for those that may wait without bound
(SETLKW): each gets an event the file system watches (`Context.interrupt`), set by a FUSE_INTERRUPT
naming the request, by `interrupt`, and by the end of the session.
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from vhostfs import native
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import (
    TIME_NOW,
    Attr,
    ConnectionInfo,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    HostDirents,
    HostDirentsPlus,
    Lock,
    Open,
    SetAttr,
    Statx,
)
from vhostfs.fuse.session_state import Encoder, StateError, pack_state, section, unpack_state

if TYPE_CHECKING:
    from vhostfs.iov import Reader, Writer

log = logging.getLogger("vhostfs.fuse")

#: INIT flags the server asks for whenever the client offers them (the Filesystem may change this).
DEFAULT_WANT = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_DO_READDIRPLUS
    | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_INIT_EXT
    | abi.FUSE_CACHE_SYMLINKS
)

_HDR = abi.OUT_HEADER
_HDR_SIZE = _HDR.size
_IN_SIZE = abi.IN_HEADER.size
# len, opcode, unique: the part of fuse_in_header needed to answer even a truncated request.
_IN_PREFIX = struct.Struct("<IIQ")
assert abi.IN_HEADER.format.startswith(_IN_PREFIX.format)
# Where fuse_in_header's opcode and unique lie (after the u32 len; the opcode is a u32).
_OPCODE_OFFSET = 4
_UNIQUE_OFFSET = 8
# fcntl(2) F_UNLCK, the lock type FUSE carries for "unlock".
_F_UNLCK = 2
_PAGE = 4096
_NSEC = 1_000_000_000
# Kernel timeouts are (u64 sec, u32 nsec) that it reads as a signed time64_t; 2**32 s (136 years)
# already means forever.
_MAX_TIMEOUT_SEC = 1 << 32
# The COPY_FILE_RANGE reply carries a u32 count; the kernel itself caps len at UINT_MAX & PAGE_MASK.
_COPY_MAX = 0xFFFFFFFF & ~(_PAGE - 1)
_ZEROS = bytes(abi.DIRENT_ALIGN)
# Data an IOCTL may carry out, whatever out_size the request claims. A restricted ioctl moves at most
# _IOC_SIZE (14 bits: under 16 KiB) each way; the guest kernel's own (fs-verity) at most 256 pages.
_IOCTL_MAX = 256 * _PAGE
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_MAPPING_FLAGS = abi.FUSE_SETUPMAPPING_FLAG_READ | abi.FUSE_SETUPMAPPING_FLAG_WRITE
# A DAX range [offset, offset + length) must end within the 64 bits of the kernel's u64 fields.
_U64_LIMIT = 1 << 64
# fuse_entry_out with nodeid 0: "no node" (a negative entry, or readdirplus without attributes).
_ZERO_ENTRY = (0,) * len(abi.ENTRY_OUT.unpack(bytes(abi.ENTRY_OUT.size)))
# Opcodes the kernel never waits an answer for: a reply would name a unique nobody owns.
_NO_REPLY = frozenset({abi.FUSE_FORGET, abi.FUSE_BATCH_FORGET, abi.FUSE_INTERRUPT, abi.FUSE_NOTIFY_REPLY})
# INTERRUPTs remembered for requests not (yet) waiting: the interrupt may overtake its request (another
# virtqueue, another /dev/fuse reader). The kernel's uniques only grow, so the oldest are dropped.
_EARLY_INTERRUPTS_MAX = 64
# Contexts kept for reuse; past this many (guest processes), the cache starts over.
_CONTEXTS_MAX = 1024


def _with_header(body: struct.Struct) -> struct.Struct:
    """fuse_out_header followed by `body`, packed in one call (one allocation per reply)."""
    return struct.Struct(_HDR.format + body.format[1:])


_R_ENTRY = _with_header(abi.ENTRY_OUT)
_R_ATTR = _with_header(abi.ATTR_OUT)
_R_OPEN = _with_header(abi.OPEN_OUT)
_R_CREATE = struct.Struct(_R_ENTRY.format + abi.OPEN_OUT.format[1:])
_R_WRITE = _with_header(abi.WRITE_OUT)
_R_STATFS = _with_header(abi.STATFS_OUT)
_R_XATTR_SIZE = _with_header(abi.GETXATTR_OUT)
_R_LSEEK = _with_header(abi.LSEEK_OUT)
_R_LK = _with_header(abi.LK_OUT)
_R_BMAP = _with_header(abi.BMAP_OUT)
_R_POLL = _with_header(abi.POLL_OUT)
_R_IOCTL = _with_header(abi.IOCTL_OUT)
_R_STATX = _with_header(abi.STATX_OUT)
_R_INIT = _with_header(abi.INIT_OUT)
_R_INIT_VERSION = _with_header(abi.INIT_OUT_VERSION)


def _invalid() -> OSError:
    return OSError(errno.EINVAL, "malformed FUSE request")


def _errno_of(exc: OSError) -> int:
    err = exc.errno
    return err if isinstance(err, int) and 0 < err < 4096 else errno.EIO


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout in seconds as fuse.h's (sec, nsec) pair; negative or NaN means no caching.

    Memoized: a file system answers with the same few timeouts over and over."""
    if not seconds > 0:
        return 0, 0
    if seconds >= _MAX_TIMEOUT_SEC:
        return _MAX_TIMEOUT_SEC, 0
    sec = int(seconds)
    return sec, min(int((seconds - sec) * _NSEC), _NSEC - 1)


def _attr_values(a: Attr, flags: int = 0) -> tuple[int, ...]:
    """The fuse_attr fields of `a`, in wire order, with fuse_attr.flags `flags`."""
    at, atn = divmod(a.st_atime_ns, _NSEC)
    mt, mtn = divmod(a.st_mtime_ns, _NSEC)
    ct, ctn = divmod(a.st_ctime_ns, _NSEC)
    # fuse_attr.rdev is the kernel's 32-bit new_encode_dev(); glibc's 64-bit dev_t has the same
    # low 32 bits for every major < 4096 and minor < 2**20.
    return (a.st_ino, a.st_size, a.st_blocks, at, mt, ct, atn, mtn, ctn, a.st_mode, a.st_nlink,
            a.st_uid, a.st_gid, a.st_rdev & 0xFFFFFFFF, a.st_blksize, flags)


def _sx_time(ns: int) -> tuple[int, int, int]:
    """A time in nanoseconds as fuse_sx_time (tv_sec, tv_nsec, reserved)."""
    sec, nsec = divmod(ns, _NSEC)
    return sec, nsec, 0


def _statx_values(sx: Statx) -> tuple[int, ...]:
    """The fuse_statx fields of `sx`, in wire order."""
    return (sx.mask, sx.blksize, sx.attributes, sx.nlink, sx.uid, sx.gid, sx.mode, sx.ino, sx.size, sx.blocks,
            sx.attributes_mask, *_sx_time(sx.atime_ns), *_sx_time(sx.btime_ns), *_sx_time(sx.ctime_ns),
            *_sx_time(sx.mtime_ns), sx.rdev_major, sx.rdev_minor, sx.dev_major, sx.dev_minor)


def _entry_values(e: Entry) -> tuple[int, ...]:
    """The fuse_entry_out fields of `e`, in wire order (a negative entry carries zero attributes)."""
    ev, evn = _timeout(e.entry_timeout)
    if not e.nodeid:
        return (0, 0, ev, 0, evn, 0) + _ZERO_ENTRY[6:]
    av, avn = _timeout(e.attr_timeout)
    return (e.nodeid, e.generation, ev, av, evn, avn, *_attr_values(e.attr, e.attr_flags))


def _name(body: bytes, start: int, dots: bool = False) -> tuple[bytes, int]:
    """The NUL-terminated path component at body[start:], and the offset just past its NUL.

    Raises EINVAL for a missing NUL, an empty name, a "/" inside, or "."/".." unless `dots`;
    ENAMETOOLONG beyond NAME_MAX.
    """
    end = body.find(b"\0", start)
    if end < 0:
        raise _invalid()
    name = body[start:end]
    if len(name) > abi.NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if not name or b"/" in name or (not dots and (name == b"." or name == b"..")):
        raise _invalid()
    return name, end + 1


def _xattr_name(body: bytes, start: int) -> tuple[bytes, int]:
    """The NUL-terminated extended attribute name at body[start:]; ERANGE if empty or too long (as
    setxattr(2) answers), EINVAL without NUL. Unlike file names these may contain "/"."""
    end = body.find(b"\0", start)
    if end < 0:
        raise _invalid()
    name = body[start:end]
    if not name or len(name) > abi.NAME_MAX:
        raise OSError(errno.ERANGE, "bad xattr name")
    return name, end + 1


def _security_context(ext: bytes) -> tuple[bytes, bytes] | None:
    """The security context (xattr name, value) in the request extensions `ext`, or None if there are
    none or the context is empty (no LSM gave a label). Raises EINVAL for anything malformed.

    fuse.h: each extension is a fuse_ext_header whose size counts the header and is a multiple of
    FUSE_REC_ALIGN; a type of at most FUSE_MAX_NR_SECCTX makes it a fuse_secctx_header with that
    many contexts, each a fuse_secctx, a NUL-terminated xattr name and the value, padded to
    FUSE_REC_ALIGN (fs/fuse/dir.c get_security_context); the extension ends where its last context
    does. The only extension accepted is one security context extension with at most one context,
    which is what the kernel sends and all `Context` carries: a client sends other types only for
    INIT flags this server never negotiates (FUSE_CREATE_SUPP_GROUP), so they are refused too.
    """
    if not ext:
        return None
    if len(ext) < abi.SECCTX_HEADER.size:
        raise _invalid()
    size, nr_secctx = abi.SECCTX_HEADER.unpack_from(ext)
    if size != len(ext) or size % abi.EXT_ALIGN or nr_secctx > 1:
        raise _invalid()
    start = abi.SECCTX_HEADER.size
    if nr_secctx == 0:
        if size != start:
            raise _invalid()
        return None
    if size - start < abi.SECCTX.size:
        raise _invalid()
    (value_len,) = abi.SECCTX.unpack_from(ext, start)
    name_start = start + abi.SECCTX.size
    nul = ext.find(b"\0", name_start)
    if nul < 0 or not 0 < nul - name_start <= abi.NAME_MAX:
        raise _invalid()
    value_start = nul + 1
    padded = -(-(value_start - start + value_len) // abi.EXT_ALIGN) * abi.EXT_ALIGN
    if value_len == 0 or start + padded != size:
        raise _invalid()
    return ext[name_start:nul], ext[value_start:value_start + value_len]


def _s64(value: int) -> int:
    """A u64 from the wire that the kernel means as a signed 64-bit value (loff_t, time64_t)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _loff(value: int) -> int:
    """A file offset or length from the wire (u64 in fuse.h, loff_t in the kernel): EINVAL for a
    negative one, as the kernel answers pread, pwrite, fallocate or truncate with it. Never passed on:
    to preadv2 and pwritev2, offset -1 means the file position."""
    if value >= 1 << 63:
        raise _invalid()
    return value


def _s32(value: int) -> int:
    """A u32 from the wire that the kernel means as an int (lseek's whence)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _time_ns(sec: int, nsec: int) -> int:
    """A fuse_setattr_in time (seconds and nanoseconds) in nanoseconds; EINVAL beyond what a 64-bit
    nanosecond count holds, or for nanoseconds of a second or more."""
    ns = sec * _NSEC + nsec
    if nsec >= _NSEC or not -(1 << 63) <= ns < 1 << 63:
        raise _invalid()
    return ns


def _args(reader: Reader, body_len: int, st: struct.Struct) -> tuple:
    """Unpacks the fixed argument struct `st`; EINVAL if the body is shorter."""
    if body_len < st.size:
        raise _invalid()
    return st.unpack(reader.read(st.size))


def _body(reader: Reader, body_len: int, st: struct.Struct) -> tuple[bytes, tuple]:
    """Reads the whole argument body and unpacks its leading struct `st`; EINVAL if shorter."""
    if body_len < st.size:
        raise _invalid()
    body = reader.read(body_len)
    return body, st.unpack_from(body)


def _error(writer: Writer, unique: int, err: int) -> int:
    """Writes a header-only reply carrying -err; drops it (returns 0) when even that does not fit."""
    if writer.available < _HDR_SIZE:
        log.debug("no room for the reply to request %d", unique)
        return 0
    writer.write(_HDR.pack(_HDR_SIZE, -err, unique))
    return _HDR_SIZE


def _ok(writer: Writer, unique: int) -> int:
    return _error(writer, unique, 0)


def _send(writer: Writer, unique: int, data: bytes) -> int:
    """Writes a reply already packed with its header; ERANGE when it does not fit."""
    if len(data) > writer.available:
        return _error(writer, unique, errno.ERANGE)
    writer.write(data)
    return len(data)


def _send_payload(writer: Writer, unique: int, payload: bytes | bytearray) -> int:
    """Writes a header plus a variable-length payload; ERANGE when it does not fit."""
    total = _HDR_SIZE + len(payload)
    if total > writer.available:
        return _error(writer, unique, errno.ERANGE)
    writer.write(_HDR.pack(total, 0, unique))
    writer.write(payload)
    return total


def _pack_host_dirents(listing: HostDirents, limit: int) -> memoryview:
    """fuse_dirent records for the entries of `listing` that fit whole in `limit` bytes (the cookies are
    the entries' own); EINVAL when not even the first one fits, as getdents(2) answers."""
    out = bytearray(limit)
    ffi = native.ffi
    following = ffi.new("uint32_t *")
    with (ffi.from_buffer("uint8_t[]", listing.data) as data,
          ffi.from_buffer("uint32_t[]", listing.offsets) as offsets,
          ffi.from_buffer("uint8_t[]", out) as dst):
        # A guest may send any u64 cookie: past the end is the end.
        start = min(max(listing.start, 0), len(listing.offsets))
        size = native.lib.vhostfs_pack_dirents(data, len(listing.data), offsets, start, len(listing.offsets),
                                               dst, limit, following)
    if size == 0 and following[0] < len(listing.offsets):
        raise _invalid()
    return memoryview(out)[:size]


_Handler = Callable[[int, int, Context, int, "Reader", "Writer"], int]


class BackingFiles(Protocol):
    """What a transport that can pass files through (FUSE passthrough, /dev/fuse) gives the server.

    `max_stack_depth` is what INIT announces (fuse_init_out.max_stack_depth, 1 or 2): how many file
    system layers may lie under a backing file. `open` registers the open host file `fd` of handle
    `fh` of node `nodeid` with the kernel, or takes one more reference to the node's backing file if
    it has one, and returns the backing id; None when the kernel refused (the handle is then served
    through the file system). `release` drops the reference of handle `fh` of `nodeid` (unknown ones
    are ignored; a file system's fhs need only be unique per node): the node's backing id is closed
    with its last handle. `clear` forgets them all (session end).
    """

    max_stack_depth: int

    def open(self, nodeid: int, fh: int, fd: int) -> int | None: ...

    def release(self, nodeid: int, fh: int) -> None: ...

    def clear(self) -> None: ...


class FuseServer:
    """Serves one FUSE session against a `Filesystem`.

    Arguments:
        fs: the file system to serve.
        max_write: largest WRITE payload offered to the client (>= 4096); also sets max_pages.
        max_read: if set, READ sizes above it are cut to it (the transport must have told the client,
            e.g. as the max_read mount option); READs are always cut to the reply room.
        max_readahead: upper bound for the client's readahead (the client's own value if lower).
        max_background, congestion_threshold: fuse_init_out limits; 0 keeps the kernel defaults.
        map_alignment: log2 of the DAX mapping alignment; when set, FUSE_MAP_ALIGNMENT is wanted.
        extra_want: INIT flags (bits 32.. for flags2) wanted on top of `DEFAULT_WANT`.
        backing: the transport's `BackingFiles`, when it can pass files through; FUSE_PASSTHROUGH is
            then wanted, and an `Open.backing_fd` of the file system is registered with it. May also
            be set as the attribute `backing` before INIT.

    `ConnectionInfo.extra` passed to `Filesystem.init` holds "time_gran", "max_background",
    "congestion_threshold" and "map_alignment"; the file system may change them there.
    """

    def __init__(self, fs: Filesystem, *, max_write: int = 1 << 20, max_read: int | None = None,
                 max_readahead: int = 1 << 20, max_background: int = 0, congestion_threshold: int = 0,
                 map_alignment: int | None = None, extra_want: int = 0,
                 backing: BackingFiles | None = None) -> None:
        if not 4096 <= max_write <= 0xFFFFFFFF:
            raise ValueError(f"max_write {max_write} outside 4096..2**32-1")
        if max_read is not None and max_read < 4096:
            raise ValueError(f"max_read {max_read} below 4096")
        self.fs = fs
        self.max_write = max_write
        self.max_read = max_read
        self.max_readahead = max_readahead
        self.max_background = max_background
        self.congestion_threshold = congestion_threshold
        self.map_alignment = map_alignment
        self.want = DEFAULT_WANT | extra_want | (abi.FUSE_MAP_ALIGNMENT if map_alignment is not None else 0)
        self.backing = backing
        # FUSE_PASSTHROUGH negotiated: open replies may carry FOPEN_PASSTHROUGH and a backing id.
        self._passthrough = False
        #: Negotiated state; `conn` is the ConnectionInfo of the running session (None before INIT).
        self.conn: ConnectionInfo | None = None
        self._initialized = False
        self._write_limit = max_write
        self._setxattr_ext = False
        # FUSE_SETXATTR_ACL_KILL_SGID reaches the file system only when it negotiated POSIX ACLs.
        self._acl_kill_sgid = False
        # FUSE_SECURITY_CTX negotiated: requests that create a node carry a security context, after
        # the arguments and counted by total_extlen, or (a client before 7.38) as one more argument.
        self._security_ctx = False
        self._secctx_in_args = False
        # (client minor, client max_readahead, granted flags, max_write) of the running session.
        self._client = (0, 0, 0, 0)
        # unique -> the event of a request waiting in the file system; INTERRUPTs that came first.
        self._wait_lock = threading.Lock()
        self._waits: dict[int, threading.Event] = {}
        self._early_interrupts: dict[int, None] = {}
        # (uid, gid, pid) -> its Context: immutable, so shared by the requests of one guest process
        # (making one per request cost more than the dispatch around it).
        self._contexts: dict[tuple[int, int, int], Context] = {}
        table: list[_Handler | None] = [None] * (abi.FUSE_STATX + 1)
        for opcode, method in (
            (abi.FUSE_INIT, self._init), (abi.FUSE_DESTROY, self._destroy),
            (abi.FUSE_LOOKUP, self._lookup), (abi.FUSE_FORGET, self._forget),
            (abi.FUSE_BATCH_FORGET, self._batch_forget), (abi.FUSE_GETATTR, self._getattr),
            (abi.FUSE_SETATTR, self._setattr), (abi.FUSE_READLINK, self._readlink),
            (abi.FUSE_SYMLINK, self._symlink), (abi.FUSE_MKNOD, self._mknod), (abi.FUSE_MKDIR, self._mkdir),
            (abi.FUSE_UNLINK, self._unlink), (abi.FUSE_RMDIR, self._rmdir), (abi.FUSE_RENAME, self._rename),
            (abi.FUSE_RENAME2, self._rename2), (abi.FUSE_LINK, self._link), (abi.FUSE_OPEN, self._open),
            (abi.FUSE_READ, self._read), (abi.FUSE_WRITE, self._write), (abi.FUSE_STATFS, self._statfs),
            (abi.FUSE_RELEASE, self._release), (abi.FUSE_FSYNC, self._fsync), (abi.FUSE_FLUSH, self._flush),
            (abi.FUSE_SETXATTR, self._setxattr), (abi.FUSE_GETXATTR, self._getxattr),
            (abi.FUSE_LISTXATTR, self._listxattr), (abi.FUSE_REMOVEXATTR, self._removexattr),
            (abi.FUSE_OPENDIR, self._opendir), (abi.FUSE_READDIR, self._readdir),
            (abi.FUSE_READDIRPLUS, self._readdirplus), (abi.FUSE_RELEASEDIR, self._releasedir),
            (abi.FUSE_FSYNCDIR, self._fsyncdir), (abi.FUSE_ACCESS, self._access),
            (abi.FUSE_CREATE, self._create), (abi.FUSE_INTERRUPT, self._interrupt),
            (abi.FUSE_NOTIFY_REPLY, self._notify_reply), (abi.FUSE_FALLOCATE, self._fallocate),
            (abi.FUSE_LSEEK, self._lseek), (abi.FUSE_COPY_FILE_RANGE, self._copy_file_range),
            (abi.FUSE_SYNCFS, self._syncfs),
            (abi.FUSE_GETLK, self._getlk), (abi.FUSE_SETLK, self._setlk), (abi.FUSE_SETLKW, self._setlkw),
            (abi.FUSE_TMPFILE, self._tmpfile), (abi.FUSE_BMAP, self._bmap), (abi.FUSE_IOCTL, self._ioctl),
            (abi.FUSE_POLL, self._poll), (abi.FUSE_STATX, self._statx),
            (abi.FUSE_SETUPMAPPING, self._setupmapping), (abi.FUSE_REMOVEMAPPING, self._removemapping),
        ):
            table[opcode] = method
        # Without a DAX window the mapping requests are unsupported whatever their arguments: ENOSYS,
        # not the EINVAL their validation would give.
        for opcode, name in ((abi.FUSE_SETUPMAPPING, "setupmapping"),
                             (abi.FUSE_REMOVEMAPPING, "removemapping")):
            if getattr(type(fs), name) is getattr(Filesystem, name):
                table[opcode] = None
        self._table = table

    @property
    def initialized(self) -> bool:
        """True between a successful INIT and DESTROY (or `reset`)."""
        return self._initialized

    def reset(self) -> None:
        """Ends the session without a DESTROY request (device reset, transport gone): interrupts the
        requests waiting in the file system, calls `fs.destroy()` if a session was running, and
        expects a new INIT."""
        initialized, self._initialized = self._initialized, False
        with self._wait_lock:
            # A wait registered after this sees `_initialized` false and is interrupted at once.
            for event in self._waits.values():
                event.set()
            self._early_interrupts.clear()
        self._passthrough = False
        if self.backing is not None:
            self.backing.clear()
        if initialized:
            self.conn = None
            self.fs.destroy()

    @staticmethod
    def may_wait(reader: Reader) -> int | None:
        """The unique of the request in `reader` if serving it may wait without bound (FUSE_SETLKW:
        a lock another owner holds), so that the transport can serve it apart; None otherwise.

        Reads fuse_in_header's opcode and unique without consuming anything or copying.
        """
        if reader.peek_u32(_OPCODE_OFFSET) != abi.FUSE_SETLKW:
            return None
        return reader.peek_u64(_UNIQUE_OFFSET)

    def interrupt_waits(self) -> None:
        """Makes every request waiting in the file system stop waiting (each answers EINTR)."""
        with self._wait_lock:
            for event in self._waits.values():
                event.set()

    def interrupt(self, unique: int) -> bool:
        """Makes request `unique` stop waiting (it then answers EINTR), as FUSE_INTERRUPT does.

        For transports that must end a request themselves (a queue being stopped). Returns whether
        the request was waiting; if not, the interrupt is remembered for a while, in case the
        request is still on its way to the file system.
        """
        with self._wait_lock:
            event = self._waits.get(unique)
            if event is not None:
                event.set()
                return True
            early = self._early_interrupts
            early[unique] = None
            if len(early) > _EARLY_INTERRUPTS_MAX:
                del early[next(iter(early))]
            return False

    def _begin_wait(self, unique: int) -> threading.Event:
        event = threading.Event()
        with self._wait_lock:
            self._waits[unique] = event
            early = unique in self._early_interrupts
            if early:
                del self._early_interrupts[unique]
            if early or not self._initialized:
                event.set()
        return event

    def _end_wait(self, unique: int, event: threading.Event) -> None:
        with self._wait_lock:
            # A client reusing a unique may have replaced the entry; only ours goes.
            if self._waits.get(unique) is event:
                del self._waits[unique]

    def handle(self, reader: Reader, writer: Writer) -> int:
        """Parses one request from `reader`, serves it and writes the reply into `writer`.

        Returns the length of the reply written (fuse_out_header included), or 0 when no reply is
        sent: FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY, a request too short to carry its
        `unique`, or a writer without room for even the 16-byte header. Never raises for anything
        the request or the Filesystem does.
        """
        total = reader.remaining
        if total < _IN_PREFIX.size:
            log.debug("dropping a %d-byte request: no room for a header", total)
            return 0
        raw = reader.read(_IN_SIZE)
        if total < _IN_SIZE:
            _, opcode, unique = _IN_PREFIX.unpack_from(raw)
            return self._malformed(writer, unique, opcode, "truncated header")
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.IN_HEADER.unpack(raw)
        # Extensions (total_extlen 8-byte units) trail the arguments; nothing negotiated by default
        # produces them, and only the handlers that create a node, with FUSE_SECURITY_CTX, look past
        # body_len (_labelled).
        body_len = length - _IN_SIZE - extlen * 8
        if length != total or body_len < 0:
            return self._malformed(writer, unique, opcode, f"len {length} but {total} bytes present")
        if not self._initialized and opcode != abi.FUSE_INIT:
            return 0 if opcode in _NO_REPLY else _error(writer, unique, errno.EIO)
        table = self._table
        handler = table[opcode] if opcode < len(table) else None
        if handler is None:
            return _error(writer, unique, errno.ENOSYS)
        try:
            ids = (uid, gid, pid)
            ctx = self._contexts.get(ids)
            if ctx is None:
                ctx = Context(uid, gid, pid)
                contexts = self._contexts
                if len(contexts) >= _CONTEXTS_MAX:
                    contexts.clear()
                contexts[ids] = ctx
            return handler(unique, nodeid, ctx, body_len, reader, writer)
        except OSError as exc:
            return _error(writer, unique, _errno_of(exc))
        except Exception:
            log.exception("FUSE %s (unique %d, nodeid %d) failed",
                          abi.OPCODE_NAMES.get(opcode, opcode), unique, nodeid)
            return _error(writer, unique, errno.EIO)

    def _malformed(self, writer: Writer, unique: int, opcode: int, why: str) -> int:
        log.debug("malformed request %d (opcode %d): %s", unique, opcode, why)
        return 0 if opcode in _NO_REPLY else _error(writer, unique, errno.EINVAL)

    # -- session --------------------------------------------------------------------------------
    def _init(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        if self._initialized:
            # The client started over: a rebooted guest whose VMM only stopped and restarted the
            # rings (QEMU does no device reset for vhost-user-fs), so this INIT is the only sign.
            log.info("INIT on a running session: the client restarted, starting a new session")
            self.reset()
        if body_len < abi.INIT_OUT_VERSION.size:
            raise _invalid()
        body = reader.read(body_len)
        major, minor = abi.INIT_OUT_VERSION.unpack_from(body)
        if major > abi.KERNEL_VERSION:
            # fuse.h version negotiation: answer with our major only; the client retries with it.
            return _send(writer, unique, _R_INIT_VERSION.pack(
                _R_INIT_VERSION.size, 0, unique, abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION))
        if major < abi.KERNEL_VERSION or minor < abi.MIN_KERNEL_MINOR_VERSION:
            log.warning("refusing FUSE protocol %d.%d (need %d.%d+)", major, minor,
                        abi.KERNEL_VERSION, abi.MIN_KERNEL_MINOR_VERSION)
            raise OSError(errno.EPROTO, "unsupported FUSE protocol version")
        if body_len < abi.INIT_IN_COMPAT.size:
            raise _invalid()
        _, _, max_readahead, flags = abi.INIT_IN_COMPAT.unpack_from(body)
        # flags2 exists only in the 64-byte fuse_init_in that FUSE_INIT_EXT announces (7.36).
        if flags & abi.FUSE_INIT_EXT and body_len >= abi.INIT_IN.size:
            flags |= abi.INIT_IN.unpack_from(body)[4] << 32
        conn, out, max_write, passthrough = self._negotiate(minor, max_readahead, flags)
        backing = self.backing
        stack_depth = backing.max_stack_depth if passthrough and backing is not None else 0
        extra = conn.extra
        reply = _R_INIT.pack(
            _R_INIT.size, 0, unique, abi.KERNEL_VERSION, conn.proto_minor,
            min(conn.max_readahead, max_readahead), out & 0xFFFFFFFF, extra["max_background"],
            extra["congestion_threshold"], max_write, extra["time_gran"], max(1, min(conn.max_pages, 0xFFFF)),
            extra["map_alignment"], out >> 32, stack_depth, 0)
        if len(reply) > writer.available:
            self.fs.destroy()
            return _error(writer, unique, errno.ERANGE)
        self._start_session(conn, minor, max_readahead, out, max_write, passthrough)
        writer.write(reply)
        return len(reply)

    def _negotiate(self, minor: int, max_readahead: int, flags: int) -> tuple[ConnectionInfo, int, int, bool]:
        """What this server and its file system answer to a client of protocol 7.`minor` offering INIT
        `flags`: (ConnectionInfo, the flags granted, max_write, whether files are passed through)."""
        backing = self.backing
        want = self.want | (abi.FUSE_PASSTHROUGH if backing is not None else 0)
        conn = ConnectionInfo(
            proto_major=abi.KERNEL_VERSION,
            proto_minor=min(minor, abi.KERNEL_MINOR_VERSION),
            capable=flags,
            want=want & flags,
            max_write=self.max_write,
            max_readahead=min(max_readahead, self.max_readahead),
            max_pages=min(0xFFFF, -(-max(self.max_write, self.max_read or 0) // _PAGE)),
            extra={"time_gran": 1, "max_background": self.max_background,
                   "congestion_threshold": self.congestion_threshold,
                   "map_alignment": self.map_alignment or 0},
        )
        self.fs.init(conn)
        out = conn.want & flags
        if backing is None:
            out &= ~abi.FUSE_PASSTHROUGH  # nothing here could register a backing file
        # The kernel turns passthrough on only with a stack depth of 1 or 2 and without the writeback
        # cache (process_init_reply in fs/fuse/inode.c).
        passthrough = bool(out & abi.FUSE_PASSTHROUGH and out & abi.FUSE_INIT_EXT
                           and not out & abi.FUSE_WRITEBACK_CACHE)
        if not passthrough:
            out &= ~abi.FUSE_PASSTHROUGH
        return conn, out, max(4096, min(conn.max_write, 0xFFFFFFFF)), passthrough

    def _start_session(self, conn: ConnectionInfo, client_minor: int, client_readahead: int, out: int,
                       max_write: int, passthrough: bool) -> None:
        self._write_limit = max_write
        self._setxattr_ext = bool(out & abi.FUSE_SETXATTR_EXT)
        self._acl_kill_sgid = self._setxattr_ext and bool(out & abi.FUSE_POSIX_ACL)
        # flags2 counts only in a reply that has FUSE_INIT_EXT.
        self._security_ctx = bool(out & abi.FUSE_SECURITY_CTX and out & abi.FUSE_INIT_EXT)
        self._secctx_in_args = client_minor < abi.EXT_MINOR_VERSION
        self._passthrough = passthrough
        self._client = (client_minor, client_readahead, out, max_write)
        self.conn = conn
        self._initialized = True

    # -- moving the session (live migration, live upgrade; docs/session-state.md) -----------------
    def save_state(self) -> bytes:
        """The session as a state stream: what INIT negotiated and the file system's own sections.

        Call it while no request is being served (the transport has stopped its queues). Raises
        OSError when the file system cannot save its state (it says why).
        """
        enc = Encoder()
        enc.u8(1 if self._initialized else 0)
        sections: list[tuple[bytes, int, bytes]] = []
        if self._initialized:
            assert self.conn is not None
            minor, readahead, out, max_write = self._client
            enc.u32(minor)
            enc.u32(readahead)
            enc.u64(self.conn.capable)
            enc.u64(out)
            enc.u32(max_write)
            sections = self.fs.save_state()
        return pack_state([(b"INIT", 1, enc.payload()), *sections])

    def load_state(self, data: bytes | memoryview) -> None:
        """Takes over the session saved by `save_state` (on this or another host): the client goes on
        without a new INIT. Everything is checked before anything changes; a stream that is
        truncated, corrupt, of another version, or that this server would have negotiated
        differently (other options) raises StateError and leaves the server as it was.

        Files the old server passed through (FUSE_PASSTHROUGH) stay passed through in the kernel,
        whose open files hold their backing files; this server registers backing files for the
        opens that come after."""
        sections = unpack_state(data)
        dec = section(sections, b"INIT", 1)
        initialized = dec.u8("session flag")
        if initialized not in (0, 1):
            raise StateError(f"INIT section: session flag {initialized}")
        if not initialized:
            dec.end()
            if len(sections) > 1:
                raise StateError("a state without a session has sections of one")
            self.reset()
            return
        minor = dec.u32("protocol minor")
        readahead = dec.u32("max_readahead")
        capable = dec.u64("client flags")
        out = dec.u64("granted flags")
        max_write = dec.u32("max_write")
        dec.end()
        if minor < abi.MIN_KERNEL_MINOR_VERSION:
            raise StateError(f"INIT section: FUSE protocol 7.{minor} is not supported")
        conn, my_out, my_max_write, passthrough = self._negotiate(minor, readahead, capable)
        if (my_out, my_max_write) != (out, max_write):
            raise StateError(
                f"this server negotiates INIT flags {my_out:#x} and max_write {my_max_write}, the saved "
                f"session has {out:#x} and {max_write}: start it with the source's options")
        self.reset()
        self.fs.load_state(sections)
        self._start_session(conn, minor, readahead, out, max_write, passthrough)

    def _destroy(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        self.reset()
        return _ok(writer, unique)

    def _interrupt(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                   writer: Writer) -> int:
        # fuse.h: fuse_interrupt_in.unique names the request. Only a waiting SETLKW can be cut short;
        # every other request runs to completion, and the interrupt is never answered (an EAGAIN
        # reply would make the kernel resend it at once for as long as the request runs).
        if body_len < abi.INTERRUPT_IN.size:
            log.debug("dropping a truncated INTERRUPT")
            return 0
        (target,) = abi.INTERRUPT_IN.unpack(reader.read(abi.INTERRUPT_IN.size))
        self.interrupt(target)
        return 0

    def _notify_reply(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                      writer: Writer) -> int:
        # The answer to a RETRIEVE notification, which this server never sends; it takes no reply.
        return 0

    # -- names ----------------------------------------------------------------------------------
    def _reply_entry(self, writer: Writer, unique: int, entry: Entry) -> int:
        """Sends fuse_entry_out; if it cannot be delivered, gives the lookup reference back."""
        try:
            data = _R_ENTRY.pack(_R_ENTRY.size, 0, unique, *_entry_values(entry))
            if len(data) > writer.available:
                raise OSError(errno.ERANGE, "no room for the entry")
        except BaseException:
            if entry.nodeid:
                self.fs.forget(entry.nodeid, 1)
            raise
        writer.write(data)
        return len(data)

    def _lookup(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        name, _ = _name(reader.read(body_len), 0, dots=True)
        return self._reply_entry(writer, unique, self.fs.lookup(ctx, nodeid, name))

    def _forget(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        if body_len < abi.FORGET_IN.size:
            log.debug("dropping a truncated FORGET")
            return 0
        (nlookup,) = abi.FORGET_IN.unpack(reader.read(abi.FORGET_IN.size))
        self._forget_one(nodeid, nlookup)
        return 0

    def _batch_forget(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                      writer: Writer) -> int:
        if body_len < abi.BATCH_FORGET_IN.size:
            log.debug("dropping a truncated BATCH_FORGET")
            return 0
        body = reader.read(body_len)
        (count,) = abi.BATCH_FORGET_IN.unpack_from(body)
        # Trust the bytes present, not the count: never read past the body.
        present = (body_len - abi.BATCH_FORGET_IN.size) // abi.FORGET_ONE.size
        if count > present:
            log.debug("BATCH_FORGET claims %d entries, carries %d", count, present)
        for one_nodeid, nlookup in abi.FORGET_ONE.iter_unpack(
                body[abi.BATCH_FORGET_IN.size:abi.BATCH_FORGET_IN.size + min(count, present) * 16]):
            self._forget_one(one_nodeid, nlookup)
        return 0

    def _forget_one(self, nodeid: int, nlookup: int) -> None:
        # FORGET has no reply to carry an error, so a failing forget can only be logged.
        try:
            self.fs.forget(nodeid, nlookup)
        except Exception:
            log.exception("forget(%d, %d) failed", nodeid, nlookup)

    def _getattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        flags, fh = _args(reader, body_len, abi.GETATTR_IN)
        attr, timeout = self.fs.getattr(ctx, nodeid, fh if flags & abi.FUSE_GETATTR_FH else None)
        return self._reply_attr(writer, unique, attr, timeout)

    def _reply_attr(self, writer: Writer, unique: int, attr: Attr, timeout: float) -> int:
        av, avn = _timeout(timeout)
        values = _attr_values(attr, getattr(attr, "attr_flags", 0))
        return _send(writer, unique, _R_ATTR.pack(_R_ATTR.size, 0, unique, av, avn, *values))

    def _statx(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        conn = self.conn
        if conn is None or conn.proto_minor < abi.STATX_MINOR_VERSION:
            # fuse.h 7.39: a client that negotiated an older minor does not know this opcode.
            raise OSError(errno.ENOSYS, "FUSE_STATX needs protocol 7.39")
        getattr_flags, fh, sx_flags, sx_mask = _args(reader, body_len, abi.STATX_IN)
        sx, timeout = self.fs.statx(ctx, nodeid, fh if getattr_flags & abi.FUSE_GETATTR_FH else None,
                                    sx_flags, sx_mask)
        av, avn = _timeout(timeout)
        return _send(writer, unique, _R_STATX.pack(_R_STATX.size, 0, unique, av, avn, 0, *_statx_values(sx)))

    def _setattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        (valid, fh, size, _lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
         uid, gid) = _args(reader, body_len, abi.SETATTR_IN)
        changes = SetAttr(
            mode=mode if valid & abi.FATTR_MODE else None,
            uid=uid if valid & abi.FATTR_UID else None,
            gid=gid if valid & abi.FATTR_GID else None,
            size=_loff(size) if valid & abi.FATTR_SIZE else None,
            # The kernel sets FATTR_ATIME together with FATTR_ATIME_NOW; NOW wins.
            atime_ns=(TIME_NOW if valid & abi.FATTR_ATIME_NOW
                      else _time_ns(atime, atimensec) if valid & abi.FATTR_ATIME else None),
            mtime_ns=(TIME_NOW if valid & abi.FATTR_MTIME_NOW
                      else _time_ns(mtime, mtimensec) if valid & abi.FATTR_MTIME else None),
            ctime_ns=_time_ns(ctime, ctimensec) if valid & abi.FATTR_CTIME else None,
            fh=fh if valid & abi.FATTR_FH else None,
            kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
        )
        attr, timeout = self.fs.setattr(ctx, nodeid, changes)
        return self._reply_attr(writer, unique, attr, timeout)

    def _readlink(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                  writer: Writer) -> int:
        return _send_payload(writer, unique, self.fs.readlink(ctx, nodeid))

    def _symlink(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        # fuse_symlink sends the new entry's name first, then the target; the target is data, so
        # only its NUL and length are checked.
        body = reader.read(body_len)
        name, pos = _name(body, 0)
        end = body.find(b"\0", pos)
        if end < 0:
            raise _invalid()
        if end - pos >= abi.PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        ctx = self._labelled(ctx, body, end + 1, reader)
        return self._reply_entry(writer, unique, self.fs.symlink(ctx, nodeid, name, body[pos:end]))

    def _mknod(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        body, (mode, rdev, umask) = _body(reader, body_len, abi.MKNOD_IN)
        name, end = _name(body, abi.MKNOD_IN.size)
        ctx = self._labelled(ctx, body, end, reader)
        return self._reply_entry(writer, unique, self.fs.mknod(ctx, nodeid, name, mode, rdev, umask))

    def _mkdir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        body, (mode, umask) = _body(reader, body_len, abi.MKDIR_IN)
        name, end = _name(body, abi.MKDIR_IN.size)
        ctx = self._labelled(ctx, body, end, reader)
        return self._reply_entry(writer, unique, self.fs.mkdir(ctx, nodeid, name, mode, umask))

    def _unlink(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        name, _ = _name(reader.read(body_len), 0)
        self.fs.unlink(ctx, nodeid, name)
        return _ok(writer, unique)

    def _rmdir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        name, _ = _name(reader.read(body_len), 0)
        self.fs.rmdir(ctx, nodeid, name)
        return _ok(writer, unique)

    def _rename(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        body, (newdir,) = _body(reader, body_len, abi.RENAME_IN)
        return self._do_rename(writer, unique, ctx, nodeid, body, abi.RENAME_IN.size, newdir, 0)

    def _rename2(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        body, (newdir, flags) = _body(reader, body_len, abi.RENAME2_IN)
        return self._do_rename(writer, unique, ctx, nodeid, body, abi.RENAME2_IN.size, newdir, flags)

    def _do_rename(self, writer: Writer, unique: int, ctx: Context, parent: int, body: bytes, pos: int,
                   newdir: int, flags: int) -> int:
        name, pos = _name(body, pos)
        newname, _ = _name(body, pos)
        self.fs.rename(ctx, parent, name, newdir, newname, flags)
        return _ok(writer, unique)

    def _link(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        # The header's nodeid is the new parent; the node being linked is in fuse_link_in.
        body, (oldnodeid,) = _body(reader, body_len, abi.LINK_IN)
        newname, _ = _name(body, abi.LINK_IN.size)
        return self._reply_entry(writer, unique, self.fs.link(ctx, oldnodeid, nodeid, newname))

    # -- files ----------------------------------------------------------------------------------
    def _open(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        flags, _open_flags = _args(reader, body_len, abi.OPEN_IN)
        handle = self.fs.open(ctx, nodeid, flags)
        open_flags, backing_id = self._backing(nodeid, handle)
        data = _R_OPEN.pack(_R_OPEN.size, 0, unique, handle.fh, open_flags, backing_id)
        if len(data) > writer.available:
            self._give_back(ctx, nodeid, handle, flags)
            return _error(writer, unique, errno.ERANGE)
        writer.write(data)
        return len(data)

    def _reply_open(self, writer: Writer, unique: int, handle: Open) -> int:
        return _send(writer, unique, _R_OPEN.pack(_R_OPEN.size, 0, unique, handle.fh, handle.flags, 0))

    def _backing(self, nodeid: int, handle: Open) -> tuple[int, int]:
        """The FOPEN flags and backing id of the reply to an open of `nodeid` answered with `handle`:
        FOPEN_PASSTHROUGH with the registered backing file of `handle.backing_fd` where the file
        system offered one, passthrough was negotiated and the kernel took it."""
        if handle.backing_fd < 0 or not self._passthrough or self.backing is None:
            return handle.flags, 0
        backing_id = self.backing.open(nodeid, handle.fh, handle.backing_fd)
        if backing_id is None:
            return handle.flags, 0
        return handle.flags | abi.FOPEN_PASSTHROUGH, backing_id

    def _give_back(self, ctx: Context, nodeid: int, handle: Open, flags: int) -> None:
        """Releases a handle whose open reply cannot be delivered: the guest will never know it."""
        self.fs.release(ctx, nodeid, handle.fh, flags)
        if self.backing is not None:
            self.backing.release(nodeid, handle.fh)

    def _create(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        body, (flags, mode, umask, _open_flags) = _body(reader, body_len, abi.CREATE_IN)
        name, end = _name(body, abi.CREATE_IN.size)
        ctx = self._labelled(ctx, body, end, reader)
        entry, handle = self.fs.create(ctx, nodeid, name, mode, flags, umask)
        return self._reply_create(writer, unique, ctx, flags, entry, handle)

    def _tmpfile(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        # fuse_create_in then the name of the kernel's placeholder dentry ("/"), which names nothing:
        # only its NUL is checked.
        body, (flags, mode, umask, _open_flags) = _body(reader, body_len, abi.CREATE_IN)
        end = body.find(b"\0", abi.CREATE_IN.size)
        if end < 0:
            raise _invalid()
        ctx = self._labelled(ctx, body, end + 1, reader)
        entry, handle = self.fs.tmpfile(ctx, nodeid, mode, flags, umask)
        return self._reply_create(writer, unique, ctx, flags, entry, handle)

    def _labelled(self, ctx: Context, body: bytes, args_end: int, reader: Reader) -> Context:
        """`ctx` with the security context of a request that creates a node, whose arguments end at
        `body[args_end]`. Without FUSE_SECURITY_CTX the request is taken as before: bytes after the
        arguments and extensions are not looked at.

        With it, the arguments must end where the extensions begin: at the end of `body`, the
        extensions being the rest of the request (total_extlen), or, for a client before 7.38, which
        has no total_extlen and sends the context as one more argument, at the context in `body`.
        """
        if not self._security_ctx:
            return ctx
        if self._secctx_in_args:
            if reader.remaining:
                raise _invalid()
            ext = body[args_end:]
        else:
            if args_end != len(body):
                raise _invalid()
            ext = reader.read(reader.remaining)
        secctx = _security_context(ext)
        if secctx is None:
            return ctx
        return Context(ctx.uid, ctx.gid, ctx.pid, ctx.interrupt, secctx)

    def _reply_create(self, writer: Writer, unique: int, ctx: Context, flags: int, entry: Entry,
                      handle: Open) -> int:
        open_flags, backing_id = self._backing(entry.nodeid, handle)
        data = _R_CREATE.pack(_R_CREATE.size, 0, unique, *_entry_values(entry), handle.fh, open_flags,
                              backing_id)
        if len(data) > writer.available:
            # The guest will never know the node or the handle: give both back.
            self._give_back(ctx, entry.nodeid, handle, flags)
            self.fs.forget(entry.nodeid, 1)
            return _error(writer, unique, errno.ERANGE)
        writer.write(data)
        return len(data)

    def _read(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        fh, offset, size, _read_flags, _lock_owner, _flags = _args(reader, body_len, abi.READ_IN)
        room = writer.available - _HDR_SIZE
        if room < 0:
            log.debug("no room for the reply to READ %d", unique)
            return 0
        # The guest's size is only a wish: what it can receive is the room it gave us.
        size = min(size, room)
        if self.max_read is not None:
            size = min(size, self.max_read)
        data = writer.split_at(_HDR_SIZE)
        n = self.fs.read_into(ctx, nodeid, fh, _loff(offset), size, data)
        if n != data.written or n > size:
            raise RuntimeError(f"read_into returned {n} but wrote {data.written} of {size} bytes")
        writer.write(_HDR.pack(_HDR_SIZE + n, 0, unique))
        return _HDR_SIZE + n

    def _write(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, offset, size, write_flags, _lock_owner, _flags = _args(reader, body_len, abi.WRITE_IN)
        if size != body_len - abi.WRITE_IN.size or size > self._write_limit:
            raise _invalid()
        n = self.fs.write_from(ctx, nodeid, fh, _loff(offset), size, reader, write_flags)
        if not 0 <= n <= size:
            raise RuntimeError(f"write_from returned {n} for a {size}-byte write")
        return _send(writer, unique, _R_WRITE.pack(_R_WRITE.size, 0, unique, n))

    def _flush(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, lock_owner = _args(reader, body_len, abi.FLUSH_IN)
        self.fs.flush(ctx, nodeid, fh, lock_owner)
        return _ok(writer, unique)

    def _release(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        fh, flags, release_flags, lock_owner = _args(reader, body_len, abi.RELEASE_IN)
        if release_flags & abi.FUSE_RELEASE_FLOCK_UNLOCK:
            # The guest took flock locks through this file: drop them before the handle goes, as
            # closing the file would (fuse_release in linux/fs/fuse/file.c).
            try:
                self.fs.flock(ctx, nodeid, fh, lock_owner, _F_UNLCK, False)
            except OSError as exc:
                log.debug("flock unlock of fh %d on release: %s", fh, exc)
        try:
            self.fs.release(ctx, nodeid, fh, flags)
        finally:
            if self.backing is not None:
                self.backing.release(nodeid, fh)
        return _ok(writer, unique)

    def _fsync(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, flags = _args(reader, body_len, abi.FSYNC_IN)
        self.fs.fsync(ctx, nodeid, fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC))
        return _ok(writer, unique)

    def _getlk(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, owner, start, end, kind, pid, _lk_flags = _args(reader, body_len, abi.LK_IN)
        lock = self.fs.getlk(ctx, nodeid, fh, owner, Lock(start, end, kind, pid))
        return _send(writer, unique, _R_LK.pack(_R_LK.size, 0, unique, lock.start, lock.end, lock.type,
                                                 lock.pid))

    def _setlk(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        return self._do_setlk(unique, nodeid, ctx, body_len, reader, writer, False)

    def _setlkw(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        event = self._begin_wait(unique)
        try:
            return self._do_setlk(unique, nodeid, Context(ctx.uid, ctx.gid, ctx.pid, event), body_len,
                                  reader, writer, True)
        finally:
            self._end_wait(unique, event)

    def _do_setlk(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                  writer: Writer, wait: bool) -> int:
        fh, owner, start, end, kind, pid, lk_flags = _args(reader, body_len, abi.LK_IN)
        if lk_flags & abi.FUSE_LK_FLOCK:
            # flock(2) arrives as a whole-file lock: LOCK_SH/LOCK_EX/LOCK_UN as F_RDLCK/F_WRLCK/F_UNLCK.
            self.fs.flock(ctx, nodeid, fh, owner, kind, wait)
        else:
            self.fs.setlk(ctx, nodeid, fh, owner, Lock(start, end, kind, pid), wait)
        return _ok(writer, unique)

    def _fallocate(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                   writer: Writer) -> int:
        fh, offset, length, mode = _args(reader, body_len, abi.FALLOCATE_IN)
        self.fs.fallocate(ctx, nodeid, fh, _loff(offset), _loff(length), mode)
        return _ok(writer, unique)

    def _lseek(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, offset, whence = _args(reader, body_len, abi.LSEEK_IN)
        result = self.fs.lseek(ctx, nodeid, fh, _s64(offset), _s32(whence))
        return _send(writer, unique, _R_LSEEK.pack(_R_LSEEK.size, 0, unique, result))

    def _copy_file_range(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                         writer: Writer) -> int:
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = _args(
            reader, body_len, abi.COPY_FILE_RANGE_IN)
        length = min(length, _COPY_MAX)
        off_in, off_out = _loff(off_in), _loff(off_out)
        n = self.fs.copy_file_range(ctx, nodeid, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags)
        if not 0 <= n <= length:
            raise RuntimeError(f"copy_file_range returned {n} for {length} bytes")
        return _send(writer, unique, _R_WRITE.pack(_R_WRITE.size, 0, unique, n))

    def _bmap(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        block, blocksize = _args(reader, body_len, abi.BMAP_IN)
        result = self.fs.bmap(ctx, nodeid, block, blocksize)
        if not 0 <= result < _U64_LIMIT:
            raise RuntimeError(f"bmap returned {result}")
        return _send(writer, unique, _R_BMAP.pack(_R_BMAP.size, 0, unique, result))

    def _ioctl(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
               writer: Writer) -> int:
        fh, flags, cmd, arg, in_size, out_size = _args(reader, body_len, abi.IOCTL_IN)
        # The in data is exactly what follows fuse_ioctl_in; out_size is only the caller's wish, bounded
        # by the reply room and _IOCTL_MAX so that no request sizes an allocation.
        if in_size != body_len - abi.IOCTL_IN.size:
            raise _invalid()
        if flags & abi.FUSE_IOCTL_UNRESTRICTED:
            # Unrestricted ioctls (CUSE) need the FUSE_IOCTL_RETRY exchange, which this server does not
            # do; the guest kernel shows ENOSYS to the caller as ENOTTY.
            raise OSError(errno.ENOSYS, "unrestricted ioctls are not supported")
        room = writer.available - _R_IOCTL.size
        if room < 0:
            return _error(writer, unique, errno.ERANGE)
        out_size = min(out_size, room, _IOCTL_MAX)
        result, data = self.fs.ioctl(ctx, nodeid, fh, flags, cmd, arg, reader.read(in_size), out_size)
        if not _I32_MIN <= result <= _I32_MAX or len(data) > out_size:
            raise RuntimeError(f"ioctl returned {result} with {len(data)} bytes for at most {out_size}")
        total = _R_IOCTL.size + len(data)
        writer.write(_R_IOCTL.pack(total, 0, unique, result, 0, 0, 0))
        writer.write(data)
        return total

    def _poll(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
              writer: Writer) -> int:
        fh, kh, flags, events = _args(reader, body_len, abi.POLL_IN)
        revents = self.fs.poll(ctx, nodeid, fh, kh, flags, events)
        if not 0 <= revents <= 0xFFFFFFFF:
            raise RuntimeError(f"poll returned {revents}")
        return _send(writer, unique, _R_POLL.pack(_R_POLL.size, 0, unique, revents))

    # -- directories ----------------------------------------------------------------------------
    def _opendir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        flags, _open_flags = _args(reader, body_len, abi.OPEN_IN)
        return self._reply_open(writer, unique, self.fs.opendir(ctx, nodeid, flags))

    def _readdir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                 writer: Writer) -> int:
        return self._do_readdir(unique, nodeid, ctx, body_len, reader, writer, False)

    def _readdirplus(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                     writer: Writer) -> int:
        return self._do_readdir(unique, nodeid, ctx, body_len, reader, writer, True)

    def _do_readdir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                    writer: Writer, plus: bool) -> int:
        fh, offset, size, _read_flags, _lock_owner, _flags = _args(reader, body_len, abi.READ_IN)
        limit = min(size, writer.available - _HDR_SIZE)
        if limit < 0:
            log.debug("no room for the reply to READDIR %d", unique)
            return 0
        listing = self.fs.readdir(ctx, nodeid, fh, offset, plus)
        if not plus and isinstance(listing, HostDirents):
            return _send_payload(writer, unique, _pack_host_dirents(listing, limit))
        if plus and isinstance(listing, HostDirentsPlus):
            return _send_payload(writer, unique, self._pack_host_direntsplus(listing, limit))
        entries = iter(listing)
        buf = bytearray()
        # Nodeids whose lookup reference rides in `buf`: handed back if the reply is never sent.
        referenced: list[int] = []
        try:
            for d in entries:
                reclen = abi.dirent_size(len(d.name), plus)
                if len(buf) + reclen > limit:
                    self._unsent(d, plus)
                    # A generator stops here and counts nothing more; entries the file system
                    # already produced as a list each carry a lookup that must be returned.
                    if not isinstance(listing, Iterator):
                        for rest in entries:
                            self._unsent(rest, plus)
                    if not buf:
                        # As getdents(2) answers a buffer too small for one entry.
                        raise _invalid()
                    break
                self._pack_dirent(buf, d, reclen, plus, referenced)
        except BaseException:
            for referenced_id in referenced:
                self.fs.forget(referenced_id, 1)
            raise
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()
        return _send_payload(writer, unique, buf)

    def _pack_host_direntsplus(self, listing: HostDirentsPlus, limit: int) -> memoryview:
        """fuse_direntplus records for the entries of `listing` that fit whole in `limit` bytes, their
        lookups made in batches (`HostDirentsPlus.lookup`) of as many as the room left can hold, so
        that entries gone meanwhile leave room for the next; EINVAL when not even the first fits."""
        ffi, lib = native.ffi, native.lib
        total = len(listing.offsets)
        index = min(max(listing.start, 0), total)
        out = bytearray(limit)
        packed = ffi.new("uint32_t *")
        pos = 0
        with (ffi.from_buffer("uint8_t[]", listing.data) as data,
              ffi.from_buffer("uint32_t[]", listing.offsets) as offsets,
              ffi.from_buffer("uint8_t[]", out) as dst):
            while index < total:
                count = lib.vhostfs_direntplus_fit(data, len(listing.data), offsets, index, total,
                                                   limit - pos)
                if not count:
                    break
                stats, nodeids, entry_timeout, attr_timeout = listing.lookup(index, count)
                try:
                    if len(stats) != count * native.STAT.size or len(nodeids) != count:
                        raise RuntimeError(f"lookup of {count} entries gave {len(stats)} bytes and "
                                           f"{len(nodeids)} nodes")
                    ev, evn = _timeout(entry_timeout)
                    av, avn = _timeout(attr_timeout)
                    with (ffi.from_buffer("struct vhostfs_stat[]", stats) as st,
                          ffi.from_buffer("uint64_t[]", nodeids) as ids):
                        pos += lib.vhostfs_pack_direntplus(data, len(listing.data), offsets, index, count,
                                                           st, ids, ev, evn, av, avn, dst + pos, limit - pos,
                                                           packed)
                except BaseException:
                    self._forget_listed(stats, nodeids, 0)
                    raise
                if packed[0] < count:
                    # A malformed record ends the reply; the lookups of what it kept out go back.
                    self._forget_listed(stats, nodeids, packed[0])
                    break
                index += count
        if not pos and index < total:
            raise _invalid()
        return memoryview(out)[:pos]

    def _forget_listed(self, stats: bytearray, nodeids, first: int) -> None:
        """Forgets the lookups of entries first.. of a HostDirentsPlus.lookup answer."""
        for i in range(first, min(len(nodeids), len(stats) // native.STAT.size)):
            if nodeids[i] and not native.STAT_ERR.unpack_from(stats, i * native.STAT.size
                                                              + native.STAT_ERR_OFFSET)[0]:
                self.fs.forget(nodeids[i], 1)

    def _unsent(self, d: DirEntry, plus: bool) -> None:
        if plus and d.entry is not None and d.entry.nodeid:
            self.fs.forget(d.entry.nodeid, 1)

    def _pack_dirent(self, buf: bytearray, d: DirEntry, reclen: int, plus: bool,
                     referenced: list[int]) -> None:
        """Appends one fuse_dirent (or fuse_direntplus) record with zeroed padding to `buf`."""
        name = d.name
        namelen = len(name)
        if plus:
            entry = d.entry
            if entry is None or not entry.nodeid:
                values = _ZERO_ENTRY
            elif name == b"." or name == b"..":
                # The kernel ignores the entry of "." and ".." in fuse_direntplus_link and so never
                # forgets it: hand the reference back now and send no node at all.
                self.fs.forget(entry.nodeid, 1)
                values = _ZERO_ENTRY
            else:
                values = _entry_values(entry)
                referenced.append(entry.nodeid)
            buf += abi.DIRENTPLUS.pack(*values, d.ino, d.offset, namelen, d.type)
            pad = reclen - abi.DIRENTPLUS.size - namelen
        else:
            buf += abi.DIRENT.pack(d.ino, d.offset, namelen, d.type)
            pad = reclen - abi.DIRENT.size - namelen
        buf += name
        buf += _ZEROS[:pad]

    def _releasedir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                    writer: Writer) -> int:
        fh, _flags, _release_flags, _lock_owner = _args(reader, body_len, abi.RELEASE_IN)
        self.fs.releasedir(ctx, nodeid, fh)
        return _ok(writer, unique)

    def _fsyncdir(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                  writer: Writer) -> int:
        fh, flags = _args(reader, body_len, abi.FSYNC_IN)
        self.fs.fsyncdir(ctx, nodeid, fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC))
        return _ok(writer, unique)

    # -- file system ----------------------------------------------------------------------------
    def _statfs(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        s = self.fs.statfs(ctx, nodeid)
        return _send(writer, unique, _R_STATFS.pack(
            _R_STATFS.size, 0, unique, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
            s.f_namemax, s.f_frsize))

    def _access(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        (mask,) = _args(reader, body_len, abi.ACCESS_IN)
        self.fs.access(ctx, nodeid, mask)
        return _ok(writer, unique)

    def _syncfs(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                writer: Writer) -> int:
        _args(reader, body_len, abi.SYNCFS_IN)
        self.fs.syncfs(ctx, nodeid)
        return _ok(writer, unique)

    # -- DAX window -----------------------------------------------------------------------------
    def _setupmapping(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                      writer: Writer) -> int:
        fh, foffset, length, flags, moffset = _args(reader, body_len, abi.SETUPMAPPING_IN)
        if (length == 0 or flags & ~_MAPPING_FLAGS or foffset + length > _U64_LIMIT
                or moffset + length > _U64_LIMIT):
            raise _invalid()
        self.fs.setupmapping(ctx, nodeid, fh, foffset, length, flags, moffset)
        return _ok(writer, unique)

    def _removemapping(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                       writer: Writer) -> int:
        body, (count,) = _body(reader, body_len, abi.REMOVEMAPPING_IN)
        # The fuse_removemapping_one entries follow the count; it may not claim more than are there.
        start = abi.REMOVEMAPPING_IN.size
        one = abi.REMOVEMAPPING_ONE.size
        if count == 0 or count > (body_len - start) // one:
            raise _invalid()
        ranges = list(abi.REMOVEMAPPING_ONE.iter_unpack(body[start:start + count * one]))
        if any(length == 0 or moffset + length > _U64_LIMIT for moffset, length in ranges):
            raise _invalid()
        self.fs.removemapping(ctx, ranges)
        return _ok(writer, unique)

    # -- extended attributes --------------------------------------------------------------------
    def _setxattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                  writer: Writer) -> int:
        # The 16-byte fuse_setxattr_in only once FUSE_SETXATTR_EXT is negotiated; 8 bytes before.
        st = abi.SETXATTR_IN if self._setxattr_ext else abi.SETXATTR_IN_COMPAT
        body, fields = _body(reader, body_len, st)
        size, flags = fields[0], fields[1]
        name, pos = _xattr_name(body, st.size)
        if len(body) - pos != size:
            raise _invalid()
        if self._acl_kill_sgid and fields[2] & abi.FUSE_SETXATTR_ACL_KILL_SGID:
            # Passed only when set and ACLs were negotiated, so file systems without ACLs need not
            # know the keyword (the flag is about an ACL's effect on the mode).
            self.fs.setxattr(ctx, nodeid, name, body[pos:], flags, kill_sgid=True)
        else:
            self.fs.setxattr(ctx, nodeid, name, body[pos:], flags)
        return _ok(writer, unique)

    def _getxattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                  writer: Writer) -> int:
        body, (size,) = _body(reader, body_len, abi.GETXATTR_IN)
        name, _ = _xattr_name(body, abi.GETXATTR_IN.size)
        return self._reply_xattr(writer, unique, size, self.fs.getxattr(ctx, nodeid, name))

    def _listxattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                   writer: Writer) -> int:
        (size,) = _args(reader, body_len, abi.GETXATTR_IN)
        names = self.fs.listxattr(ctx, nodeid)
        return self._reply_xattr(writer, unique, size, b"".join(n + b"\0" for n in names))

    def _reply_xattr(self, writer: Writer, unique: int, size: int, value: bytes) -> int:
        """Size 0 asks only for the length; otherwise the value, ERANGE if larger than `size`. The
        value comes from the file system, so `size` (up to 2**32-1) never sizes an allocation."""
        if size == 0:
            return _send(writer, unique, _R_XATTR_SIZE.pack(_R_XATTR_SIZE.size, 0, unique, len(value)))
        if len(value) > size:
            return _error(writer, unique, errno.ERANGE)
        return _send_payload(writer, unique, value)

    def _removexattr(self, unique: int, nodeid: int, ctx: Context, body_len: int, reader: Reader,
                     writer: Writer) -> int:
        name, _ = _xattr_name(reader.read(body_len), 0)
        self.fs.removexattr(ctx, nodeid, name)
        return _ok(writer, unique)
