"""The passthrough's part of a moved session: its nodes, open handles and locks, saved and found again.

The guest knows the passthrough's nodes by nodeid and its open files by fh; after a live migration
(or a live upgrade) the new daemon must answer for every one of them. The sections this module writes
(docs/session-state.md has the layout) record, per node, its nodeid, lookup count and file type, and
how to find its host file again:

- "find-paths" (virtiofsd's default `--migration-mode`): the node's path in the share, read from the
  magic link of its O_PATH fd at save time (so renames made meanwhile are followed), and opened again
  on the destination one component at a time with O_NOFOLLOW below the share's root, so a path in a
  stream can never reach outside the share nor through a symlink;
- "file-handles": the node's kernel file handle (name_to_handle_at), opened with open_by_handle_at
  on the share's mount; needs CAP_DAC_READ_SEARCH and the same file system on both sides.

`confirm_paths` (`--migration-confirm-paths`) resolves every path once more on the source and checks
it still names the node's file; `verify_handles` (`--migration-verify-handles`) sends the file handle
with the path and has the destination check that the file it found has that handle (same host file,
not merely the same name).

A regular file that was deleted while the guest holds it open (a program's temporary file) has no
path left. Rather than failing, the source copies its content into a hidden file in the share root
(`.vhostfs-unlinked-*`, mode and owner kept), the destination opens that copy for the node and its
handles and unlinks it at once, so the guest goes on with an open, unlinked file of the same content.
If the migration fails, the source deletes its copies when the session resumes. A deleted file no
handle holds, and a deleted directory, cannot be found: they are *lost*.

A node or handle that cannot be found again is an error under on_error "abort" (the load fails and
the source goes on), or under "guest-error" a lost one: requests on it get EIO until the guest lets go.

Locks: the owners' POSIX (OFD) record locks and flock locks are read from /proc/self/fdinfo of the
descriptions holding them and taken again on the destination. On the same host the source holds them
until it exits, so a lock that is not free yet is retried in the background for `LOCK_RETRY_SECONDS`
(the guest's own view of its locks does not change meanwhile).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import struct
import threading
import time
from array import array
from typing import TYPE_CHECKING

from vhostfs import native
from vhostfs.fs.filehandles import make_handle
from vhostfs.fs.locks import OFFSET_MAX, parse_fdinfo_locks
from vhostfs.fuse.filesystem import LINUX_DIRENT64, ROOT_ID, HostDirents
from vhostfs.fuse.session_state import Decoder, Encoder, StateError, section

if TYPE_CHECKING:
    from vhostfs.fs.handles import HandleTable
    from vhostfs.fs.inodes import InodeTable
    from vhostfs.fs.locks import LockTable

log = logging.getLogger(__name__)

#: virtiofsd's --migration-mode and --migration-on-error values.
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")

#: Name prefix of the copies of deleted open files, in the share root.
UNLINKED_PREFIX = ".vhostfs-unlinked-"
#: How long the destination keeps trying to take a lock the source still holds.
LOCK_RETRY_SECONDS = 60.0

PATH_MAX = 4096
NAME_MAX = 255
MAX_HANDLE_SZ = 128
#: A directory listing carried for an open directory handle (its readdir position) at most.
MAX_LISTING = 64 << 20

_NODE_PATH = 1 << 0
_NODE_HANDLE = 1 << 1
_NODE_COPY = 1 << 2
_NODE_FLAGS = _NODE_PATH | _NODE_HANDLE | _NODE_COPY
_KINDS = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
_LOCK_POSIX = 0
_LOCK_FLOCK = 1
# open(2) flags a handle may be reopened with: its access mode and the status flags that matter.
_REOPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_DIRECT
                 | os.O_NOATIME | os.O_LARGEFILE | os.O_DIRECTORY)
# Smallest encoded node, handle and lock records (for the count checks).
_NODE_MIN = 8 + 8 + 4 + 1
_HANDLE_MIN = 8 + 8 + 1 + 4 + 4
_LOCK_MIN = 1 + 8 + 8 + 8 + 4 + 1 + 8 + 8
#: A node record's fixed part: nodeid, nlookup, file type, flags.
_NODE_HEAD = struct.Struct("<QQIB")
assert _NODE_HEAD.size == _NODE_MIN


def _split_path(path: bytes) -> list[bytes]:
    """The components of share-relative `path`; StateError unless each is an ordinary name."""
    if not path or len(path) > PATH_MAX:
        raise StateError(f"path of {len(path)} bytes")
    parts = path.split(b"/")
    for part in parts:
        if not part or part in (b".", b"..") or b"\0" in part or len(part) > NAME_MAX:
            raise StateError(f"path {path!r} has a component that is not a plain name")
    return parts


def open_path(root_fd: int, path: bytes) -> int:
    """An O_PATH fd of share-relative `path`, opened one component at a time below `root_fd` without
    following any symlink (the last component may be one: it is opened as the link itself)."""
    parts = _split_path(path)
    fd = root_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            new = os.open(part, flags, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = new
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def _parse_listing(data: bytes) -> array:
    """The record offsets of a saved directory listing (linux_dirent64 records), every record checked
    to lie within `data` and to hold a NUL-terminated name without "/". The listing starts with the
    daemon's own "." and ".."; the host's, which getdents64 returns too, are skipped as the
    passthrough skips them."""
    offsets = array("I")
    pos = 0
    while pos < len(data):
        if len(data) - pos < LINUX_DIRENT64.size + 1:
            raise StateError("directory listing truncated")
        _, _, reclen, _ = LINUX_DIRENT64.unpack_from(data, pos)
        if reclen < LINUX_DIRENT64.size + 1 or reclen > len(data) - pos:
            raise StateError(f"directory listing record of length {reclen}")
        name_end = data.find(b"\0", pos + LINUX_DIRENT64.size, pos + reclen)
        name = data[pos + LINUX_DIRENT64.size:name_end]
        if name_end < 0 or not name or b"/" in name:
            raise StateError("directory listing record without a valid name")
        if len(offsets) < 2 or name not in (b".", b".."):
            offsets.append(pos)
        pos += reclen
    return offsets


class _Node:
    __slots__ = ("nodeid", "nlookup", "kind", "flags", "path", "handle_type", "handle")

    def __init__(self, nodeid: int, nlookup: int, kind: int) -> None:
        self.nodeid = nodeid
        self.nlookup = nlookup
        self.kind = kind
        self.flags = 0
        self.path = b""
        self.handle_type = 0
        self.handle = b""


class SessionMover:
    """Saves and loads the session state of one Passthrough's tables (see the module doc)."""

    def __init__(self, inodes: InodeTable, handles: HandleTable, locks: LockTable, proc_fd: int, *,
                 mode: str = "find-paths", on_error: str = "abort", verify_handles: bool = False,
                 confirm_paths: bool = False, flock: bool = True) -> None:
        if mode not in MIGRATION_MODES:
            raise ValueError(f"migration mode must be one of {', '.join(MIGRATION_MODES)}, not {mode!r}")
        if on_error not in MIGRATION_ON_ERROR:
            raise ValueError(f"migration on-error must be one of {', '.join(MIGRATION_ON_ERROR)}, "
                             f"not {on_error!r}")
        self._inodes = inodes
        self._handles = handles
        self._locks = locks
        self._proc = proc_fd
        self.mode = mode
        self.on_error = on_error
        self.verify_handles = verify_handles
        self.confirm_paths = confirm_paths
        self._flock = flock
        #: Copies of deleted open files this source made for its last save (names in the root).
        self._copies: list[bytes] = []
        self._lock_thread: threading.Thread | None = None

    @property
    def _root_fd(self) -> int:
        return self._inodes.root.fd

    # -- saving -------------------------------------------------------------------------------------
    def _path_of(self, fd: int, prefix: bytes) -> bytes | None:
        """The share-relative path of the file open as `fd` (None if it has none in the share);
        `prefix` is the share root's own path with a final "/"."""
        path = os.readlink(f"self/fd/{fd}", dir_fd=self._proc).encode()
        if not path.startswith(prefix):
            return None
        return path[len(prefix):]

    def _copy_deleted(self, nodeid: int, fd: int, st: os.stat_result) -> bytes:
        """Copies deleted regular file `fd` into a new hidden file in the share root; its name."""
        name = f"{UNLINKED_PREFIX}{nodeid}-{secrets.token_hex(8)}".encode()
        src = os.open(f"self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=self._root_fd)
            try:
                self._copies.append(name)
                offset = 0
                while offset < st.st_size:
                    n = os.copy_file_range(src, dst, st.st_size - offset, offset, offset)
                    if n == 0:
                        break
                    offset += n
                os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return name

    def _describe(self, nodeid: int, nlookup: int, open_nodes: set[int], prefix: bytes) -> _Node | None:
        """The record of one live node; None when it cannot be found again (a lost node)."""
        with self._inodes.use(nodeid) as inode:
            node = _Node(nodeid, nlookup, inode.kind)
            fd = inode.fd
            st = os.stat(fd)
            if st.st_nlink == 0:
                # Neither a path nor (on most file systems) a file handle reaches a deleted file.
                if inode.kind == stat.S_IFREG and nodeid in open_nodes:
                    try:
                        node.path = self._copy_deleted(nodeid, fd, st)
                    except OSError as e:
                        log.warning("deleted open file of node %d cannot be copied: %s", nodeid, e.strerror)
                        return None
                    node.flags = _NODE_PATH | _NODE_COPY
                    return node
                return None
            if self.mode == "file-handles" or self.verify_handles:
                try:
                    handle = make_handle(fd)
                except OSError as e:
                    log.warning("node %d has no file handle: %s", nodeid, e.strerror)
                    if self.mode == "file-handles":
                        return None
                else:
                    node.flags |= _NODE_HANDLE
                    node.handle_type, node.handle = handle.handle_type, handle.data
            if self.mode == "file-handles":
                return node
            path = self._path_of(fd, prefix)
            if path is None:
                return None
            # The magic link of a file whose name was removed (it has others) ends in " (deleted)":
            # such a path, like every path with --migration-confirm-paths, must name the file.
            if self.confirm_paths or path.endswith(b" (deleted)"):
                try:
                    check = open_path(self._root_fd, path)
                except (OSError, StateError):
                    return None
                try:
                    cst = os.stat(check)
                finally:
                    os.close(check)
                if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino):
                    return None
            node.flags |= _NODE_PATH
            node.path = path
            return node

    def save(self) -> list[tuple[bytes, int, bytes]]:
        """The NODE, HNDL and LOCK sections of the running session. Raises OSError naming the first
        node that cannot be found again, under on_error "abort"."""
        self.discard_copies()
        next_id, nodes = self._inodes.saved_nodes()
        next_fh, handles, lost_fhs = self._handles.saved_handles()
        open_nodes = {h.nodeid for h in handles}
        root = os.readlink(f"self/fd/{self._root_fd}", dir_fd=self._proc).encode()
        prefix = root.rstrip(b"/") + b"/"
        records: list[_Node] = []
        lost: list[tuple[int, int]] = []
        root_mount = self._inodes.root.key[2]
        for nodeid, nlookup, kind, handle in nodes:
            if (self.mode == "file-handles" and handle is not None and handle.mount_id == root_mount
                    and nodeid not in open_nodes):
                # The table holds the node by this very handle: nothing to open or resolve.
                node = _Node(nodeid, nlookup, kind)
                node.flags = _NODE_HANDLE
                node.handle_type, node.handle = handle.handle_type, handle.data
                records.append(node)
                continue
            try:
                node = self._describe(nodeid, nlookup, open_nodes, prefix)
            except OSError as e:
                if e.errno == errno.EIO:  # already lost on this side
                    node = None
                else:
                    raise
            if node is None:
                if self.on_error == "abort" and any(h.nodeid == nodeid for h in handles):
                    self.discard_copies()
                    raise OSError(errno.ENOENT, f"node {nodeid} (open) cannot be found again on a "
                                  "destination; --migration-on-error guest-error would let it fail alone")
                log.warning("node %d cannot be found again: after migration its requests get EIO", nodeid)
                lost.append((nodeid, nlookup))
            else:
                records.append(node)
        enc = Encoder()
        enc.u64(next_id)
        enc.u32(len(records))
        for n in records:
            enc.record(_NODE_HEAD, n.nodeid, n.nlookup, n.kind, n.flags)
            if n.flags & _NODE_PATH:
                enc.blob(n.path)
            if n.flags & _NODE_HANDLE:
                enc.u32(n.handle_type & 0xFFFFFFFF)
                enc.blob(n.handle)
        enc.u32(len(lost))
        for nodeid, nlookup in lost:
            enc.u64(nodeid)
            enc.u64(nlookup)
        henc = Encoder()
        henc.u64(next_fh)
        henc.u32(len(handles))
        lost_nodes = {nodeid for nodeid, _ in lost}
        for h in handles:
            henc.u64(h.fh)
            henc.u64(h.nodeid)
            henc.u8(1 if h.is_dir else 0)
            henc.u32(fcntl.fcntl(h.fd, fcntl.F_GETFL) & _REOPEN_FLAGS)
            listing = h.listing
            if listing is None or h.nodeid in lost_nodes:
                henc.u32(0)
                henc.u32(0)
            else:
                head = listing.offsets[1] if len(listing.offsets) > 1 else 0
                henc.u32(1)
                henc.u32(head)
                henc.blob(listing.data)
        henc.u32(len(lost_fhs))
        for fh in sorted(lost_fhs):
            henc.u64(fh)
        return [(b"NODE", 1, enc.payload()), (b"HNDL", 1, henc.payload()),
                (b"LOCK", 1, self._save_locks(handles))]

    def _fdinfo_locks(self, fd: int) -> list[tuple[str, int, int, int]]:
        with open(os.open(f"self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc)) as f:
            return parse_fdinfo_locks(f.read())

    def _save_locks(self, handles: list) -> bytes:
        enc = Encoder()
        records = []
        for nodeid, owner, pid, fd, fhs in self._locks.saved():
            if not fhs:
                continue
            for cls, kind, start, end in self._fdinfo_locks(fd):
                if cls == "OFDLCK":
                    records.append((_LOCK_POSIX, nodeid, owner, fhs[0], pid, kind, start, end))
        if self._flock:
            for h in handles:
                if not h.is_dir:
                    for cls, kind, _, _ in self._fdinfo_locks(h.fd):
                        if cls == "FLOCK":
                            records.append((_LOCK_FLOCK, h.nodeid, 0, h.fh, 0, kind, 0, OFFSET_MAX))
        enc.u32(len(records))
        for cls, nodeid, owner, fh, pid, kind, start, end in records:
            enc.u8(cls)
            enc.u64(nodeid)
            enc.u64(owner)
            enc.u64(fh)
            enc.u32(pid & 0xFFFFFFFF)
            enc.u8(kind)
            enc.u64(start)
            enc.u64(end)
        return enc.payload()

    def discard_copies(self) -> None:
        """Deletes the copies of deleted files the last save made (the session stays here)."""
        for name in self._copies:
            try:
                os.unlink(name, dir_fd=self._root_fd)
            except FileNotFoundError:
                pass
        self._copies = []

    # -- loading ------------------------------------------------------------------------------------
    def _read_nodes(self, dec: Decoder) -> tuple[int, list[_Node], dict[int, int]]:
        next_id = dec.u64("next nodeid")
        if not ROOT_ID < next_id < 1 << 63:
            raise StateError(f"next nodeid {next_id}")
        nodes = []
        for _ in range(dec.count("nodes", _NODE_MIN)):
            nodeid, nlookup, kind, flags = dec.record(_NODE_HEAD, "node")
            node = _Node(nodeid, nlookup, kind)
            node.flags = flags
            if not ROOT_ID < nodeid < next_id or not 0 < nlookup < 1 << 63:
                raise StateError(f"node {nodeid} with lookup count {nlookup}")
            if node.kind not in _KINDS or node.flags & ~_NODE_FLAGS:
                raise StateError(f"node {nodeid}: file type {node.kind:#o}, flags {node.flags:#x}")
            if node.flags & _NODE_PATH:
                node.path = dec.blob("path", PATH_MAX)
                _split_path(node.path)
                if node.flags & _NODE_COPY and (b"/" in node.path or not node.path.startswith(
                        UNLINKED_PREFIX.encode()) or node.kind != stat.S_IFREG):
                    raise StateError(f"node {nodeid}: {node.path!r} is not a copy of a deleted file")
            elif node.flags & _NODE_COPY:
                raise StateError(f"node {nodeid}: a copy without a path")
            if node.flags & _NODE_HANDLE:
                t = dec.u32("handle type")
                node.handle_type = t - (1 << 32) if t >= 1 << 31 else t
                node.handle = dec.blob("file handle", MAX_HANDLE_SZ)
            nodes.append(node)
        lost: dict[int, int] = {}
        for _ in range(dec.count("lost nodes", 16)):
            nodeid = dec.u64("nodeid")
            nlookup = dec.u64("lookup count")
            if not ROOT_ID < nodeid < next_id or not 0 < nlookup < 1 << 63 or nodeid in lost:
                raise StateError(f"lost node {nodeid} with lookup count {nlookup}")
            lost[nodeid] = nlookup
        dec.end()
        return next_id, nodes, lost

    def _find(self, node: _Node, dirs: dict[bytes, int]) -> int:
        """An O_PATH fd of the host file of `node`, checked; OSError/StateError when not found.
        `dirs` maps the paths of directories already found to their fds: a node below one of them
        is opened relative to it, one component instead of the whole path."""
        if node.flags & _NODE_PATH and self.mode == "find-paths" or node.flags & _NODE_COPY:
            parent, _, name = node.path.rpartition(b"/")
            parent_fd = dirs.get(parent) if parent else None
            if parent_fd is not None:
                fd = self._inodes.open_fd(lambda: os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                                          dir_fd=parent_fd))
            else:
                fd = self._inodes.open_fd(lambda: open_path(self._root_fd, node.path))
        elif node.flags & _NODE_HANDLE:
            if dirs.get(b"") is None:
                # open_by_handle_at(2) wants a mount fd that is not O_PATH: the root opened for reading.
                dirs[b""] = os.open(f"self/fd/{self._root_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                    dir_fd=self._proc)
            mount_fd = dirs[b""]
            fd = self._inodes.open_fd(lambda: native.open_by_handle_at(
                mount_fd, node.handle_type, node.handle, os.O_PATH | os.O_CLOEXEC))
        else:
            what = "path" if self.mode == "find-paths" else "file handle"
            raise StateError(f"node {node.nodeid} was saved without a {what} (--migration-mode {self.mode})")
        try:
            st = os.stat(fd)
            if stat.S_IFMT(st.st_mode) != node.kind:
                raise OSError(errno.ESTALE, f"node {node.nodeid} was a file of type {node.kind:#o}, "
                              f"{node.path!r} is of type {stat.S_IFMT(st.st_mode):#o}")
            if self.verify_handles and node.flags & _NODE_HANDLE and not node.flags & _NODE_COPY:
                mine = make_handle(fd)
                if (mine.handle_type, mine.data) != (node.handle_type, node.handle):
                    raise OSError(errno.ESTALE, f"node {node.nodeid}: {node.path!r} is another file "
                                  "than the source's (--migration-verify-handles)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def load(self, sections: dict) -> None:
        """Installs the session of `sections` (see `save`); on StateError nothing has changed."""
        next_id, nodes, lost = self._read_nodes(section(sections, b"NODE", 1))
        hdec = section(sections, b"HNDL", 1)
        next_fh = hdec.u64("next fh")
        if not 0 < next_fh < 1 << 63:
            raise StateError(f"next fh {next_fh}")
        known = {n.nodeid: n for n in nodes}
        if len(known) != len(nodes) or set(known) & set(lost):
            raise StateError("a nodeid appears twice")
        saved_handles = []
        seen_fhs: set[int] = set()
        for _ in range(hdec.count("handles", _HANDLE_MIN)):
            fh = hdec.u64("fh")
            nodeid = hdec.u64("nodeid")
            is_dir = hdec.u8("directory flag")
            flags = hdec.u32("open flags")
            has_listing = hdec.u32("listing flag")
            head = hdec.u32("listing head")
            listing = hdec.blob("directory listing", MAX_LISTING) if has_listing == 1 else None
            node = known.get(nodeid)
            if node is None and nodeid not in lost:
                raise StateError(f"handle {fh} of unknown node {nodeid}")
            if not 0 < fh < next_fh or fh in seen_fhs:
                raise StateError(f"handle {fh} is repeated or not below the next fh {next_fh}")
            seen_fhs.add(fh)
            if is_dir not in (0, 1) or has_listing not in (0, 1) or flags & ~_REOPEN_FLAGS or (
                    node is not None and (node.kind == stat.S_IFDIR) != bool(is_dir)) or (
                    node is not None and node.kind not in (stat.S_IFREG, stat.S_IFDIR)):
                raise StateError(f"handle {fh}: directory flag {is_dir}, open flags {flags:#x}")
            offsets = None
            if listing is not None:
                if not is_dir:
                    raise StateError(f"handle {fh}: a listing for a file")
                offsets = _parse_listing(listing)
                # The listing starts with "." and ".." (two records), then the host's entries.
                if len(offsets) < 2 or offsets[1] != head:
                    raise StateError(f"handle {fh}: directory listing without its dot entries")
            saved_handles.append((fh, nodeid, bool(is_dir), flags, listing, offsets))
        lost_fhs = set()
        for _ in range(hdec.count("lost handles", 8)):
            fh = hdec.u64("fh")
            if not 0 < fh < next_fh or fh in seen_fhs:
                raise StateError(f"lost handle {fh} is repeated or not below the next fh {next_fh}")
            seen_fhs.add(fh)
            lost_fhs.add(fh)
        hdec.end()
        locks = self._read_locks(section(sections, b"LOCK", 1), {h[0]: h[1] for h in saved_handles})
        self._install(next_id, nodes, lost, next_fh, saved_handles, lost_fhs, locks)

    def _read_locks(self, dec: Decoder, handle_nodes: dict[int, int]) -> list[tuple]:
        locks = []
        for _ in range(dec.count("locks", _LOCK_MIN)):
            cls = dec.u8("lock class")
            nodeid = dec.u64("nodeid")
            owner = dec.u64("owner")
            fh = dec.u64("fh")
            pid = dec.u32("pid")
            kind = dec.u8("lock type")
            start = dec.u64("start")
            end = dec.u64("end")
            if cls not in (_LOCK_POSIX, _LOCK_FLOCK) or kind not in (fcntl.F_RDLCK, fcntl.F_WRLCK) or (
                    handle_nodes.get(fh) != nodeid) or start > end or end > OFFSET_MAX:
                raise StateError(f"lock on node {nodeid} (handle {fh}): class {cls}, type {kind}, "
                                 f"range {start}-{end}")
            locks.append((cls, nodeid, owner, fh, pid, kind, start, end))
        dec.end()
        return locks

    def _failed(self, what: str, e: BaseException) -> None:
        """An object that cannot be found again: StateError under "abort", a warning otherwise."""
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if self.on_error == "abort":
            raise StateError(f"{what} cannot be found again: {why} (--migration-on-error abort)")
        log.warning("%s cannot be found again: %s; the guest gets EIO for it", what, why)

    def _install(self, next_id: int, nodes: list[_Node], lost: dict[int, int], next_fh: int,
                 saved_handles: list[tuple], lost_fhs: set[int], locks: list[tuple]) -> None:
        dirs: dict[bytes, int] = {}
        try:
            self._install_in(next_id, nodes, lost, next_fh, saved_handles, lost_fhs, locks, dirs)
        finally:
            if dirs.get(b"") is not None:
                os.close(dirs[b""])

    def _install_in(self, next_id: int, nodes: list[_Node], lost: dict[int, int], next_fh: int,
                    saved_handles: list[tuple], lost_fhs: set[int], locks: list[tuple],
                    dirs: dict[bytes, int]) -> None:
        handles = []
        copies: list[bytes] = []
        lost = dict(lost)
        of_node: dict[int, list[tuple]] = {}
        for saved in saved_handles:
            of_node.setdefault(saved[1], []).append(saved)
        for nodeid in lost:
            lost_fhs.update(saved[0] for saved in of_node.get(nodeid, ()))
        # With file handles the table keeps few fds open (inodes.py), so the nodes go in in batches
        # and their fds may close behind them; otherwise every node holds its fd anyway.
        batch = len(nodes) + 1 if self._inodes.file_handles == "never" else 256
        pending: list[tuple[int, int, int, os.stat_result]] = []
        installed = 0

        def flush() -> None:
            nonlocal pending, installed
            try:
                self._inodes.restore(pending, lost, next_id, more=installed > 0)
            except (OSError, ValueError) as e:
                pending = []  # restore closed them
                raise StateError(f"the saved nodes cannot be installed: {e}") from None
            installed += len(pending)
            pending = []
            # Their fds may be closed now: the next batch walks from the root again.
            for path in [p for p in dirs if p]:
                del dirs[path]

        try:
            # Parents before children, so that each node is one openat(2) below its parent's fd.
            for node in sorted(nodes, key=lambda n: n.path.count(b"/")):
                try:
                    fd = self._find(node, dirs)
                except (OSError, StateError) as e:
                    where = node.path.decode(errors="replace") or "by handle"
                    self._failed(f"node {node.nodeid} ({where})", e)
                    lost[node.nodeid] = node.nlookup
                    lost_fhs.update(saved[0] for saved in of_node.get(node.nodeid, ()))
                    continue
                pending.append((node.nodeid, node.nlookup, fd, os.stat(fd)))
                if node.kind == stat.S_IFDIR and node.flags & _NODE_PATH:
                    dirs[node.path] = fd
                if node.flags & _NODE_COPY:
                    copies.append(node.path)
                # Its handles are reopened while the node's fd is surely open.
                for fh, nodeid, is_dir, flags, listing, offsets in of_node.get(node.nodeid, ()):
                    try:
                        hfd = self._inodes.open_fd(
                            lambda fd=fd, flags=flags: os.open(f"self/fd/{fd}", flags | os.O_CLOEXEC,
                                                               dir_fd=self._proc))
                    except OSError as e:
                        self._failed(f"handle {fh} of node {nodeid}", e)
                        lost_fhs.add(fh)
                        continue
                    h = self._handles.make(fh, hfd, nodeid, is_dir)
                    if listing is not None:
                        h.listing = HostDirents(listing, offsets)
                    handles.append(h)
                if len(pending) >= batch:
                    flush()
            flush()
            try:
                self._handles.restore(handles, lost_fhs, next_fh)
            except ValueError as e:
                raise StateError(f"the saved handles cannot be installed: {e}") from None
            # A node with open files keeps its fd (inodes.py: pin), as the source's did.
            for h in handles:
                self._inodes.pin(h.nodeid)
        except BaseException:
            for h in handles:
                os.close(h.fd)
            for _, _, fd, _ in pending:
                os.close(fd)
            self._inodes.clear()
            raise
        # The copies of deleted files are open now: unlink them, as their originals were.
        for name in copies:
            try:
                os.unlink(name, dir_fd=self._root_fd)
            except FileNotFoundError:
                pass
        log.info("session loaded: %d nodes, %d handles, %d locks; %d nodes and %d handles lost",
                 installed, len(handles), len(locks), len(lost), len(lost_fhs))
        if locks:
            self._take_locks(locks)

    def _take_lock(self, lock: tuple) -> bool:
        """Takes one saved lock without waiting: True once held (or no longer needed)."""
        cls, nodeid, owner, fh, pid, kind, start, end = lock
        try:
            with self._handles.use(fh) as h:
                if cls == _LOCK_POSIX:
                    self._locks.setlk(nodeid, owner, fh, h.fd, start, end, kind, pid, False)
                else:
                    fcntl.flock(h.fd, (fcntl.LOCK_EX if kind == fcntl.F_WRLCK else fcntl.LOCK_SH)
                                | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            log.warning("lock on node %d cannot be taken again: %s", nodeid, e.strerror)
            return True

    def _take_locks(self, locks: list[tuple]) -> None:
        pending = [lk for lk in locks if not self._take_lock(lk)]
        if not pending:
            return
        log.info("%d locks are still held by the source: taking them as it lets go", len(pending))

        def retry() -> None:
            left = pending
            deadline = time.monotonic() + LOCK_RETRY_SECONDS
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = [lk for lk in left if not self._take_lock(lk)]
            if left:
                log.warning("%d locks of the migrated session could not be taken again", len(left))

        self._lock_thread = threading.Thread(target=retry, name="vhostfs-relock", daemon=True)
        self._lock_thread.start()
