"""Access to the cffi helper (vhostfs._native), compiling it on first use when running from a checkout.

The extension is normally built by `pip install`; when the package is used straight from a source tree
(`python3 -m vhostfs` in a checkout) it is compiled once into a per-user cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def _load() -> ModuleType:
    try:
        from vhostfs import _native
        return _native
    except ImportError:
        pass
    from vhostfs._native_build import ffibuilder

    tag = f"{sys.implementation.cache_tag}-{os.uname().machine}"
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vhostfs", tag)
    os.makedirs(cache, exist_ok=True)
    path = ffibuilder.compile(tmpdir=cache)
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
