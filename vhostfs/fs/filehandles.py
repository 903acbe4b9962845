"""Kernel file handles (name_to_handle_at/open_by_handle_at) and mount ids for the inode table.

A file handle names a host file without keeping it open, so the daemon can know far more inodes than
it may hold fds (`--inode-file-handles`, as in virtiofsd). Handles are only ever made here, from fds
the daemon opened itself; none ever comes from the guest.

open_by_handle_at(2) needs CAP_DAC_READ_SEARCH and an fd on the file's mount that is not O_PATH (the
kernel rejects O_PATH fds there); `MountFds` keeps one such fd per mount id, for as long as inodes on
that mount hold handles.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import NamedTuple

from vhostfs import native

#: The values of --inode-file-handles.
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")


class FileHandle(NamedTuple):
    """An opaque kernel file handle and the id of the mount it is valid on."""

    handle_type: int
    data: bytes
    mount_id: int


def mount_id_from_fdinfo(fd: int, proc_fd: int | None = None) -> int:
    """The mount id of `fd` from the "mnt_id:" line of /proc/self/fdinfo/FD (kernels without
    statx STATX_MNT_ID); `proc_fd` is an fd of /proc, for use after a chroot."""
    name = f"self/fdinfo/{fd}"
    info = os.open(name if proc_fd is not None else "/proc/" + name, os.O_RDONLY | os.O_CLOEXEC,
                   dir_fd=proc_fd)
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        if key == b"mnt_id":
            return int(value)
    raise OSError(errno.ENOTSUP, "no mnt_id in /proc/self/fdinfo")


def mount_id(fd: int, proc_fd: int | None = None) -> int:
    """The mount id of `fd`: statx(2) STATX_MNT_ID, or /proc/self/fdinfo where statx lacks it."""
    mnt = native.mount_id(fd)
    return mnt if mnt is not None else mount_id_from_fdinfo(fd, proc_fd)


class MountFds:
    """mount id -> an open (not O_PATH) directory fd on that mount, counted by its users. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, list[int]] = {}  # mount id -> [fd, users]

    def acquire(self, mnt: int, path_fd: int, kind: int) -> bool:
        """Counts one more user of mount `mnt`, opening its fd from `path_fd` (an O_PATH fd of a file of
        kind `kind` on that mount) the first time. Returns False when no fd can be had: the mount is new
        and `path_fd` is not a directory (only a directory is opened here, never a device or FIFO)."""
        with self._lock:
            entry = self._fds.get(mnt)
            if entry is not None:
                entry[1] += 1
                return True
            if kind != stat.S_IFDIR:
                return False
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)
            self._fds[mnt] = [fd, 1]
            return True

    def release(self, mnt: int) -> None:
        """Ends one `acquire`; the mount's fd closes with its last user, so the mount is not kept busy."""
        with self._lock:
            entry = self._fds[mnt]
            entry[1] -= 1
            if entry[1]:
                return
            del self._fds[mnt]
        os.close(entry[0])

    def fd(self, mnt: int) -> int:
        """The fd of mount `mnt`; ESTALE when no node on it is left (all were forgotten meanwhile)."""
        with self._lock:
            entry = self._fds.get(mnt)
        if entry is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return entry[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._fds)


def make_handle(fd: int) -> FileHandle:
    """The file handle of the file open as `fd` (O_PATH is fine); OSError where there is none."""
    handle_type, data, mnt = native.name_to_handle_at(fd)
    return FileHandle(handle_type, data, mnt)


def probe(root_fd: int) -> None:
    """Checks that file handles work on the share: a handle of `root_fd` (an O_PATH directory fd) can
    be made and reopened to the same directory. Raises OSError saying what failed otherwise."""
    try:
        handle = make_handle(root_fd)
    except OSError as e:
        raise OSError(e.errno, f"the file system cannot make file handles (name_to_handle_at: "
                               f"{os.strerror(e.errno)})") from None
    mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        fd = native.open_by_handle_at(mount_fd, handle.handle_type, handle.data,
                                      os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        hint = " (it needs CAP_DAC_READ_SEARCH)" if e.errno == errno.EPERM else ""
        raise OSError(e.errno, f"file handles cannot be reopened (open_by_handle_at: "
                               f"{os.strerror(e.errno)}){hint}") from None
    finally:
        os.close(mount_fd)
    try:
        a, b = os.stat(fd), os.stat(root_fd)
    finally:
        os.close(fd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        raise OSError(errno.ESTALE, "a reopened file handle named another file")
