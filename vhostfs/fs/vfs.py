"""Vfs: one FUSE file system made of several, mounted and unmounted while the client has it mounted.

A `Vfs` is itself a `Filesystem`, so every transport that serves a file system (virtio-fs over
vhost-user, /dev/fuse) serves it unchanged. Its root is a pseudo directory tree (read-only, made of the
directories along the mount paths); each mount point in it is the root of a mounted file system.
The design follows fuse-backend-rs's `Vfs`; docs/filesystem-api.md ("Several file systems: Vfs")
describes it for users.

Node ids. A node id the client sees is `tag << 48 | inner`: `inner` is the node id the mounted file
system handed out (it must stay below 2**48; a larger one is refused with EOVERFLOW) and `tag` (16
bits) names the mount. Tag 0 is the pseudo tree, whose node 1 is the root (`ROOT_ID`). Mapping is two
integer operations, a shift and a mask, and one list index; nothing is allocated per request. Tags are
given out round-robin over 1..65535 and a tag comes back only once every other free one has been
used, so a node id of an unmounted file system names nothing (ESTALE) for at least the next 65,535 -
`max_mounts` mounts, and is never taken for a node of the mount that follows it. Beyond that, every
entry but a mount's root carries the mount's serial number in its generation (xor'd with the file
system's own): a client that meets a node id again with another generation (Linux does, in fuse_iget)
treats its old inode as stale. Mount roots keep generation 0, which Linux assumes for a submount's root
(and checks when it revalidates the mount point). A file system mounted at "/" is alone in the Vfs (no
pseudo tree); client node id 1 is its root.

File handles need no mapping: every request that carries one also carries its node id (both for
COPY_FILE_RANGE), which names the mount.

The mount limit (`VfsOptions.max_mounts`, 256 by default as in fuse-backend-rs, at most `MAX_MOUNTS`)
keeps tags far from wrapping onto each other and bounds what one daemon holds: each mounted
passthrough keeps at least two host fds (its root and /proc) plus one per node the client knows.

Inode numbers. A client that offers FUSE_SUBMOUNTS (the guest kernel's virtio-fs) gets each mount point
flagged FUSE_ATTR_SUBMOUNT and shows it as a submount with its own st_dev, so the file systems' own
st_ino stay as they are; only a mount's root gets `st_ino ^ tag << 48`, unique beside the pseudo
directories. Without submounts (/dev/fuse), every st_ino of mount `tag` is reported as
`st_ino ^ tag << 48` (one attribute copy per reply), unique across mounts as long as the file systems'
own inode numbers stay below 2**48. Plain READDIR records keep the file system's own d_ino.

Unmounting. `umount(path)` refuses with EBUSY while the client holds handles (open files or
directories) on the mount, unless `force`. Then, or once idle, the mount leaves the tree, every later
request on its node ids or handles gets ESTALE (FLUSH, RELEASE, RELEASEDIR and FORGET succeed quietly, so
that the client can close what it held: nothing of the file system is left to flush), the
file system's `destroy()` and, if it has one, `close()` are called, so a passthrough closes every host
fd it held. A working directory inside a mount holds no handle: the server cannot see it, so it does not
make a mount busy.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import (
    ROOT_ID,
    Attr,
    ConnectionInfo,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Lock,
    Open,
    SetAttr,
    Stat,
    StatVfs,
    Statx,
    fs_error,
)

if TYPE_CHECKING:
    from vhostfs.iov import Reader, Writer

#: Bits of a client node id that belong to the mounted file system; the tag is above them.
TAG_SHIFT = 48
INNER_MASK = (1 << TAG_SHIFT) - 1
_TAGS = 1 << (64 - TAG_SHIFT)
#: The most file systems a Vfs can hold at once (`VfsOptions.max_mounts` may be lower).
MAX_MOUNTS = 4096
DEFAULT_MAX_MOUNTS = 256
#: The longest mount path accepted (PATH_MAX).
PATH_MAX = 4096

_DT_DIR = stat.S_IFDIR >> 12
_PSEUDO_MODE = stat.S_IFDIR | 0o555


def _err(code: int, why: str | None = None) -> OSError:
    """`fs_error(code)`, or with `why` as the message (for the callers of mount and umount)."""
    return OSError(code, why) if why else fs_error(code)


@dataclass(frozen=True, slots=True)
class VfsOptions:
    """What the Vfs negotiates at INIT, once for every file system in it (cf. fuse-backend-rs's VfsOptions).

    - `offer`: the INIT flags (flags | flags2 << 32) the Vfs may agree to at all; a flag outside it is
      never agreed, whatever a file system asks for. Default: every flag.
    - `no_open`, `no_opendir`: ask for FUSE_NO_OPEN_SUPPORT / FUSE_NO_OPENDIR_SUPPORT, so that mounts
      with `MountOptions.no_open` / `no_opendir` answer OPEN / OPENDIR with ENOSYS and the client
      stops sending them for those files (their file systems then get fh 0).
    - `killpriv_v2`: ask for FUSE_HANDLE_KILLPRIV_V2 (the file systems clear set-user-ID bits).
    - `writeback`: ask for FUSE_WRITEBACK_CACHE (the client caches writes).
    - `submounts`: ask for FUSE_SUBMOUNTS and flag mount points FUSE_ATTR_SUBMOUNT (see the module doc).
    - `max_mounts`: how many file systems may be mounted at once (1..MAX_MOUNTS).
    - `pseudo_timeout`: seconds the client may cache the pseudo directories' entries and attributes.
    """

    offer: int = (1 << 64) - 1
    no_open: bool = False
    no_opendir: bool = False
    killpriv_v2: bool = False
    writeback: bool = False
    submounts: bool = True
    max_mounts: int = DEFAULT_MAX_MOUNTS
    pseudo_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_mounts <= MAX_MOUNTS:
            raise ValueError(f"max_mounts {self.max_mounts} outside 1..{MAX_MOUNTS}")


@dataclass(frozen=True, slots=True)
class MountOptions:
    """Options of one mount.

    - `no_open` / `no_opendir`: answer OPEN / OPENDIR on this mount with ENOSYS when the client agreed
      to FUSE_NO_OPEN_SUPPORT / FUSE_NO_OPENDIR_SUPPORT (`VfsOptions.no_open` / `no_opendir`), for
      file systems that need no handles; otherwise the file system's own open is called.
    - `submount`: show the mount as a submount with its own st_dev where the client can.
    """

    no_open: bool = False
    no_opendir: bool = False
    submount: bool = True


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One entry of `Vfs.mounts()`: where, what (`source` and `fstype` as given to `mount`), the mount's
    options, and counters: `open_handles` (held now), `opens` (since mounted) and whatever the file
    system's own `stats()` returns, if it has one."""

    path: str
    source: str
    fstype: str
    options: dict[str, Any]
    counters: dict[str, int]


class _Mount:
    """A mounted file system and what the Vfs keeps about it."""

    __slots__ = ("path", "parts", "fs", "tag", "base", "generation", "root_outer", "options", "source",
                 "fstype", "extra", "node", "lock", "open_handles", "opens")

    def __init__(self, path: str, parts: tuple[bytes, ...], fs: Filesystem, tag: int, generation: int,
                 options: MountOptions, source: str, fstype: str, extra: dict[str, Any]) -> None:
        self.path = path
        self.parts = parts
        self.fs = fs
        self.tag = tag
        self.base = tag << TAG_SHIFT
        # Mixed into every entry's generation: the client keeps the low 32 bits (i_generation).
        self.generation = generation
        # The client node id of the file system's root: 1 for the file system at "/".
        self.root_outer = ROOT_ID if not parts else self.base | ROOT_ID
        self.options = options
        self.source = source
        self.fstype = fstype
        self.extra = extra
        self.node: _PseudoNode | None = None
        self.lock = threading.Lock()
        self.open_handles = 0
        self.opens = 0

    def opened(self) -> None:
        with self.lock:
            self.open_handles += 1
            self.opens += 1

    def closed(self) -> None:
        with self.lock:
            if self.open_handles > 0:
                self.open_handles -= 1


def _stale(*args: object, **kwargs: object) -> Any:
    raise _err(errno.ESTALE, "the file system of this node was unmounted")


def _quiet(*args: object, **kwargs: object) -> None:
    return None


class _StaleFs(Filesystem):
    """What node ids of no mounted file system reach: ESTALE, except for the calls that take no answer."""

    forget = _quiet
    flush = _quiet
    release = _quiet
    releasedir = _quiet


_QUIET = ("init", "destroy", "forget", "flush", "release", "releasedir")
for _name in dir(Filesystem):
    if (not _name.startswith("_") and _name not in _QUIET
            and callable(getattr(Filesystem, _name))):
        setattr(_StaleFs, _name, _stale)

_STALE = _StaleFs()


class _PseudoNode:
    """A directory of the pseudo tree; a mount point when `mount` is set (and then has no children)."""

    __slots__ = ("nodeid", "name", "parent", "children", "mount")

    def __init__(self, nodeid: int, name: bytes, parent: _PseudoNode | None) -> None:
        self.nodeid = nodeid
        self.name = name
        self.parent = parent if parent is not None else self
        self.children: dict[bytes, _PseudoNode] = {}
        self.mount: _Mount | None = None


class _PseudoFs(Filesystem):
    """The read-only directories along the mount paths (tag 0 of the Vfs)."""

    def __init__(self, vfs: Vfs) -> None:
        self._vfs = vfs
        self._next = ROOT_ID + 1
        self.root = _PseudoNode(ROOT_ID, b"", None)
        self.nodes: dict[int, _PseudoNode] = {ROOT_ID: self.root}
        self._time = time.time_ns()

    def add(self, parent: _PseudoNode, name: bytes) -> _PseudoNode:
        node = _PseudoNode(self._next, name, parent)
        self._next += 1
        parent.children[name] = node
        self.nodes[node.nodeid] = node
        return node

    def remove(self, node: _PseudoNode) -> None:
        """Takes mount point `node` out, and the directories it leaves empty (never the root)."""
        while node is not self.root and not node.children:
            del node.parent.children[node.name]
            del self.nodes[node.nodeid]
            node = node.parent

    def _node(self, nodeid: int) -> _PseudoNode:
        node = self.nodes.get(nodeid)
        if node is None:
            raise _err(errno.ESTALE, "this pseudo directory was removed")
        return node

    def attr(self, node: _PseudoNode) -> Stat:
        t = self._time
        return Stat(st_ino=node.nodeid, st_mode=_PSEUDO_MODE, st_nlink=2 + len(node.children),
                    st_atime_ns=t, st_mtime_ns=t, st_ctime_ns=t)

    def entry(self, ctx: Context, node: _PseudoNode) -> Entry:
        if node.mount is not None:
            return self._vfs._root_entry(ctx, node.mount)
        timeout = self._vfs.options.pseudo_timeout
        return Entry(node.nodeid, self.attr(node), entry_timeout=timeout, attr_timeout=timeout)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        node = self._node(parent)
        if name == b".":
            return self.entry(ctx, node)
        if name == b"..":
            return self.entry(ctx, node.parent)
        child = node.children.get(name)
        if child is None:
            raise _err(errno.ENOENT)
        return self.entry(ctx, child)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        return self.attr(self._node(nodeid)), self._vfs.options.pseudo_timeout

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> tuple[Statx, float]:
        return Statx.from_attr(self.attr(self._node(nodeid))), self._vfs.options.pseudo_timeout

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        self._node(nodeid)
        return Open(fh=0)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterable[DirEntry]:
        node = self._node(nodeid)
        with self._vfs._lock:
            children = list(node.children.values())
        names = [(b".", node), (b"..", node.parent)] + [(c.name, c) for c in children]
        return self._list(ctx, names, offset, plus)

    def _list(self, ctx: Context, names: list[tuple[bytes, _PseudoNode]], offset: int,
              plus: bool) -> Iterator[DirEntry]:
        for cookie, (name, node) in enumerate(names, 1):
            if cookie <= offset:
                continue
            entry = None
            if plus and name not in (b".", b".."):
                try:
                    entry = self.entry(ctx, node)
                except OSError:
                    continue  # unmounted meanwhile
            yield DirEntry(name, node.nodeid, _DT_DIR, cookie, entry)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self._node(nodeid)
        if mask & os.W_OK:
            raise _err(errno.EROFS)

    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        return StatVfs(f_files=len(self.nodes))

    def _readonly(self, *args: object, **kwargs: object) -> Any:
        raise _err(errno.EROFS, "the Vfs's pseudo directories are read-only")

    mknod = mkdir = symlink = unlink = rmdir = rename = link = create = tmpfile = setattr = _readonly
    setxattr = removexattr = _readonly


def split_path(path: str) -> tuple[bytes, ...]:
    """The components of mount path `path` ("/" is ()); EINVAL unless absolute and made of ordinary
    names (no "." or "..", no NUL, each at most 255 bytes). Empty components (a doubled or trailing
    "/") are ignored."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise _err(errno.EINVAL, f"mount path {path!r} is not absolute")
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX or b"\0" in raw:
        raise _err(errno.EINVAL, "mount path too long or with a NUL")
    parts = tuple(p for p in raw.split(b"/") if p)
    for p in parts:
        if p in (b".", b".."):
            raise _err(errno.EINVAL, f"mount path {path!r} has a {p.decode()!r} component")
        if len(p) > abi.NAME_MAX:
            raise _err(errno.ENAMETOOLONG, f"a component of {path!r} is longer than {abi.NAME_MAX} bytes")
    return parts


def _canonical(parts: tuple[bytes, ...]) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in parts)


def _with_ino(a: Attr, xor: int) -> Stat:
    """`a` with st_ino ^ `xor` (a copy: os.stat_result is immutable)."""
    return Stat(a.st_ino ^ xor, a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_size, a.st_blocks,
                a.st_blksize, a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns)


class Vfs(Filesystem):
    """Several file systems under one tree: a pseudo root whose mount points are their roots.

    `mount`, `umount` and `mounts` may be called at any time from any thread, also while a session
    runs. See the module doc for node ids, inode numbers and unmounting, and docs/filesystem-api.md.
    """

    def __init__(self, options: VfsOptions | None = None) -> None:
        self.options = options or VfsOptions()
        self._lock = threading.Lock()
        self._pseudo = _PseudoFs(self)
        # Indexed by tag: the file system requests go to, and the st_ino xor of its replies.
        self._fs: list[Filesystem] = [_STALE] * _TAGS
        self._fs[0] = self._pseudo
        self._xor: list[int] = [0] * _TAGS
        self._mounts: list[_Mount | None] = [None] * _TAGS
        self._by_path: dict[tuple[bytes, ...], _Mount] = {}
        self._next_tag = 1
        self._mounted = 0
        self._root: _Mount | None = None
        #: The INIT agreement of the running session (None before INIT and after DESTROY).
        self.agreed: ConnectionInfo | None = None
        self._submounts = False
        self._no_open = False
        self._no_opendir = False

    # -- mounting -----------------------------------------------------------------------------------
    def mount(self, fs: Filesystem, path: str, *, options: MountOptions | None = None, source: str = "",
              fstype: str | None = None, extra: dict[str, Any] | None = None) -> MountInfo:
        """Mounts `fs` at `path` and returns its entry of `mounts()`.

        The directories along `path` appear in the pseudo tree as needed. When a session runs, `fs.init`
        is called at once with a copy of the session's agreement (what it adds to `want` is not
        agreed any more: see docs). `source`, `fstype` and `extra` (options to list) are descriptive.
        Raises OSError: EINVAL for a bad path (not absolute, "." or ".." in it), EEXIST when something
        is mounted there already, ENOTDIR when the path leads into a mounted file system (which the Vfs
        does not mount over), EBUSY for "/" while other mounts exist (or a pseudo directory with mounts
        below it), ENOSPC beyond `max_mounts`; or what `fs.init` raises.
        """
        parts = split_path(path)
        options = options or MountOptions()
        with self._lock:
            if parts in self._by_path:
                raise _err(errno.EEXIST, f"{_canonical(parts)} is mounted already")
            if self._root is not None:
                raise _err(errno.ENOTDIR, f"{_canonical(parts)} is inside the file system mounted at /")
            node = self._pseudo.root
            for name in parts:
                child = node.children.get(name)
                if child is None:
                    break
                if child.mount is not None:
                    raise _err(errno.ENOTDIR,
                               f"{_canonical(parts)} is inside the file system mounted at {child.mount.path}")
                node = child
            else:
                if parts or node.children:
                    raise _err(errno.EBUSY, f"{_canonical(parts)} has mounts below it")
            if len(self._by_path) >= self.options.max_mounts:
                raise _err(errno.ENOSPC, f"the mount limit ({self.options.max_mounts}) is reached")
            tag = self._take_tag()
            self._mounted += 1
            m = _Mount(_canonical(parts), parts, fs, tag, self._mounted & 0xFFFFFFFF, options, source,
                       fstype or type(fs).__name__, dict(extra or {}))
            agreed = self.agreed
            if agreed is not None:
                conn = replace(agreed, extra=dict(agreed.extra))
                fs.init(conn)
            self._attach(m)
        return self._info(m)

    def _take_tag(self) -> int:
        tag = self._next_tag
        while self._mounts[tag] is not None:
            tag = tag % (_TAGS - 1) + 1
        self._next_tag = tag % (_TAGS - 1) + 1
        return tag

    def _attach(self, m: _Mount) -> None:
        """Puts `m` in the tree and the tables (lock held)."""
        node = self._pseudo.root
        for name in m.parts:
            child = node.children.get(name)
            node = child if child is not None else self._pseudo.add(node, name)
        if m.parts:
            node.mount = m
            m.node = node
        else:
            self._root = m
        self._mounts[m.tag] = m
        self._by_path[m.parts] = m
        self._xor[m.tag] = self._xor_of(m)
        self._fs[m.tag] = m.fs
        if not m.parts:
            self._fs[0] = m.fs
            self._mounts[0] = m

    def _xor_of(self, m: _Mount) -> int:
        if not m.parts or (self._submounts and m.options.submount):
            return 0
        return m.base

    def umount(self, path: str, *, force: bool = False) -> None:
        """Unmounts the file system at `path` (see the module doc): ENOENT if nothing is mounted there,
        EINVAL for a bad path, EBUSY while the client holds handles on it unless `force`."""
        parts = split_path(path)
        with self._lock:
            m = self._by_path.get(parts)
            if m is None:
                raise _err(errno.ENOENT, f"nothing is mounted at {_canonical(parts)}")
            if m.open_handles and not force:
                raise _err(errno.EBUSY, f"{m.path} has {m.open_handles} open handles")
            self._fs[m.tag] = _STALE
            self._xor[m.tag] = 0
            self._mounts[m.tag] = None
            del self._by_path[parts]
            if m is self._root:
                self._root = None
                self._fs[0] = self._pseudo
                self._mounts[0] = None
            elif m.node is not None:
                m.node.mount = None
                self._pseudo.remove(m.node)
        try:
            m.fs.destroy()
        finally:
            close = getattr(m.fs, "close", None)
            if callable(close):
                close()

    def mounts(self) -> list[MountInfo]:
        """The mounted file systems, by path."""
        with self._lock:
            ms = sorted(self._by_path.values(), key=lambda m: m.path)
        return [self._info(m) for m in ms]

    def _info(self, m: _Mount) -> MountInfo:
        counters = {"open_handles": m.open_handles, "opens": m.opens}
        stats = getattr(m.fs, "stats", None)
        if callable(stats):
            counters.update(stats())
        options = {"no_open": m.options.no_open, "no_opendir": m.options.no_opendir,
                   "submount": m.options.submount, **m.extra}
        return MountInfo(m.path, m.source, m.fstype, options, counters)

    def close(self) -> None:
        """Unmounts everything (forced)."""
        for info in self.mounts():
            try:
                self.umount(info.path, force=True)
            except OSError:
                pass  # unmounted meanwhile

    # -- mapping ------------------------------------------------------------------------------------
    def _out(self, tag: int, fs: Filesystem, e: Entry) -> Entry:
        """Turns the Entry that `fs`, mounted as `tag`, returned into the client's (in place). The
        pseudo tree's entries are the client's already."""
        nid = e.nodeid
        if nid and fs is not self._pseudo:
            m = self._mounts[tag]
            if m is None or m.fs is not fs:
                fs.forget(nid, 1)
                raise _err(errno.ESTALE, "unmounted meanwhile")
            if nid > INNER_MASK:
                m.fs.forget(nid, 1)
                raise _err(errno.EOVERFLOW, "node id beyond the Vfs's 48 bits")
            if nid == ROOT_ID:
                e.nodeid = m.root_outer
                if m.parts:
                    e.attr = _with_ino(e.attr, self._xor[m.tag] or m.base)
            else:
                e.nodeid = nid | m.base
                e.generation ^= m.generation
                xor = self._xor[m.tag]
                if xor:
                    e.attr = _with_ino(e.attr, xor)
        return e

    def _root_entry(self, ctx: Context, m: _Mount) -> Entry:
        """The Entry of mount point `m` (its file system's root), as the pseudo tree hands it out."""
        attr, timeout = m.fs.getattr(ctx, ROOT_ID, None)
        flags = abi.FUSE_ATTR_SUBMOUNT if self._submounts and m.options.submount else 0
        return Entry(m.root_outer, _with_ino(attr, self._xor[m.tag] or m.base), entry_timeout=timeout,
                     attr_timeout=timeout, attr_flags=flags)

    def _attr(self, tag: int, inner: int, attr: Attr) -> Attr:
        xor = self._xor[tag]
        if xor:
            return _with_ino(attr, xor)
        if inner == ROOT_ID and tag and self._mounts[tag] is not None:
            return _with_ino(attr, tag << TAG_SHIFT)
        return attr

    def _same_fs(self, a: int, b: int) -> Filesystem:
        fs = self._fs[a >> TAG_SHIFT]
        if fs is not self._fs[b >> TAG_SHIFT]:
            raise _err(errno.EXDEV)
        return fs

    # -- session ------------------------------------------------------------------------------------
    def init(self, conn: ConnectionInfo) -> None:
        """Negotiates once for all: the Vfs options, then what each mounted file system asks for
        (called on copies), limited to `options.offer`. The agreement is kept in `agreed`."""
        o = self.options
        want = conn.want
        if o.no_open:
            want |= abi.FUSE_NO_OPEN_SUPPORT
        if o.no_opendir:
            want |= abi.FUSE_NO_OPENDIR_SUPPORT
        if o.killpriv_v2:
            want |= abi.FUSE_HANDLE_KILLPRIV_V2
        if o.writeback:
            want |= abi.FUSE_WRITEBACK_CACHE
        if o.submounts:
            want |= abi.FUSE_SUBMOUNTS
        # No FUSE passthrough: the kernel would read and write passed-through files without asking,
        # and a forced unmount could no longer revoke the open files of the file system it removes.
        conn.want = want & o.offer & ~abi.FUSE_PASSTHROUGH
        with self._lock:
            mounts = list(self._by_path.values())
            wanted = 0
            for m in mounts:
                copy = replace(conn, extra=dict(conn.extra))
                m.fs.init(copy)
                wanted |= copy.want
            conn.want = (conn.want | wanted) & o.offer & ~abi.FUSE_PASSTHROUGH
            agreed = conn.want & conn.capable
            self._submounts = bool(agreed & abi.FUSE_SUBMOUNTS)
            self._no_open = bool(agreed & abi.FUSE_NO_OPEN_SUPPORT)
            self._no_opendir = bool(agreed & abi.FUSE_NO_OPENDIR_SUPPORT)
            for m in mounts:
                self._xor[m.tag] = self._xor_of(m)
            self.agreed = replace(conn, want=agreed, extra=dict(conn.extra))

    def destroy(self) -> None:
        """The session ended: every mounted file system's `destroy`; the mounts stay, and the handles the
        client held are gone with the session."""
        with self._lock:
            self.agreed = None
            mounts = list(self._by_path.values())
        for m in mounts:
            with m.lock:
                m.open_handles = 0
            m.fs.destroy()

    # -- names --------------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        tag = parent >> TAG_SHIFT
        inner = parent & INNER_MASK
        if inner == ROOT_ID and tag and name == b"..":
            m = self._mounts[tag]
            if m is not None and m.node is not None:
                return self._pseudo.entry(ctx, m.node.parent)
        fs = self._fs[tag]
        e = fs.lookup(ctx, inner, name)
        # _out's common case inline (the hottest request): a known node of a mount without remapping.
        nid = e.nodeid
        m = self._mounts[tag]
        if m is not None and m.fs is fs and 1 < nid <= INNER_MASK and not self._xor[tag]:
            e.nodeid = nid | m.base
            e.generation ^= m.generation
            return e
        return self._out(tag, fs, e)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self._fs[nodeid >> TAG_SHIFT].forget(nodeid & INNER_MASK, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        tag = nodeid >> TAG_SHIFT
        inner = nodeid & INNER_MASK
        answer = self._fs[tag].getattr(ctx, inner, fh)
        if tag and (inner == ROOT_ID or self._xor[tag]):
            return self._attr(tag, inner, answer[0]), answer[1]
        return answer

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> tuple[Statx, float]:
        tag = nodeid >> TAG_SHIFT
        inner = nodeid & INNER_MASK
        sx, timeout = self._fs[tag].statx(ctx, inner, fh, flags, mask)
        if tag:
            xor = self._xor[tag] or (tag << TAG_SHIFT if inner == ROOT_ID else 0)
            sx.ino ^= xor
        return sx, timeout

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr) -> tuple[Attr, float]:
        tag = nodeid >> TAG_SHIFT
        inner = nodeid & INNER_MASK
        attr, timeout = self._fs[tag].setattr(ctx, inner, changes)
        return (self._attr(tag, inner, attr) if tag else attr), timeout

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        return self._fs[nodeid >> TAG_SHIFT].readlink(ctx, nodeid & INNER_MASK)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        tag = parent >> TAG_SHIFT
        fs = self._fs[tag]
        return self._out(tag, fs, fs.symlink(ctx, parent & INNER_MASK, name, target))

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        tag = parent >> TAG_SHIFT
        fs = self._fs[tag]
        return self._out(tag, fs, fs.mknod(ctx, parent & INNER_MASK, name, mode, rdev, umask))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        tag = parent >> TAG_SHIFT
        fs = self._fs[tag]
        return self._out(tag, fs, fs.mkdir(ctx, parent & INNER_MASK, name, mode, umask))

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._fs[parent >> TAG_SHIFT].unlink(ctx, parent & INNER_MASK, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._fs[parent >> TAG_SHIFT].rmdir(ctx, parent & INNER_MASK, name)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self._same_fs(parent, newparent).rename(ctx, parent & INNER_MASK, name, newparent & INNER_MASK,
                                                newname, flags)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        fs = self._same_fs(nodeid, newparent)
        return self._out(newparent >> TAG_SHIFT, fs, fs.link(ctx, nodeid & INNER_MASK, newparent & INNER_MASK,
                                                             newname))

    # -- files --------------------------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        tag = nodeid >> TAG_SHIFT
        m = self._mounts[tag]
        if m is None:
            return self._fs[tag].open(ctx, nodeid & INNER_MASK, flags)
        if self._no_open and m.options.no_open:
            raise _err(errno.ENOSYS)
        handle = m.fs.open(ctx, nodeid & INNER_MASK, flags)
        m.opened()
        return handle

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        tag = parent >> TAG_SHIFT
        fs = self._fs[tag]
        entry, handle = fs.create(ctx, parent & INNER_MASK, name, mode, flags, umask)
        return self._opened_entry(tag, fs, ctx, entry, handle, flags)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, Open]:
        tag = parent >> TAG_SHIFT
        fs = self._fs[tag]
        entry, handle = fs.tmpfile(ctx, parent & INNER_MASK, mode, flags, umask)
        return self._opened_entry(tag, fs, ctx, entry, handle, flags)

    def _opened_entry(self, tag: int, fs: Filesystem, ctx: Context, entry: Entry, handle: Open,
                      flags: int) -> tuple[Entry, Open]:
        inner = entry.nodeid
        try:
            self._out(tag, fs, entry)
        except OSError:
            fs.release(ctx, inner, handle.fh, flags)
            raise
        m = self._mounts[tag]
        if m is not None:
            m.opened()
        return entry, handle

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self._fs[nodeid >> TAG_SHIFT].read(ctx, nodeid & INNER_MASK, fh, offset, size)

    def read_into(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, dest: Writer) -> int:
        return self._fs[nodeid >> TAG_SHIFT].read_into(ctx, nodeid & INNER_MASK, fh, offset, size, dest)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        return self._fs[nodeid >> TAG_SHIFT].write(ctx, nodeid & INNER_MASK, fh, offset, data, flags)

    def write_from(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, src: Reader,
                   flags: int) -> int:
        return self._fs[nodeid >> TAG_SHIFT].write_from(ctx, nodeid & INNER_MASK, fh, offset, size, src,
                                                        flags)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self._fs[nodeid >> TAG_SHIFT].flush(ctx, nodeid & INNER_MASK, fh, lock_owner)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        tag = nodeid >> TAG_SHIFT
        self._closed(tag)
        self._fs[tag].release(ctx, nodeid & INNER_MASK, fh, flags)

    def _closed(self, tag: int) -> None:
        m = self._mounts[tag]
        if m is not None:
            m.closed()

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self._fs[nodeid >> TAG_SHIFT].fsync(ctx, nodeid & INNER_MASK, fh, datasync)

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        return self._fs[nodeid >> TAG_SHIFT].getlk(ctx, nodeid & INNER_MASK, fh, owner, lock)

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock, wait: bool) -> None:
        self._fs[nodeid >> TAG_SHIFT].setlk(ctx, nodeid & INNER_MASK, fh, owner, lock, wait)

    def flock(self, ctx: Context, nodeid: int, fh: int, owner: int, kind: int, wait: bool) -> None:
        self._fs[nodeid >> TAG_SHIFT].flock(ctx, nodeid & INNER_MASK, fh, owner, kind, wait)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        self._fs[nodeid >> TAG_SHIFT].fallocate(ctx, nodeid & INNER_MASK, fh, offset, length, mode)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return self._fs[nodeid >> TAG_SHIFT].lseek(ctx, nodeid & INNER_MASK, fh, offset, whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        return self._same_fs(nodeid_in, nodeid_out).copy_file_range(
            ctx, nodeid_in & INNER_MASK, fh_in, off_in, nodeid_out & INNER_MASK, fh_out, off_out, length,
            flags)

    def bmap(self, ctx: Context, nodeid: int, block: int, blocksize: int) -> int:
        return self._fs[nodeid >> TAG_SHIFT].bmap(ctx, nodeid & INNER_MASK, block, blocksize)

    def ioctl(self, ctx: Context, nodeid: int, fh: int, flags: int, cmd: int, arg: int, in_data: bytes,
              out_size: int) -> tuple[int, bytes]:
        return self._fs[nodeid >> TAG_SHIFT].ioctl(ctx, nodeid & INNER_MASK, fh, flags, cmd, arg, in_data,
                                                   out_size)

    def poll(self, ctx: Context, nodeid: int, fh: int, kh: int, flags: int, events: int) -> int:
        return self._fs[nodeid >> TAG_SHIFT].poll(ctx, nodeid & INNER_MASK, fh, kh, flags, events)

    # -- directories --------------------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        tag = nodeid >> TAG_SHIFT
        m = self._mounts[tag]
        if m is None:
            return self._fs[tag].opendir(ctx, nodeid & INNER_MASK, flags)
        if self._no_opendir and m.options.no_opendir:
            raise _err(errno.ENOSYS)
        handle = m.fs.opendir(ctx, nodeid & INNER_MASK, flags)
        m.opened()
        return handle

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterable[DirEntry]:
        tag = nodeid >> TAG_SHIFT
        fs = self._fs[tag]
        listing = fs.readdir(ctx, nodeid & INNER_MASK, fh, offset, plus)
        if not plus or fs is self._pseudo:
            return listing
        return self._plus(tag, fs, listing)

    def _plus(self, tag: int, fs: Filesystem, listing: Iterable[DirEntry]) -> Iterator[DirEntry]:
        for d in listing:
            e = d.entry
            if e is not None and e.nodeid:
                try:
                    self._out(tag, fs, e)
                except OSError:
                    d.entry = None
            yield d

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        tag = nodeid >> TAG_SHIFT
        self._closed(tag)
        self._fs[tag].releasedir(ctx, nodeid & INNER_MASK, fh)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self._fs[nodeid >> TAG_SHIFT].fsyncdir(ctx, nodeid & INNER_MASK, fh, datasync)

    # -- file system --------------------------------------------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        return self._fs[nodeid >> TAG_SHIFT].statfs(ctx, nodeid & INNER_MASK)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self._fs[nodeid >> TAG_SHIFT].access(ctx, nodeid & INNER_MASK, mask)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self._fs[nodeid >> TAG_SHIFT].syncfs(ctx, nodeid & INNER_MASK)

    # -- extended attributes ------------------------------------------------------------------------
    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, *,
                 kill_sgid: bool = False) -> None:
        fs = self._fs[nodeid >> TAG_SHIFT]
        if kill_sgid:
            fs.setxattr(ctx, nodeid & INNER_MASK, name, value, flags, kill_sgid=True)
        else:
            fs.setxattr(ctx, nodeid & INNER_MASK, name, value, flags)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        return self._fs[nodeid >> TAG_SHIFT].getxattr(ctx, nodeid & INNER_MASK, name)

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        return self._fs[nodeid >> TAG_SHIFT].listxattr(ctx, nodeid & INNER_MASK)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self._fs[nodeid >> TAG_SHIFT].removexattr(ctx, nodeid & INNER_MASK, name)


__all__ = ["DEFAULT_MAX_MOUNTS", "INNER_MASK", "MAX_MOUNTS", "TAG_SHIFT", "MountInfo", "MountOptions", "Vfs",
           "VfsOptions", "split_path"]
