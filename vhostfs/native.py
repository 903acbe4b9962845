"""Access to the cffi helper (vhostfs._native), compiling it on first use when running from a checkout.

The extension is normally built by `pip install`; when the package is used straight from a source tree
(`python3 -m vhostfs` in a checkout) it is compiled once into a per-user cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import sys
import tempfile
from array import array
from types import ModuleType


def _load() -> ModuleType:
    from vhostfs._native_build import BUILD_ID, ffibuilder

    try:
        from vhostfs import _native

        # An extension built by an older install of a checkout lacks what the source now declares.
        if _native.ffi.string(_native.lib.vhostfs_build_id()).decode() == BUILD_ID:
            return _native
    except (ImportError, AttributeError):
        pass
    # One build per version of the helper's source, compiled in a private directory and renamed into
    # place: processes importing at the same time never load a half-written or replaced library.
    digest = BUILD_ID
    tag = f"{sys.implementation.cache_tag}-{os.uname().machine}"
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vhostfs", tag)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"_native-{digest}.so")
    if not os.path.exists(path):
        build_dir = tempfile.mkdtemp(dir=cache)
        try:
            os.replace(ffibuilder.compile(tmpdir=build_dir), path)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("vhostfs._native", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["vhostfs._native"] = module
    return module


_mod = _load()
ffi = _mod.ffi
lib = _mod.lib

#: Full memory fence (virtio 1.2, 2.7.7.2 and 2.7.10: store used idx, fence, load used_event/flags).
mb = lib.vhostfs_mb
#: Orders loads: read avail->idx before the ring entries and descriptors it covers.
rmb = lib.vhostfs_rmb
#: Orders stores: publish used ring entries before used->idx.
wmb = lib.vhostfs_wmb


def _check(ret: int) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """renameat2(2); raises OSError."""
    _check(lib.vhostfs_renameat2(olddirfd, old, newdirfd, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (os.posix_fallocate has none); raises OSError."""
    _check(lib.vhostfs_fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    """syncfs(2); raises OSError."""
    _check(lib.vhostfs_syncfs(fd))


def setfsuid(uid: int) -> int:
    """setfsuid(2) for the calling thread; returns the previous fsuid."""
    return lib.setfsuid(uid)


def setfsgid(gid: int) -> int:
    """setfsgid(2) for the calling thread; returns the previous fsgid."""
    return lib.setfsgid(gid)


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2) at `addr` (MAP_FIXED in `flags` to insist on it); returns the address, raises OSError."""
    ptr = lib.vhostfs_mmap(ffi.cast("void *", addr), length, prot, flags, fd, offset)
    if ptr == ffi.cast("void *", -1):
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return int(ffi.cast("uintptr_t", ptr))


def munmap(addr: int, length: int) -> None:
    """munmap(2); raises OSError."""
    _check(lib.vhostfs_munmap(ffi.cast("void *", addr), length))


def msync(addr: int, length: int, flags: int) -> None:
    """msync(2) (MS_SYNC, MS_ASYNC, MS_INVALIDATE); raises OSError."""
    _check(lib.vhostfs_msync(ffi.cast("void *", addr), length, flags))


def buffer(addr: int, length: int) -> memoryview:
    """A writable memoryview of `length` bytes at `addr` (which must stay mapped while it is used)."""
    return memoryview(ffi.buffer(ffi.cast("char *", addr), length))


def mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    """mount(2) with MS_* `flags` and the file system's option string `data`; raises OSError."""
    _check(lib.vhostfs_mount(source, target, fstype, flags, data))


def umount2(target: bytes, flags: int) -> None:
    """umount2(2) with MNT_FORCE / MNT_DETACH in `flags`; raises OSError."""
    _check(lib.vhostfs_umount2(target, flags))


def unshare(flags: int) -> None:
    """unshare(2) with CLONE_NEW* or CLONE_FS `flags` (the latter for the calling thread); raises OSError."""
    _check(lib.vhostfs_unshare(flags))


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    """pivot_root(2); raises OSError."""
    _check(lib.vhostfs_pivot_root(new_root, put_old))


