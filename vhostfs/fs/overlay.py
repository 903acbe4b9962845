"""OverlayFs: read-only lower layers under one writable upper layer, in the kernel's on-disk format.

The merged tree follows Linux's overlayfs (Documentation/filesystems/overlayfs.rst) with
redirect_dir, index, metacopy and nfs_export off, so that an upper directory written through vhostfs
can be mounted by the kernel's overlayfs (and the other way round) and shows the same tree:

- A name is looked up top down: the upper layer, then the lower layers, topmost first. A non-directory
  hides everything below it; directories of the same name merge; a *whiteout* (a character device
  0/0) hides the name in the layers below it; an *opaque* directory (extended attribute
  trusted.overlay.opaque = "y", or user.overlay.opaque in `userxattr` mode) hides the directories below
  it. Markers are honoured in every layer, lower ones included.
- readdir merges the layers the same way; whiteouts are never listed.
- Lower layers are never written. The first change to a lower node copies it up: a write open, an
  O_TRUNC open, setattr (truncate, chmod, chown, utimes), an extended attribute change, link, rename,
  and creating or removing a name in a lower directory (which copies the directory up). Its parents
  are copied up first. A copy keeps mode, owner, times and extended attributes (but the overlay's own),
  and the times of the upper directory it lands in stay as they were. A regular file is filled as an
  unnamed O_TMPFILE file in its upper directory and linked into place only once complete, so a partly
  copied file is never visible, not even after a crash. A directory, symlink or special file has no
  data to copy: it is made under its final name and its owner, mode, attributes and times are set
  right after, inside the overlay's namespace lock (so no request sees it half done).
- Removing a name that a lower layer has leaves a whiteout in the upper (the upper node goes first,
  then the whiteout comes, inside the namespace lock: a host failure between the two, such as a full
  disk, shows the lower name again; a create, link or rename that fails puts back a whiteout it
  removed); a directory made where a whiteout was is made opaque; a non-directory is renamed with
  RENAME_WHITEOUT when its old name must stay hidden. Renaming a directory that a lower layer has
  (a merged or lower-only directory) fails with EXDEV, as without redirect_dir: `mv` then copies.
  RENAME_EXCHANGE swaps two upper nodes (after copying them up); RENAME_WHITEOUT from the guest is
  refused with EINVAL, as by the kernel's overlayfs.
- Inode numbers: a node keeps the st_ino of the real inode the overlay first met it as, through
  copy-up, for as long as the overlay runs, where the kernel keeps it: not for a lower regular file
  with more than one link, whose copy-up breaks the hard link (index=off) and which then shows the
  upper file's number. When the layers are on different host file systems, the number of a layer's
  inode is combined with the layer's position in its top bits (like the kernel's xino), so numbers
  from different layers never collide. Merged directories report st_nlink 1, as in the kernel.
- Hard links: lower files hard-linked to each other are separate files once one name is copied up
  (the kernel with index=off does the same); a link made through the overlay is a hard link in the
  upper, so both names stay one file.

What the upper holds is what the kernel's overlayfs would put there, less three markers it adds for
itself: trusted.overlay.origin (a file handle of the lower file, which lets the kernel keep st_ino of
copied-up files across mounts), trusted.overlay.impure and trusted.overlay.uuid. vhostfs writes none
of them. The kernel mounts such an upper as it is and treats the copied-up files as plain upper files
(their st_ino is then the upper inode's). The kernel also hard-links all its whiteouts to one inode in
its workdir; vhostfs makes one whiteout per name.

Guest input that could forge a marker never changes what the overlay hides:

- mknod of a character device 0/0 (a whiteout) fails with EPERM, as on the kernel's overlayfs;
- the overlay's own extended attributes (trusted.overlay.*, or user.overlay.* in userxattr mode) are
  *escaped*, as Linux 6.7 and later do: a guest's trusted.overlay.opaque is stored in the layer as
  trusted.overlay.overlay.opaque, and shown to the guest under its own name again; the real markers
  are never shown, set or removed through the overlay.

A lower layer that changes underneath the overlay gives undefined but safe results, as the kernel
documents: requests fail with the layer's error (ENOENT, ESTALE, ...) or see the new state; layers
are Filesystems that never reach outside their own directory, and lower ones are never written.

Layers. Each layer is a `Filesystem` (the passthrough of a host directory, for instance) whose root
is ROOT_ID; `OverlayFs.from_dirs` builds them from directories. The overlay uses, with uid 0
credentials except where it creates a node for the guest:

- on every layer: lookup, forget, getattr, readlink, opendir/readdir/releasedir, open/read_into/
  release, getxattr and listxattr (with the host's real attribute names: no xattr mapping);
- on the upper also: mknod (whiteouts), mkdir, symlink, create, tmpfile and link (copy-up),
  setattr, setxattr, removexattr, unlink, rmdir, rename (with RENAME_WHITEOUT), write_from, flush,
  fsync, fallocate, lseek, statfs and syncfs.

`getattr` may return an `os.stat_result`, whose st_dev tells which layers share a host file system.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vhostfs.fuse.abi import FUSE_DO_READDIRPLUS, FUSE_READDIRPLUS_AUTO
from vhostfs.fuse.filesystem import (
    ROOT_ID,
    SETUPMAPPING_NO_FH,
    Attr,
    ConnectionInfo,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Open,
    SetAttr,
    Stat,
    StatVfs,
    check_access,
    check_name,
    fs_error,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vhostfs.iov import Reader, Writer

#: Passthrough options an overlay refuses: its upper layer is written (readonly), and the others are
#: FUSE features it does not negotiate with the client.
NOT_WITH_OVERLAY = ("readonly", "writeback", "allow_mmap", "announce_submounts", "killpriv_v2",
                    "posix_acl", "security_label")
#: The credentials of the overlay's own work on its layers (copy-up, markers).
_ROOT = Context(uid=0, gid=0, pid=0)
_DOTS = (b".", b"..")
_DT_CHR = stat.S_IFCHR >> 12
_DT_DIR = stat.S_IFDIR >> 12
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_RENAME_WHITEOUT = 4
_COPY_CHUNK = 1 << 20
#: How many missing names a directory node remembers (see _Node.misses).
_MAX_MISSES = 4096
#: Layer inode numbers below this get the layer's file system index in the bits above (see _Ino).
_XINO_SHIFT = 56


def is_whiteout(attr: Attr) -> bool:
    """Whether `attr` is that of an overlayfs whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(attr.st_mode) and attr.st_rdev == 0


