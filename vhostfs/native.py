"""Access to the cffi helper (vhostfs._native), compiling it on first use when running from a checkout.

The extension is normally built by `pip install`; when the package is used straight from a source tree
(`python3 -m vhostfs` in a checkout) it is compiled once into a per-user cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from types import ModuleType


def _load() -> ModuleType:
    try:
        from vhostfs import _native
        return _native
    except ImportError:
        pass
    from vhostfs import _native_build
    from vhostfs._native_build import ffibuilder

    # One build per version of the helper's source, compiled in a private directory and renamed into
    # place: processes importing at the same time never load a half-written or replaced library.
    digest = hashlib.sha256((_native_build.CDEF + _native_build.SOURCE).encode()).hexdigest()[:16]
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
    """unshare(2) with CLONE_NEW* `flags`; raises OSError."""
    _check(lib.vhostfs_unshare(flags))


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    """pivot_root(2); raises OSError."""
    _check(lib.vhostfs_pivot_root(new_root, put_old))