def capget() -> tuple[int, int, int]:
    """capget(2) of the calling thread: its (effective, permitted, inheritable) sets as bit masks."""
    data = ffi.new("uint32_t[6]")
    _check(lib.vhostfs_capget(data))
    return tuple(data[i] | data[i + 3] << 32 for i in range(3))  # type: ignore[return-value]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of the calling thread (bit masks, capability n = bit n); raises OSError."""
    data = ffi.new("uint32_t[6]")
    for i, mask in enumerate((effective, permitted, inheritable)):
        data[i] = mask & 0xFFFFFFFF
        data[i + 3] = mask >> 32 & 0xFFFFFFFF
    _check(lib.vhostfs_capset(data))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns its result, raises OSError."""
    return _check(lib.vhostfs_prctl(option, arg2, arg3, arg4, arg5))


def seccomp_filter(flags: int, program: bytes) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags) with `program`, packed struct sock_filter entries.

    Returns the syscall's result (with SECCOMP_FILTER_FLAG_TSYNC, 0); raises OSError.
    """
    if len(program) % 8:
        raise ValueError("a classic BPF program is a whole number of 8-byte instructions")
    return _check(lib.vhostfs_seccomp_filter(flags, program, len(program) // 8))


#: The largest file handle the kernel makes (MAX_HANDLE_SZ in <fcntl.h>).
MAX_HANDLE_SZ = 128


def getdents(fd: int) -> bytes:
    """The linux_dirent64 records getdents64(2) returns for directory `fd`, from its position to the end."""
    buf = bytearray(1 << 16)
    chunks = []
    with ffi.from_buffer("uint8_t[]", buf) as ptr:
        while (n := _check(lib.vhostfs_getdents(fd, ptr, len(buf)))) > 0:
            chunks.append(buf[:n])  # one copy out of the reused buffer; join makes the bytes
    return b"".join(chunks)


def index_dirents(data: bytes, start: int = 0) -> array:
    """The offsets of the linux_dirent64 records in data[start:], "." and ".." left out; raises
    ValueError for a malformed record."""
    # A record takes at least 24 bytes (19 of header, a name and its NUL, 8-byte aligned).
    offsets = array("I", bytes(4 * ((len(data) - start) // 24 + 1)))
    with ffi.from_buffer("uint8_t[]", data) as src, ffi.from_buffer("uint32_t[]", offsets) as out:
        n = lib.vhostfs_index_dirents(src, start, len(data), out, len(offsets))
    if n < 0:
        raise ValueError("malformed linux_dirent64 record")
    del offsets[n:]
    return offsets


#: struct vhostfs_stat (host byte order): dev, ino, mount id, size, blocks, atime, mtime, ctime (s),
#: their ns, mode, nlink, uid, gid, rdev (32-bit encoding), blksize, attr_flags (fuse_attr.flags the
#: file system sets), err (0 or errno), has_mnt_id (whether the kernel reported the mount id).
STAT = struct.Struct("=5Q3q10IiI")
assert STAT.size == ffi.sizeof("struct vhostfs_stat") == 112
#: Where err and has_mnt_id lie in a STAT record, and the (dev, ino, mount id) key that starts it.
STAT_ERR = struct.Struct("=iI")
STAT_ERR_OFFSET = 104
STAT_KEY = struct.Struct("=3Q")
#: Where uid and gid lie in a STAT record.
STAT_OWNER = struct.Struct("=II")
STAT_OWNER_OFFSET = 84


def stat_dirents(dirfd: int, data: bytes, offsets: array, first: int, count: int) -> bytearray:
    """STAT records of entries first..first+count of the linux_dirent64 records of `data` at
    `offsets`, by statx(2) of each name in directory `dirfd` (not following symlinks): one system call
    per entry gives the attributes and the mount id. b"." and b".." come back zeroed, and an entry the
    call failed for (one that vanished) with its errno in `err`."""
    if not 0 <= first <= first + count <= len(offsets):
        raise ValueError("entries outside the listing")
    out = bytearray(STAT.size * count)
    with (ffi.from_buffer("uint8_t[]", data) as src, ffi.from_buffer("uint32_t[]", offsets) as offs,
          ffi.from_buffer("struct vhostfs_stat[]", out) as dst):
        lib.vhostfs_stat_dirents(dirfd, src, len(data), offs, first, count, dst)
    return out


def mount_id(fd: int, name: bytes = b"") -> int | None:
    """The mount id of `fd`, or of `name` (not followed) in directory `fd`, from statx(2) STATX_MNT_ID;
    None when the kernel does not report it."""
    out = ffi.new("unsigned long long *")
    if _check(lib.vhostfs_mount_id(fd, name, out)) == 1:
        return None
    return int(out[0])


def name_to_handle_at(fd: int) -> tuple[int, bytes, int]:
    """name_to_handle_at(2) of the file open as `fd` (AT_EMPTY_PATH): (handle type, handle bytes,
    mount id); raises OSError (EOPNOTSUPP where the file system has no file handles)."""
    buf = ffi.new("unsigned char[]", MAX_HANDLE_SZ)
    handle_type = ffi.new("int *")
    mnt = ffi.new("int *")
    size = _check(lib.vhostfs_name_to_handle(fd, buf, MAX_HANDLE_SZ, handle_type, mnt))
    return int(handle_type[0]), bytes(ffi.buffer(buf, size)), int(mnt[0])


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2): a new fd of the file `handle` names on the mount of `mount_fd`; raises
    OSError (EPERM without CAP_DAC_READ_SEARCH, ESTALE when the file is gone)."""
    return _check(lib.vhostfs_open_by_handle(mount_fd, handle, len(handle), handle_type, flags))


def _neg(ret: int) -> int:
    """A helper's `-errno` return as OSError."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def buffer_address(buf: object) -> int:
    """The address of writable buffer `buf` (an mmap or bytearray that the caller keeps alive and
    never resizes), for kernel interfaces that take pointers, such as an iovec array."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf, require_writable=True)))


class Uring:
    """A minimal io_uring with 128-byte SQEs, for IORING_OP_URING_CMD commands (FUSE over io_uring).

    `cmd` queues one command; `wait` submits what is queued and returns one completion
    (user_data, result), waiting without the GIL when there is none. Not thread-safe: one thread
    uses a ring. `close` unmaps and closes it; so does garbage collection.
    """

    def __init__(self, entries: int) -> None:
        self._ring = ffi.new("struct vhostfs_uring *")
        self._ring.fd = -1
        _neg(lib.vhostfs_uring_setup(self._ring, entries))
        self._ud = ffi.new("uint64_t *")
        self._res = ffi.new("int32_t *")

    @property
    def entries(self) -> int:
        """Submission ring size (the kernel rounds the request up to a power of two)."""
        return int(self._ring.sq_entries)

    def cmd(self, fd: int, cmd_op: int, addr: int, length: int, user_data: int, data: bytes) -> None:
        """Queues IORING_OP_URING_CMD `cmd_op` on `fd` with sqe addr/len and up to 80 bytes of command
        `data`; OSError EBUSY when the submission ring is full."""
        _neg(lib.vhostfs_uring_cmd(self._ring, fd, cmd_op, addr, length, user_data, data, len(data)))

    def wait(self) -> tuple[int, int]:
        """Submits the queued commands and returns the next completion as (user_data, res), res being
        the command's result (-errno for a failure); OSError if io_uring_enter(2) fails."""
        _neg(lib.vhostfs_uring_wait(self._ring, self._ud, self._res))
        return int(self._ud[0]), int(self._res[0])

    def close(self) -> None:
        if self._ring.fd >= 0:
            lib.vhostfs_uring_close(self._ring)

    def __del__(self) -> None:
        self.close()