class _Node:
    """A node of the merged tree: the real nodes behind it, one layer lookup held on each.

    `upper` is the upper layer's nodeid (None until copied up); `lowers` holds (layer index, nodeid)
    pairs: for a directory its lower directories, topmost first, for a non-directory the one lower
    file it shows while not copied up. `refs` counts the client's lookups, `children` the child nodes
    that keep this one (their parent) alive.

    `misses` remembers, for a directory, the names its lower directories were found not to have:
    lower layers are read-only, so a name missing there stays missing (the kernel's overlayfs keeps
    negative dentries in them just the same, and a lower layer changed underneath gives undefined
    results). It lets a lookup through many lower layers skip the layers that lack the name.
    """

    __slots__ = ("nodeid", "parent", "name", "kind", "ino", "upper", "lowers", "opaque", "refs", "children",
                 "lower_nlink", "misses")

    def __init__(self, nodeid: int, parent: _Node | None, name: bytes, kind: int, ino: int,
                 upper: int | None, lowers: list[tuple[int, int]], opaque: bool, lower_nlink: int) -> None:
        self.nodeid = nodeid
        self.parent = parent
        self.name = name
        self.kind = kind
        self.ino = ino
        self.upper = upper
        self.lowers = lowers
        self.opaque = opaque
        self.refs = 0
        self.children = 0
        self.lower_nlink = lower_nlink
        # (layer, name) pairs that a lower directory of this one does not have (see _find).
        self.misses: set[tuple[int, bytes]] = set()

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        """A directory made of more than one real directory (the kernel's OVL_TYPE_MERGE)."""
        return self.is_dir and len(self.lowers) > (1 if self.upper is None else 0)

    def top(self) -> tuple[int, int]:
        """(layer index, nodeid) of the real node that stands for this one."""
        return (0, self.upper) if self.upper is not None else self.lowers[0]


@dataclass(slots=True)
class _Handle:
    """An open overlay file or directory: the real handle (layer, fh) for files, the merged listing
    for directories."""

    node: _Node
    layer: int
    lnode: int
    fh: int
    flags: int
    listing: list[tuple[bytes, int, int]] | None = None
    lock: threading.Lock | None = None


@dataclass(slots=True)
class _Found:
    """What a lookup found under one name: the upper Entry (if any) and the lower ones, topmost first."""

    upper: Entry | None
    lowers: list[tuple[int, Entry]]
    opaque: bool

    @property
    def top(self) -> tuple[int, Entry]:
        return (0, self.upper) if self.upper is not None else self.lowers[0]


class OverlayFs(Filesystem):
    """The overlay of `lowers` (topmost first, as the kernel's lowerdir) under the writable `upper`.

    Every layer is a Filesystem (see the module doc for what the overlay asks of it); the overlay
    owns them and closes them in `close`. `userxattr` keeps the overlay's markers in user.overlay.*
    instead of trusted.overlay.* (the kernel's userxattr mount option). `xattr` serves extended
    attributes to the guest (ENOSYS otherwise); the layers' attributes are used for the markers
    either way. `readdirplus` False lets the guest list directories with plain READDIR only.
    The layers' own `init` is not called: the overlay asks the client for what it serves itself.
    Thread-safe.
    """

    def __init__(self, upper: Filesystem, lowers: Sequence[Filesystem], *, userxattr: bool = False,
                 xattr: bool = True, readdirplus: bool = True) -> None:
        if not lowers:
            raise ValueError("an overlay needs at least one lower layer")
        self._layers: list[Filesystem] = [upper, *lowers]
        self._xattr = xattr
        self._readdirplus = readdirplus
        self._prefix = b"user.overlay." if userxattr else b"trusted.overlay."
        self._opaque_name = self._prefix + b"opaque"
        self._escape = self._prefix + b"overlay."
        self._lock = threading.RLock()
        self._ids = itertools.count(ROOT_ID + 1)
        self._handle_ids = itertools.count(1)
        self._handles: dict[int, _Handle] = {}
        self._handles_lock = threading.Lock()
        # st_dev of each layer's root: layers on one host file system share inode numbers' meaning.
        devs = [getattr(layer.getattr(_ROOT, ROOT_ID, None)[0], "st_dev", None) for layer in self._layers]
        fsids: dict[object, int] = {}
        self._fsid = [fsids.setdefault(dev, len(fsids)) for dev in devs]
        self._samefs = len(fsids) == 1 and None not in fsids
        # The st_ino a copied-up node had, by its upper inode (st_dev, st_ino), so that it stays.
        self._origin_ino: dict[tuple[int, int], int] = {}
        self._nodes: dict[int, _Node] = {}
        self._by_upper: dict[int, _Node] = {}
        self._by_name: dict[tuple[int, bytes], _Node] = {}
        self._root = self._new_root()
        self._check_tmpfile()

    @classmethod
    def from_dirs(cls, upper_dir: str, lower_dirs: Sequence[str], *, userxattr: bool = False,
                  **passthrough: Any) -> OverlayFs:
        """The overlay of host directories: `upper_dir` served by a Passthrough with the keyword
        options `passthrough`, and each of `lower_dirs` (topmost first) by a read-only one.

        `xattr` (default True) serves extended attributes to the guest; every layer keeps them on
        for the markers. The passthrough's `readdirplus` and `cache` decide the overlay's
        `readdirplus`, as they would the passthrough's. Raises ValueError for a lower directory that
        is not one, and for the options an overlay cannot honour (NOT_WITH_OVERLAY, and an xattrmap,
        since the markers must keep the kernel's names).
        """
        from vhostfs.fs.passthrough import Passthrough

        if passthrough.get("xattrmap") is not None:
            raise ValueError("an overlay cannot map extended attribute names (xattrmap): its markers "
                             "must keep the names the kernel's overlayfs reads")
        for name in NOT_WITH_OVERLAY:
            # posix_acl and security_label are modes: "never" is off, like False.
            if passthrough.get(name) not in (None, False, "never"):
                raise ValueError(f"an overlay does not serve {name}")
        for lower in lower_dirs:
            if not os.path.isdir(lower):
                raise ValueError(f"overlay lower layer {lower!r} is not a directory")
        options = {k: v for k, v in passthrough.items()
                   if k not in ("xattr", "readonly", "xattrmap", *NOT_WITH_OVERLAY)}
        readdirplus = options.get("readdirplus")
        if readdirplus is None:
            readdirplus = options.get("cache", "auto") != "never"
        layers: list[Passthrough] = []
        try:
            layers.append(Passthrough(upper_dir, xattr=True, readonly=False, **options))
            for lower in lower_dirs:
                layers.append(Passthrough(lower, xattr=True, readonly=True, **options))
            return cls(layers[0], layers[1:], userxattr=userxattr,
                       xattr=bool(passthrough.get("xattr", True)), readdirplus=bool(readdirplus))
        except BaseException:
            for layer in layers:
                layer.close()
            raise

    def describe_inodes(self) -> str:
        """How the layers hold their nodes, for the log at start (from a Passthrough upper layer)."""
        describe = getattr(self._layers[0], "describe_inodes", None)
        held = f": {describe()}" if describe is not None else ""
        return f"an overlay of {len(self._layers) - 1} lower layers under the upper one{held}"

    def close(self) -> None:
        """Forgets every node and handle, then closes the layers that can be closed."""
        self.destroy()
        for layer in self._layers:
            close = getattr(layer, "close", None)
            if close is not None:
                close()

    def _check_tmpfile(self) -> None:
        """Raises ValueError unless the upper layer makes unnamed files (the atomic copy-up needs them);
        the one made to find out is gone once closed."""
        upper = self._layers[0]
        try:
            entry, opened = upper.tmpfile(_ROOT, ROOT_ID, 0o600, os.O_RDWR, 0)
        except OSError as exc:
            raise ValueError(f"the upper layer cannot make O_TMPFILE files for copy-up: "
                             f"{exc.strerror}") from None
        upper.release(_ROOT, entry.nodeid, opened.fh, os.O_RDWR)
        upper.forget(entry.nodeid, 1)

    # -- the tree -------------------------------------------------------------------------------
    def _new_root(self) -> _Node:
        upper = self._layers[0]
        attr = upper.getattr(_ROOT, ROOT_ID, None)[0]
        lowers = [(i, ROOT_ID) for i in range(1, len(self._layers))]
        root = _Node(ROOT_ID, None, b"", stat.S_IFDIR, self._ino(0, attr.st_ino), ROOT_ID, lowers, False, 1)
        root.refs = 1
        self._nodes[ROOT_ID] = root
        self._by_upper[ROOT_ID] = root
        return root

    def _ino(self, layer: int, ino: int) -> int:
        """The st_ino the overlay shows for inode `ino` of `layer` (the xino rule of the module doc)."""
        if self._samefs or ino >> _XINO_SHIFT:
            return ino
        return ino | self._fsid[layer] << _XINO_SHIFT

    def _node(self, nodeid: int) -> _Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise fs_error(errno.ENOENT if nodeid == 0 else errno.EBADF)
        return node

    def _dir_node(self, nodeid: int) -> _Node:
        node = self._node(nodeid)
        if not node.is_dir:
            raise fs_error(errno.ENOTDIR)
        return node

    def _layer_lookup(self, layer: int, parent: int, name: bytes) -> Entry | None:
        """The layer's Entry for `name` (one layer lookup the caller owns), or None if there is none."""
        try:
            return self._layers[layer].lookup(_ROOT, parent, name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def _forget(self, layer: int, nodeid: int) -> None:
        if nodeid != ROOT_ID:
            self._layers[layer].forget(nodeid, 1)

    def _is_opaque(self, layer: int, nodeid: int) -> bool:
        try:
            return self._layers[layer].getxattr(_ROOT, nodeid, self._opaque_name) == b"y"
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise

    def _find(self, parent: _Node, name: bytes) -> _Found | None:
        """Looks `name` up through the layers of directory `parent` (the rules of the module doc)."""
        upper: Entry | None = None
        lowers: list[tuple[int, Entry]] = []
        opaque = False
        kind = None
        if parent.upper is not None:
            upper = self._layer_lookup(0, parent.upper, name)
            if upper is not None:
                if is_whiteout(upper.attr):
                    self._forget(0, upper.nodeid)
                    return None
                kind = stat.S_IFMT(upper.attr.st_mode)
                opaque = kind == stat.S_IFDIR and self._is_opaque(0, upper.nodeid)
                if kind != stat.S_IFDIR or opaque:
                    return _Found(upper, lowers, opaque)
        misses = parent.misses
        for layer, dir_id in parent.lowers:
            if (layer, name) in misses:
                continue
            entry = self._layer_lookup(layer, dir_id, name)
            if entry is None:
                if len(misses) < _MAX_MISSES:
                    misses.add((layer, name))
                continue
            this = stat.S_IFMT(entry.attr.st_mode)
            if is_whiteout(entry.attr) or (kind is not None and (kind != stat.S_IFDIR or this != kind)):
                self._forget(layer, entry.nodeid)
                break
            kind = this
            lowers.append((layer, entry))
            if this != stat.S_IFDIR or self._is_opaque(layer, entry.nodeid):
                break
        if upper is None and not lowers:
            return None
        return _Found(upper, lowers, opaque)

    def _release_found(self, found: _Found) -> None:
        if found.upper is not None:
            self._forget(0, found.upper.nodeid)
        for layer, entry in found.lowers:
            self._forget(layer, entry.nodeid)

    def _lower_positive(self, parent: _Node, name: bytes) -> bool:
        """Whether a lower layer of `parent` shows `name` (then removing it from the upper needs a
        whiteout)."""
        for layer, dir_id in parent.lowers:
            entry = self._layer_lookup(layer, dir_id, name)
            if entry is None:
                continue
            self._forget(layer, entry.nodeid)
            return not is_whiteout(entry.attr)
        return False

    def _node_for(self, parent: _Node, name: bytes, found: _Found) -> _Node:
        """The node for what `_find` found (an existing one, or a new one taking over the lookups)."""
        key = (parent.nodeid, name)
        if found.upper is not None:
            node = self._by_upper.get(found.upper.nodeid)
        else:
            node = self._by_name.get(key)
            if node is not None and node.lowers[:1] != [(found.lowers[0][0], found.lowers[0][1].nodeid)]:
                # The lower layer changed underneath: the old node keeps its client references only.
                del self._by_name[key]
                node = None
        if node is not None:
            self._release_found(found)
            return node
        if found.upper is not None:
            self._by_name.pop(key, None)  # a lower-only node the name led to before, now hidden
        layer, entry = found.top
        attr = entry.attr
        kind = stat.S_IFMT(attr.st_mode)
        ino = self._ino(layer, attr.st_ino)
        if layer == 0:
            ino = self._origin_ino.get((getattr(attr, "st_dev", 0), attr.st_ino), ino)
        node = _Node(next(self._ids), parent, name, kind, ino,
                     found.upper.nodeid if found.upper is not None else None,
                     [(i, e.nodeid) for i, e in found.lowers], found.opaque,
                     found.lowers[0][1].attr.st_nlink if found.lowers else 1)
        parent.children += 1
        self._nodes[node.nodeid] = node
        if node.upper is not None:
            self._by_upper[node.upper] = node
        else:
            self._by_name[key] = node
        return node

    def _drop(self, node: _Node) -> None:
        """Lets go of a node nobody refers to any more, and of its parent if that was its last tie."""
        while node is not self._root and node.refs <= 0 and node.children <= 0:
            self._nodes.pop(node.nodeid, None)
            if node.upper is not None:
                if self._by_upper.get(node.upper) is node:
                    del self._by_upper[node.upper]
                self._forget(0, node.upper)
            key = (node.parent.nodeid, node.name) if node.parent is not None else None
            if key is not None and self._by_name.get(key) is node:
                del self._by_name[key]
            for layer, nodeid in node.lowers:
                self._forget(layer, nodeid)
            node.upper = None
            node.lowers = []
            parent = node.parent
            if parent is None:
                return
            parent.children -= 1
            node = parent

    def _attr(self, node: _Node, fresh: Entry | None = None) -> tuple[Stat, float]:
        """The node's attributes as the overlay shows them, and their timeout: from `fresh`, the top
        real node's Entry if the caller just looked it up, or else from the layer's getattr."""
        if fresh is not None:
            attr, timeout = fresh.attr, fresh.attr_timeout
        else:
            layer, nodeid = node.top()
            attr, timeout = self._layers[layer].getattr(_ROOT, nodeid, None)
        nlink = 1 if node.merged else attr.st_nlink
        return Stat(node.ino, attr.st_mode, nlink, attr.st_uid, attr.st_gid, attr.st_rdev, attr.st_size,
                    attr.st_blocks, attr.st_blksize, attr.st_atime_ns, attr.st_mtime_ns,
                    attr.st_ctime_ns), timeout

    def _entry(self, node: _Node, timeouts: Entry | None = None, fresh: Entry | None = None) -> Entry:
        """Counts one client lookup of `node` and returns its Entry (`fresh` as for `_attr`)."""
        attr, timeout = self._attr(node, fresh)
        node.refs += 1
        entry_timeout = timeouts.entry_timeout if timeouts is not None else timeout
        return Entry(node.nodeid, attr, entry_timeout=entry_timeout, attr_timeout=timeout)

    def _child(self, parent: _Node, name: bytes) -> _Node | None:
        """The node under `name` in `parent` (not counted as a client lookup), or None."""
        found = self._find(parent, name)
        return None if found is None else self._node_for(parent, name, found)

    @contextmanager
    def _pinned(self, node: _Node | None) -> Iterator[_Node | None]:
        """Keeps a node `_child` returned alive for the block, and lets it go after if unreferenced."""
        if node is None:
            yield None
            return
        node.refs += 1
        try:
            yield node
        finally:
            node.refs -= 1
            self._drop(node)

    # -- copy-up --------------------------------------------------------------------------------
    def _xattrs(self, layer: int, nodeid: int) -> list[tuple[bytes, bytes]]:
        """The attributes of a real node that a copy keeps: all but the overlay's own markers."""
        fs = self._layers[layer]
        try:
            names = fs.listxattr(_ROOT, nodeid)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return []
            raise
        out = []
        for name in names:
            if name.startswith(self._prefix) and not name.startswith(self._escape):
                continue
            try:
                out.append((name, fs.getxattr(_ROOT, nodeid, name)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        return out

    def _copy_up(self, node: _Node) -> None:
        """Makes `node` (and its parents) upper nodes; a no-op for one that is already."""
        if node.upper is not None:
            return
        parent = node.parent
        assert parent is not None  # the root is always upper
        self._copy_up(parent)
        layer, lower_id = node.lowers[0]
        lower = self._layers[layer]
        upper = self._layers[0]
        attr = lower.getattr(_ROOT, lower_id, None)[0]
        xattrs = self._xattrs(layer, lower_id)
        dir_attr = upper.getattr(_ROOT, parent.upper, None)[0]
        perm = stat.S_IMODE(attr.st_mode)
        name = node.name
        if node.kind == stat.S_IFREG:
            entry = self._copy_file(layer, lower_id, parent.upper, perm, attr, xattrs, name)
        else:
            if node.is_dir:
                entry = upper.mkdir(_ROOT, parent.upper, name, perm, 0)
            elif node.kind == stat.S_IFLNK:
                entry = upper.symlink(_ROOT, parent.upper, name, lower.readlink(_ROOT, lower_id))
            else:
                entry = upper.mknod(_ROOT, parent.upper, name, attr.st_mode, attr.st_rdev, 0)
            try:
                self._copy_meta(entry.nodeid, attr, xattrs)
            except BaseException:
                upper.forget(entry.nodeid, 1)
                try:
                    (upper.rmdir if node.is_dir else upper.unlink)(_ROOT, parent.upper, name)
                except OSError:
                    pass  # the error that matters is the copy's
                raise
        # The upper directory's times stay, as the kernel keeps them across a copy-up into it.
        upper.setattr(_ROOT, parent.upper,
                      SetAttr(atime_ns=dir_attr.st_atime_ns, mtime_ns=dir_attr.st_mtime_ns))
        key = (parent.nodeid, name)
        if self._by_name.get(key) is node:
            del self._by_name[key]
        node.upper = entry.nodeid
        self._by_upper[entry.nodeid] = node
        if not node.is_dir:
            for i, nodeid in node.lowers:
                self._forget(i, nodeid)
            node.lowers = []
            if node.lower_nlink > 1:
                # index=off: the copy is a file of its own, with its own inode number.
                node.ino = self._ino(0, entry.attr.st_ino)
        dev = getattr(entry.attr, "st_dev", None)
        if dev is not None:
            self._origin_ino[(dev, entry.attr.st_ino)] = node.ino

    def _copy_file(self, layer: int, lower_id: int, upper_dir: int, perm: int, attr: Attr,
                   xattrs: list[tuple[bytes, bytes]], name: bytes) -> Entry:
        """Copies regular file `lower_id` into an unnamed upper file, then links it as `name`."""
        upper = self._layers[0]
        lower = self._layers[layer]
        tmp, tmp_open = upper.tmpfile(_ROOT, upper_dir, perm, os.O_RDWR, 0)
        try:
            src = lower.open(_ROOT, lower_id, os.O_RDONLY)
            try:
                offset = 0
                while True:
                    data = lower.read(_ROOT, lower_id, src.fh, offset, _COPY_CHUNK)
                    if not data:
                        break
                    view = memoryview(data)
                    while view:
                        n = upper.write(_ROOT, tmp.nodeid, tmp_open.fh, offset, bytes(view), 0)
                        offset += n
                        view = view[n:]
            finally:
                lower.release(_ROOT, lower_id, src.fh, os.O_RDONLY)
            upper.fsync(_ROOT, tmp.nodeid, tmp_open.fh, True)
            self._copy_meta(tmp.nodeid, attr, xattrs)
            entry = upper.link(_ROOT, tmp.nodeid, upper_dir, name)
        finally:
            upper.release(_ROOT, tmp.nodeid, tmp_open.fh, os.O_RDWR)
            upper.forget(tmp.nodeid, 1)
        return entry

    def _copy_meta(self, nodeid: int, attr: Attr, xattrs: list[tuple[bytes, bytes]]) -> None:
        """Gives upper node `nodeid` the owner, mode, attributes and times of `attr` and `xattrs`."""
        upper = self._layers[0]
        symlink = stat.S_ISLNK(attr.st_mode)
        # Owner first: chown clears set-user-ID and security.capability, which come back after.
        upper.setattr(_ROOT, nodeid, SetAttr(uid=attr.st_uid, gid=attr.st_gid,
                                             mode=None if symlink else stat.S_IMODE(attr.st_mode)))
        for name, value in xattrs:
            try:
                upper.setxattr(_ROOT, nodeid, name, value, 0)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        upper.setattr(_ROOT, nodeid, SetAttr(atime_ns=attr.st_atime_ns, mtime_ns=attr.st_mtime_ns))

    # -- markers ---------------------------------------------------------------------------------
    def _whiteout(self, upper_dir: int, name: bytes) -> None:
        """Makes a whiteout `name` in upper directory `upper_dir` (char device 0/0, mode 0, root's)."""
        entry = self._layers[0].mknod(_ROOT, upper_dir, name, stat.S_IFCHR, 0, 0)
        self._layers[0].forget(entry.nodeid, 1)

    def _drop_whiteout(self, upper_dir: int, name: bytes) -> bool:
        """Removes a whiteout `name` from upper directory `upper_dir`, if there is one; says whether."""
        entry = self._layer_lookup(0, upper_dir, name)
        if entry is None:
            return False
        self._forget(0, entry.nodeid)
        if not is_whiteout(entry.attr):
            raise fs_error(errno.EEXIST)
        self._layers[0].unlink(_ROOT, upper_dir, name)
        return True

    def _clear_whiteouts(self, upper_dir: int) -> None:
        """Removes the whiteouts of upper directory `upper_dir` (before it is removed or replaced)."""
        for name, dtype, _ in self._list_layer(0, upper_dir):
            if dtype == _DT_CHR:
                self._drop_whiteout(upper_dir, name)

    # -- listings --------------------------------------------------------------------------------
    def _list_layer(self, layer: int, dir_id: int) -> list[tuple[bytes, int, int]]:
        """(name, d_type, d_ino) of the entries of one real directory, without b"." and b"..."""
        fs = self._layers[layer]
        handle = fs.opendir(_ROOT, dir_id, os.O_RDONLY)
        try:
            return [(d.name, d.type, d.ino) for d in fs.readdir(_ROOT, dir_id, handle.fh, 0, False)
                    if d.name not in _DOTS]
        finally:
            fs.releasedir(_ROOT, dir_id, handle.fh)

    def _whiteout_in(self, layer: int, dir_id: int, name: bytes) -> bool:
        entry = self._layer_lookup(layer, dir_id, name)
        if entry is None:
            return False
        self._forget(layer, entry.nodeid)
        return is_whiteout(entry.attr)

    def _merged_listing(self, node: _Node) -> list[tuple[bytes, int, int]]:
        """(name, d_type, d_ino) of what directory `node` shows, top layer first, whiteouts applied."""
        seen: set[bytes] = set()
        out = []
        dirs = ([(0, node.upper)] if node.upper is not None else []) + list(node.lowers)
        for layer, dir_id in dirs:
            for name, dtype, ino in self._list_layer(layer, dir_id):
                if name in seen:
                    continue
                seen.add(name)
                if dtype == _DT_CHR and self._whiteout_in(layer, dir_id, name):
                    continue
                out.append((name, dtype, self._ino(layer, ino)))
        return out

    # -- session ---------------------------------------------------------------------------------
    def init(self, conn: ConnectionInfo) -> None:
        """Asks for nothing beyond the defaults (locks stay in the client); drops READDIRPLUS if off."""
        if not self._readdirplus:
            conn.want &= ~(FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO)

    def destroy(self) -> None:
        """Forgets every node but the root, and every handle."""
        with self._lock:
            with self._handles_lock:
                handles = list(self._handles.values())
                self._handles.clear()
            for h in handles:
                self._close_real(h)
            for node in list(self._nodes.values()):
                if node is not self._root:
                    node.refs = 0
                    node.children = 0
            for node in list(self._nodes.values()):
                if node is not self._root:
                    node.parent = None
                    self._drop(node)
            self._root.children = 0
            self._by_name.clear()
            self._by_upper = {ROOT_ID: self._root}

    # -- names -----------------------------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """Looks `name` up through the layers; b".." of the root is the root."""
        with self._lock:
            p = self._dir_node(parent)
            if name == b".":
                return self._entry(p)
            if name == b"..":
                return self._entry(p.parent or p)
            check_name(name)
            found = self._find(p, name)
            if found is None:
                raise fs_error(errno.ENOENT)
            layer, top = found.top
            node = self._node_for(p, name, found)
            return self._entry(node, top, top if node.top() == (layer, top.nodeid) else None)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drops `nlookup` client references; a node without any lets go of its layers' nodes."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or node is self._root:
                return
            node.refs -= nlookup
            self._drop(node)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[Attr, float]:
        """The attributes of the real node on top, with the overlay's st_ino and st_nlink."""
        with self._lock:
            return self._attr(self._node(nodeid))

    def setattr(self, ctx: Context, nodeid: int, changes: SetAttr) -> tuple[Attr, float]:
        """Copies the node up, then applies `changes` to the upper node."""
        with self._lock:
            node = self._node(nodeid)
            self._copy_up(node)
            fh = None
            if changes.fh is not None:
                handle = self._handle(changes.fh)
                if handle.layer == 0 and handle.lnode == node.upper:
                    fh = handle.fh
            real = SetAttr(changes.mode, changes.uid, changes.gid, changes.size, changes.atime_ns,
                           changes.mtime_ns, changes.ctime_ns, fh, changes.kill_suidgid)
            self._layers[0].setattr(ctx, node.upper, real)
            return self._attr(node)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        """The target of the symlink on top."""
        with self._lock:
            layer, real = self._node(nodeid).top()
        return self._layers[layer].readlink(_ROOT, real)

    @contextmanager
    def _new_name(self, parent: int, name: bytes) -> Iterator[tuple[_Node, bool]]:
        """Copies `parent` up for a new `name` (EEXIST if it shows one) and removes a whiteout in the
        way for the block, which makes the node; yields the parent and whether there was a whiteout.
        If the block fails, the whiteout comes back, so the lower name stays hidden."""
        check_name(name)
        p = self._dir_node(parent)
        with self._pinned(self._child(p, name)) as existing:
            if existing is not None:
                raise fs_error(errno.EEXIST)
        self._copy_up(p)
        over_whiteout = self._drop_whiteout(p.upper, name)
        try:
            yield p, over_whiteout
        except BaseException:
            if over_whiteout:
                self._whiteout(p.upper, name)
            raise

    def _new_node(self, p: _Node, name: bytes, entry: Entry) -> Entry:
        found = _Found(entry, [], False)
        return self._entry(self._node_for(p, name, found), entry)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """A new symlink in the upper."""
        with self._lock, self._new_name(parent, name) as (p, _):
            return self._new_node(p, name, self._layers[0].symlink(ctx, p.upper, name, target))

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        """A new node in the upper; a character device 0/0 (a whiteout) is refused with EPERM."""
        if stat.S_ISCHR(mode) and rdev == 0:
            raise fs_error(errno.EPERM)
        with self._lock, self._new_name(parent, name) as (p, _):
            return self._new_node(p, name, self._layers[0].mknod(ctx, p.upper, name, mode, rdev, umask))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        """A new directory in the upper, opaque when made where a whiteout was."""
        with self._lock, self._new_name(parent, name) as (p, over_whiteout):
            upper = self._layers[0]
            entry = upper.mkdir(ctx, p.upper, name, mode, umask)
            if over_whiteout:
                try:
                    upper.setxattr(_ROOT, entry.nodeid, self._opaque_name, b"y", 0)
                except BaseException:
                    upper.forget(entry.nodeid, 1)
                    upper.rmdir(_ROOT, p.upper, name)
                    raise
            new = self._new_node(p, name, entry)
            self._nodes[new.nodeid].opaque = over_whiteout
            return new

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """Removes a non-directory: from the upper, leaving a whiteout if a lower layer has the name."""
        check_name(name)
        with self._lock:
            p = self._dir_node(parent)
            with self._pinned(self._child(p, name)) as node:
                if node is None:
                    raise fs_error(errno.ENOENT)
                if node.is_dir:
                    raise fs_error(errno.EISDIR)
                self._remove(p, name, node)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        """Removes an empty directory (whiteouts inside do not count), leaving a whiteout if needed."""
        check_name(name)
        with self._lock:
            p = self._dir_node(parent)
            with self._pinned(self._child(p, name)) as node:
                if node is None:
                    raise fs_error(errno.ENOENT)
                if not node.is_dir:
                    raise fs_error(errno.ENOTDIR)
                if self._merged_listing(node):
                    raise fs_error(errno.ENOTEMPTY)
                self._remove(p, name, node)

    def _remove(self, p: _Node, name: bytes, node: _Node) -> None:
        self._copy_up(p)
        positive = self._lower_positive(p, name)
        upper = self._layers[0]
        if node.upper is not None:
            if node.is_dir:
                self._clear_whiteouts(node.upper)
                upper.rmdir(_ROOT, p.upper, name)
            else:
                upper.unlink(_ROOT, p.upper, name)
        if positive or node.upper is None:
            self._whiteout(p.upper, name)
        self._detach(p, name, node)

    def _detach(self, p: _Node, name: bytes, node: _Node) -> None:
        """`node` no longer has `name` in `p`: later lookups do not find it by that name."""
        if self._by_name.get((p.nodeid, name)) is node:
            del self._by_name[(p.nodeid, name)]
        if node.is_dir and node.upper is not None and self._by_upper.get(node.upper) is node:
            del self._by_upper[node.upper]
        if node.upper is not None:
            try:
                attr = self._layers[0].getattr(_ROOT, node.upper, None)[0]
            except OSError:
                return
            if attr.st_nlink == 0:
                # Gone from the upper: a new file may get its inode number, and must not get its st_ino.
                self._origin_ino.pop((getattr(attr, "st_dev", 0), attr.st_ino), None)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """Renames within the upper (copying the source up); EXDEV for a directory a lower layer has.

        RENAME_NOREPLACE and RENAME_EXCHANGE are honoured; RENAME_WHITEOUT is EINVAL."""
        check_name(name)
        check_name(newname)
        if flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE) or flags == _RENAME_NOREPLACE | _RENAME_EXCHANGE:
            raise fs_error(errno.EINVAL)
        with self._lock:
            p = self._dir_node(parent)
            np = self._dir_node(newparent)
            with self._pinned(self._child(p, name)) as src, self._pinned(self._child(np, newname)) as dst:
                if src is None:
                    raise fs_error(errno.ENOENT)
                self._rename(p, name, src, np, newname, dst, flags)

    def _movable(self, node: _Node, newparent: _Node) -> None:
        """Refuses (EXDEV) to move a directory a lower layer has; makes a directory that moves into a
        merged one opaque, so that it does not show what lower layers have under its new name."""
        if not node.is_dir:
            return
        if node.lowers:
            raise fs_error(errno.EXDEV)
        if not node.opaque and newparent.lowers:
            self._copy_up(newparent)
            self._layers[0].setxattr(_ROOT, node.upper, self._opaque_name, b"y", 0)
            node.opaque = True

    def _move(self, node: _Node, old: _Node, name: bytes, new: _Node, newname: bytes) -> None:
        """Records that `node` went from `old`/`name` to `new`/`newname`."""
        self._detach(old, name, node)
        if node.parent is not new:
            # (A hard-linked node's parent is where it was first found, not always `old`.)
            previous = node.parent
            new.children += 1
            node.parent = new
            previous.children -= 1  # type: ignore[union-attr]
            self._drop(previous)  # type: ignore[arg-type]
        node.name = newname
        if node.is_dir:
            self._by_upper[node.upper] = node  # type: ignore[index]

    def _exchange(self, p: _Node, name: bytes, src: _Node, np: _Node, newname: bytes,
                  dst: _Node | None) -> None:
        if dst is None:
            raise fs_error(errno.ENOENT)
        if dst is src:
            return
        if (src.is_dir and src.lowers) or (dst.is_dir and dst.lowers):
            raise fs_error(errno.EXDEV)
        for node in (p, np, src, dst):
            self._copy_up(node)
        self._movable(src, np)
        self._movable(dst, p)
        self._layers[0].rename(_ROOT, p.upper, name, np.upper, newname, _RENAME_EXCHANGE)
        self._move(src, p, name, np, newname)
        self._move(dst, np, newname, p, name)

    def _rename(self, p: _Node, name: bytes, src: _Node, np: _Node, newname: bytes, dst: _Node | None,
                flags: int) -> None:
        if flags & _RENAME_EXCHANGE:
            self._exchange(p, name, src, np, newname, dst)
            return
        if src.is_dir and src.lowers:
            raise fs_error(errno.EXDEV)
        if dst is not None:
            if flags & _RENAME_NOREPLACE:
                raise fs_error(errno.EEXIST)
            if dst is src:
                return
            if src.is_dir and not dst.is_dir:
                raise fs_error(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise fs_error(errno.EISDIR)
            if dst.is_dir and self._merged_listing(dst):
                raise fs_error(errno.ENOTEMPTY)
        self._copy_up(p)
        self._copy_up(np)
        self._copy_up(src)
        upper = self._layers[0]
        dropped = False
        if dst is not None and dst.is_dir and dst.upper is not None:
            # Opaque first: the directory shows nothing either way, even if the rename then fails.
            if dst.lowers and not dst.opaque:
                upper.setxattr(_ROOT, dst.upper, self._opaque_name, b"y", 0)
                dst.opaque = True
            self._clear_whiteouts(dst.upper)
        elif dst is None or dst.upper is None:
            dropped = self._drop_whiteout(np.upper, newname)
        try:
            self._movable(src, np)
            self._rename_upper(p, name, src, np, newname)
        except BaseException:
            if dropped:
                self._whiteout(np.upper, newname)
            raise
        if dst is not None:
            self._detach(np, newname, dst)
        self._move(src, p, name, np, newname)

    def _rename_upper(self, p: _Node, name: bytes, src: _Node, np: _Node, newname: bytes) -> None:
        """Renames `src` in the upper, leaving a whiteout at its old name where a lower layer has it."""
        upper = self._layers[0]
        positive = self._lower_positive(p, name)
        whiteout_left = False
        if positive and not src.is_dir:
            try:
                upper.rename(_ROOT, p.upper, name, np.upper, newname, _RENAME_WHITEOUT)
                whiteout_left = True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if not whiteout_left:
            # Directories, and upper file systems without RENAME_WHITEOUT: the whiteout follows,
            # inside the namespace lock.
            upper.rename(_ROOT, p.upper, name, np.upper, newname, 0)
            if positive:
                self._whiteout(p.upper, name)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """Copies the node up and hard-links it in the upper: both names are then one file."""
        with self._lock:
            node = self._node(nodeid)
            if node.is_dir:
                raise fs_error(errno.EPERM)
            with self._new_name(newparent, newname) as (np, _):
                self._copy_up(node)
                entry = self._layers[0].link(_ROOT, node.upper, np.upper, newname)
            self._forget(0, entry.nodeid)
            return self._entry(node, entry)

    # -- files -----------------------------------------------------------------------------------
    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise fs_error(errno.EBADF)
        return handle

    def _add_handle(self, handle: _Handle) -> Open:
        with self._handles_lock:
            fh = next(self._handle_ids)
            self._handles[fh] = handle
        return Open(fh)

    def open(self, ctx: Context, nodeid: int, flags: int) -> Open:
        """Opens the real file on top; a write or O_TRUNC open copies the file up first."""
        with self._lock:
            node = self._node(nodeid)
            if node.kind == stat.S_IFREG and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
                self._copy_up(node)
            layer, real = node.top()
        opened = self._layers[layer].open(ctx, real, flags)
        return Open(self._add_handle(_Handle(node, layer, real, opened.fh, flags)).fh, opened.flags)

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int) -> tuple[Entry, Open]:
        """Creates the file in the upper (an existing name is opened, unless O_EXCL)."""
        with self._lock:
            check_name(name)
            p = self._dir_node(parent)
            existing = self._child(p, name)
            if existing is not None:
                with self._pinned(existing):
                    if flags & os.O_EXCL:
                        raise fs_error(errno.EEXIST)
                    entry = self._entry(existing)
                try:
                    return entry, self.open(ctx, existing.nodeid, flags)
                except BaseException:
                    self.forget(existing.nodeid, 1)
                    raise
            with self._new_name(parent, name) as (p, _):
                entry, opened = self._layers[0].create(ctx, p.upper, name, mode, flags, umask)
            ovl_entry = self._new_node(p, name, entry)
            node = self._nodes[ovl_entry.nodeid]
        handle = self._add_handle(_Handle(node, 0, entry.nodeid, opened.fh, flags))
        return ovl_entry, Open(handle.fh, opened.flags)

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, Open]:
        """An unnamed file in the parent's upper directory."""
        with self._lock:
            p = self._dir_node(parent)
            self._copy_up(p)
            entry, opened = self._layers[0].tmpfile(ctx, p.upper, mode, flags, umask)
            ovl_entry = self._new_node(p, b"", entry)
            node = self._nodes[ovl_entry.nodeid]
        handle = self._add_handle(_Handle(node, 0, entry.nodeid, opened.fh, flags))
        return ovl_entry, Open(handle.fh, opened.flags)

    def _current(self, handle: _Handle) -> _Handle:
        """`handle`, moved to the upper file if its node was copied up since it was opened (reads
        through an earlier read-only open then see the copy, as on the kernel's overlayfs)."""
        node = handle.node
        if handle.layer == 0 or node.upper is None:
            return handle
        with self._lock:
            if handle.layer != 0:
                opened = self._layers[0].open(_ROOT, node.upper, os.O_RDONLY)
                self._layers[handle.layer].release(_ROOT, handle.lnode, handle.fh, handle.flags)
                handle.layer, handle.lnode, handle.fh = 0, node.upper, opened.fh
        return handle

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        h = self._current(self._handle(fh))
        return self._layers[h.layer].read(ctx, h.lnode, h.fh, offset, size)

    def read_into(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, dest: Writer) -> int:
        """Reads from the real file (zero copy where the layer does)."""
        h = self._current(self._handle(fh))
        return self._layers[h.layer].read_into(ctx, h.lnode, h.fh, offset, size, dest)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: bytes, flags: int) -> int:
        h = self._handle(fh)
        return self._layers[h.layer].write(ctx, h.lnode, h.fh, offset, data, flags)

    def write_from(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, src: Reader,
                   flags: int) -> int:
        """Writes to the upper file (write opens copied it up)."""
        h = self._handle(fh)
        return self._layers[h.layer].write_from(ctx, h.lnode, h.fh, offset, size, src, flags)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        h = self._handle(fh)
        self._layers[h.layer].flush(ctx, h.lnode, h.fh, lock_owner)

    def _close_real(self, h: _Handle) -> None:
        if h.listing is None and h.lock is None:
            self._layers[h.layer].release(_ROOT, h.lnode, h.fh, h.flags)

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        with self._handles_lock:
            h = self._handles.pop(fh, None)
        if h is not None:
            self._close_real(h)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        h = self._current(self._handle(fh))
        self._layers[h.layer].fsync(ctx, h.lnode, h.fh, datasync)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        h = self._handle(fh)
        self._layers[h.layer].fallocate(ctx, h.lnode, h.fh, offset, length, mode)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        h = self._current(self._handle(fh))
        return self._layers[h.layer].lseek(ctx, h.lnode, h.fh, offset, whence)

    @contextmanager
    def fd_for_mapping(self, nodeid: int, fh: int, writable: bool) -> Iterator[tuple[int, bool, int]]:
        """The real file's fd for the DAX window (vhostfs.dax), lent by its layer: through open handle
        `fh`, or with SETUPMAPPING_NO_FH for the node itself, copied up first for a writable mapping.
        A read-only mapping of a lower file keeps showing the lower file after a later copy-up, as a
        read-only MAP_SHARED mapping does on the kernel's overlayfs. EBADF for an unknown handle or
        another node's; EOPNOTSUPP from a layer that lends no fds."""
        if fh == SETUPMAPPING_NO_FH:
            with self._lock:
                node = self._node(nodeid)
                if writable and node.kind == stat.S_IFREG:
                    self._copy_up(node)
                layer, real = node.top()
            real_fh = fh
        else:
            h = self._current(self._handle(fh))
            if h.node.nodeid != nodeid:
                raise fs_error(errno.EBADF)
            layer, real, real_fh = h.layer, h.lnode, h.fh
        lend = getattr(self._layers[layer], "fd_for_mapping", None)
        if lend is None:
            raise fs_error(errno.EOPNOTSUPP)
        with lend(real, real_fh, writable) as lent:
            yield lent

    def wants_dax(self, nodeid: int) -> bool:
        """Whether the real file on top carries the per-file DAX attribute (its layer's answer)."""
        with self._lock:
            layer, real = self._node(nodeid).top()
        wants = getattr(self._layers[layer], "wants_dax", None)
        return bool(wants is not None and wants(real))

    # -- directories -----------------------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Open:
        with self._lock:
            node = self._dir_node(nodeid)
        return self._add_handle(_Handle(node, 0, 0, 0, flags, None, threading.Lock()))

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool) -> Iterable[DirEntry]:
        """The merged listing (b"." and b".." first); offset 0 takes a fresh snapshot."""
        h = self._handle(fh)
        if h.lock is None:
            raise fs_error(errno.ENOTDIR)
        with h.lock:
            if offset == 0 or h.listing is None:
                with self._lock:
                    node = h.node
                    parent = node.parent or node
                    h.listing = [(b".", _DT_DIR, node.ino), (b"..", _DT_DIR, parent.ino),
                                 *self._merged_listing(node)]
            listing = h.listing
        return self._entries(h.node.nodeid, listing, max(offset, 0), plus)

    def _entries(self, nodeid: int, listing: list[tuple[bytes, int, int]], start: int,
                 plus: bool) -> Iterator[DirEntry]:
        for index in range(start, len(listing)):
            name, dtype, ino = listing[index]
            if not plus or name in _DOTS:
                yield DirEntry(name, ino, dtype, index + 1)
                continue
            try:
                entry = self.lookup(_ROOT, nodeid, name)
            except FileNotFoundError:
                continue
            yield DirEntry(name, entry.attr.st_ino, stat.S_IFMT(entry.attr.st_mode) >> 12, index + 1, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        with self._handles_lock:
            self._handles.pop(fh, None)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        """fsync(2) of the upper directory, if there is one."""
        node = self._handle(fh).node
        if node.upper is None:
            return
        upper = self._layers[0]
        opened = upper.opendir(_ROOT, node.upper, os.O_RDONLY)
        try:
            upper.fsyncdir(_ROOT, node.upper, opened.fh, datasync)
        finally:
            upper.releasedir(_ROOT, node.upper, opened.fh)

    # -- file system -----------------------------------------------------------------------------
    def statfs(self, ctx: Context, nodeid: int) -> StatVfs:
        """The upper layer's statistics (where new data goes), as the kernel's overlayfs reports."""
        return self._layers[0].statfs(ctx, ROOT_ID)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """R_OK/W_OK/X_OK against the merged node's mode bits; writing a lower file is allowed (it
        is copied up)."""
        with self._lock:
            st, _ = self._attr(self._node(nodeid))
        check_access(ctx, st.st_mode, st.st_uid, st.st_gid, mask)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self._layers[0].syncfs(ctx, ROOT_ID)

    # -- extended attributes ---------------------------------------------------------------------
    def _real_xattr(self, name: bytes) -> bytes:
        """The layer name of guest attribute `name`: the overlay's own names are escaped."""
        if not self._xattr:
            raise fs_error(errno.ENOSYS)
        if name.startswith(self._prefix):
            return self._escape + name[len(self._prefix):]
        return name

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        real = self._real_xattr(name)
        with self._lock:
            layer, node = self._node(nodeid).top()
        return self._layers[layer].getxattr(ctx, node, real)

    def listxattr(self, ctx: Context, nodeid: int) -> list[bytes]:
        """The real node's attributes; the overlay's markers hidden, escaped names unescaped."""
        if not self._xattr:
            raise fs_error(errno.ENOSYS)
        with self._lock:
            layer, node = self._node(nodeid).top()
        out = []
        for name in self._layers[layer].listxattr(ctx, node):
            if name.startswith(self._escape):
                out.append(self._prefix + name[len(self._escape):])
            elif not name.startswith(self._prefix):
                out.append(name)
        return out

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, *,
                 kill_sgid: bool = False) -> None:
        """Copies the node up and sets the attribute on the upper node (escaped, see the module doc)."""
        real = self._real_xattr(name)
        with self._lock:
            node = self._node(nodeid)
            self._copy_up(node)
            self._layers[0].setxattr(ctx, node.upper, real, value, flags, kill_sgid=kill_sgid)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        real = self._real_xattr(name)
        with self._lock:
            node = self._node(nodeid)
            self._copy_up(node)
            self._layers[0].removexattr(ctx, node.upper, real)
