"""The pieces of the overlay reference tests: identical starting layers, one scripted sequence of
operations, and snapshots of a merged view or of an upper directory to compare.

The same sequence runs on the kernel's overlayfs and on vhostfs's overlay; everything it observes
(each operation's errno, inode-number stability, link counts) goes into a result list that must come
out the same on both.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from vhostfs import native

USER_A = 1234
GROUP_A = 5678
#: The kernel's own markers, which vhostfs does not write (see vhostfs/fs/overlay.py).
KERNEL_ONLY_XATTRS = frozenset(prefix + name for prefix in (b"trusted.overlay.", b"user.overlay.")
                               for name in (b"origin", b"impure", b"uuid"))
# A fixed time, so that copies of the starting layers are identical (times are not compared across
# the two runs, but the copy-up must keep them).
MTIME_NS = 981173106_123456789


def make_layers(base: Path, marker_prefix: bytes = b"trusted.overlay.") -> tuple[Path, list[Path]]:
    """Builds empty `base`/upper and two lower layers (l1 on top of l2); returns (upper, [l1, l2]).
    The opaque directory in l1 is marked with `marker_prefix` (user.overlay. for userxattr)."""
    upper, l1, l2 = base / "upper", base / "l1", base / "l2"
    for d in (upper, l1, l2):
        d.mkdir(parents=True)
    # The bottom layer.
    (l2 / "gone").write_bytes(b"bottom file, unlinked through the overlay\n")
    (l2 / "hidden").write_bytes(b"hidden by a whiteout in l1\n")
    (l2 / "opq").mkdir()
    (l2 / "opq" / "below").write_bytes(b"hidden by l1's opaque directory\n")
    (l2 / "merged").mkdir()
    (l2 / "merged" / "from_l2").write_bytes(b"l2\n")
    (l2 / "rmd").mkdir()
    (l2 / "rmd" / "a").write_bytes(b"a\n")
    # The top layer.
    (l1 / "hidden").unlink(missing_ok=True)
    os.mknod(l1 / "hidden", stat.S_IFCHR | 0, os.makedev(0, 0))
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", marker_prefix + b"opaque", b"y")
    (l1 / "opq" / "above").write_bytes(b"above\n")
    (l1 / "merged").mkdir()
    (l1 / "merged" / "from_l1").write_bytes(b"l1\n")
    (l1 / "file").write_bytes(b"lower file\n")
    (l1 / "trunc").write_bytes(b"0123456789")
    (l1 / "modes").write_bytes(b"modes\n")
    os.chmod(l1 / "modes", 0o4755)
    (l1 / "owned").write_bytes(b"owned\n")
    os.chown(l1 / "owned", USER_A, GROUP_A)
    (l1 / "xf").write_bytes(b"x\n")
    os.setxattr(l1 / "xf", b"user.old", b"old value")
    os.setxattr(l1 / "xf", b"user.keep", b"kept")
    (l1 / "d1").mkdir(mode=0o750)
    os.chown(l1 / "d1", USER_A, GROUP_A)
    (l1 / "d1" / "inner").write_bytes(b"inner\n")
    (l1 / "d1" / "deep").mkdir()
    (l1 / "d1" / "deep" / "f").write_bytes(b"deep\n")
    (l1 / "ldir").mkdir()
    (l1 / "ldir" / "f").write_bytes(b"f\n")
    (l1 / "mvsrc").write_bytes(b"moved\n")
    (l1 / "mvover").write_bytes(b"moved over\n")
    (l1 / "victim").write_bytes(b"replaced\n")
    (l1 / "hl_a").write_bytes(b"linked\n")
    (l1 / "pre1").write_bytes(b"pre-linked\n")
    os.link(l1 / "pre1", l1 / "pre2")
    (l1 / "inofile").write_bytes(b"ino\n")
    (l1 / "xa").write_bytes(b"exchanged\n")
    (l2 / "xdir").mkdir()
    (l2 / "xdir" / "f").write_bytes(b"")
    (l1 / "tofdir").write_bytes(b"file, then a directory\n")
    (l1 / "d2").mkdir()
    (l1 / "d2" / "child").write_bytes(b"child\n")
    (l1 / "d3").mkdir()
    (l1 / "d3" / "child").write_bytes(b"child\n")
    os.symlink("file", l1 / "lsym")
    os.mkfifo(l1 / "lfifo")
    os.mknod(l1 / "lnull", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (l1 / "userfile").write_bytes(b"the user's\n")
    os.chown(l1 / "userfile", USER_A, GROUP_A)
    (l1 / "cdir").mkdir()
    (l1 / "cdir" / "cfile").write_bytes(b"c\n")
    (l1 / "big").write_bytes(bytes(range(256)) * 12289)
    (l2 / "edir").mkdir()
    (l2 / "edir2").mkdir()
    (l2 / "edir2" / "x").write_bytes(b"")
    (l1 / "ldir" / "tolink").write_bytes(b"linked from elsewhere\n")
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            os.utime(os.path.join(root, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    return upper, [l1, l2]


def _try(results: list, label: str, fn, *args) -> None:
    try:
        fn(*args)
        results.append((label, "ok"))
    except OSError as exc:
        results.append((label, errno.errorcode.get(exc.errno, exc.errno)))


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _exchange(a: Path, name_a: str, b: Path, name_b: str) -> None:
    """renameat2(2) with RENAME_EXCHANGE, which os.rename cannot ask for."""
    fd_a = os.open(a, os.O_PATH | os.O_DIRECTORY)
    fd_b = os.open(b, os.O_PATH | os.O_DIRECTORY)
    try:
        native.renameat2(fd_a, name_a.encode(), fd_b, name_b.encode(), 2)
    finally:
        os.close(fd_a)
        os.close(fd_b)


def run_script(m: Path) -> list:
    """The scripted sequence of operations on merged view `m`; returns what it observed."""
    r: list = []
    ino = os.lstat(m / "inofile").st_ino
    _try(r, "create", (m / "new.txt").write_bytes, b"hello\n")
    _try(r, "append lower", _append, m / "file", b"appended\n")
    _try(r, "truncate lower", os.truncate, m / "trunc", 3)
    mtime = os.lstat(m / "modes").st_mtime_ns
    _try(r, "chmod lower", os.chmod, m / "modes", 0o4750)
    r.append(("chmod keeps mtime", os.lstat(m / "modes").st_mtime_ns == mtime == MTIME_NS))
    _try(r, "chmod lower dir", os.chmod, m / "d1", 0o700)
    _try(r, "chown lower", os.chown, m / "owned", 4321, 8765)
    _try(r, "lchown lower symlink", os.lchown, m / "lsym", USER_A, GROUP_A)
    _try(r, "setxattr lower", os.setxattr, m / "xf", b"user.new", b"new value")
    _try(r, "removexattr lower", os.removexattr, m / "xf", b"user.old")
    _try(r, "unlink lower", os.unlink, m / "gone")
    _try(r, "unlink in lower dir", os.unlink, m / "d1" / "inner")
    _try(r, "unlink copied-up", os.unlink, m / "trunc")
    _try(r, "rmdir non-empty", os.rmdir, m / "rmd")
    _try(r, "unlink in rmd", os.unlink, m / "rmd" / "a")
    _try(r, "rmdir lower dir", os.rmdir, m / "rmd")
    _try(r, "mkdir over whiteout", os.mkdir, m / "rmd")
    _try(r, "file in new rmd", (m / "rmd" / "b").write_bytes, b"b\n")
    _try(r, "unlink file for dir", os.unlink, m / "tofdir")
    _try(r, "dir where file was", os.mkdir, m / "tofdir")
    _try(r, "rename lower file", os.rename, m / "mvsrc", m / "mvdst")
    _try(r, "rename over lower file", os.rename, m / "mvover", m / "victim")
    _try(r, "rename new into lower dir", os.rename, m / "new.txt", m / "merged" / "new.txt")
    _try(r, "rename lower dir", os.rename, m / "ldir", m / "ldir2")
    _try(r, "rename merged dir", os.rename, m / "merged", m / "merged2")
    _try(r, "mkdir new", os.mkdir, m / "newdir")
    _try(r, "file in newdir", (m / "newdir" / "f").write_bytes, b"n\n")
    _try(r, "rename new dir", os.rename, m / "newdir", m / "newdir2")
    _try(r, "rename new dir into lower dir", os.rename, m / "newdir2", m / "d1" / "newdir")
    _try(r, "link lower", os.link, m / "hl_a", m / "hl_b")
    _try(r, "write through new link", _append, m / "hl_b", b"via hl_b\n")
    r.append(("hard link one file", (m / "hl_a").read_bytes(), os.lstat(m / "hl_a").st_nlink,
              os.lstat(m / "hl_a").st_ino == os.lstat(m / "hl_b").st_ino))
    _try(r, "write lower hard link", _append, m / "pre1", b"via pre1\n")
    r.append(("lower hard link broken", (m / "pre2").read_bytes(), os.lstat(m / "pre1").st_nlink,
              os.lstat(m / "pre2").st_nlink))
    _try(r, "symlink", os.symlink, "file", m / "sl")
    r.append(("readlink lower", os.readlink(m / "lsym")))
    _try(r, "mkfifo", os.mkfifo, m / "fifo")
    _try(r, "mkfifo in lower dir", os.mkfifo, m / "d1" / "fifo")
    _try(r, "mknod whiteout", os.mknod, m / "forged", stat.S_IFCHR | 0o644, os.makedev(0, 0))
    _try(r, "set opaque by hand", os.setxattr, m / "d2", b"trusted.overlay.opaque", b"y")
    r.append(("d2 still merged", sorted(os.listdir(m / "d2"))))
    r.append(("escaped xattr reads back", os.getxattr(m / "d2", b"trusted.overlay.opaque")))
    _try(r, "set user opaque by hand", os.setxattr, m / "d3", b"user.overlay.opaque", b"y")
    r.append(("d3 still merged", sorted(os.listdir(m / "d3")), os.getxattr(m / "d3", b"user.overlay.opaque")))
    _try(r, "write ino file", _append, m / "inofile", b"more\n")
    r.append(("st_ino kept across copy-up", os.lstat(m / "inofile").st_ino == ino))
    r.append(("hidden", os.path.lexists(m / "hidden"), sorted(os.listdir(m / "opq"))))
    _try(r, "chmod lower fifo", os.chmod, m / "lfifo", 0o600)
    _try(r, "chown lower device", os.chown, m / "lnull", USER_A, GROUP_A)
    _try(r, "chmod in lower dir", os.chmod, m / "cdir" / "cfile", 0o600)
    r.append(("copy-up keeps times", [os.lstat(m / n).st_mtime_ns == MTIME_NS
                                      for n in ("owned", "xf", "modes", "lsym", "lfifo", "cdir")]))
    _try(r, "append big lower file", _append, m / "big", b"end\n")
    _try(r, "link from lower dir", os.link, m / "ldir" / "tolink", m / "linked")
    _try(r, "unlink first name", os.unlink, m / "ldir" / "tolink")
    r.append(("link count after unlink", os.lstat(m / "linked").st_nlink))
    _try(r, "mkdir to replace empty lower dir", os.mkdir, m / "ndir")
    _try(r, "rename over empty lower dir", os.rename, m / "ndir", m / "edir")
    _try(r, "empty merged dir", os.unlink, m / "edir2" / "x")
    _try(r, "mkdir to replace merged dir", os.mkdir, m / "srcd")
    _try(r, "file in it", (m / "srcd" / "f").write_bytes, b"f")
    _try(r, "rename over emptied merged dir", os.rename, m / "srcd", m / "edir2")
    _try(r, "file in opaque dir", (m / "opq" / "new").write_bytes, b"")
    _try(r, "unlink in opaque dir", os.unlink, m / "opq" / "new")
    _try(r, "unlink lower in opaque dir", os.unlink, m / "opq" / "above")
    _try(r, "create for exchange", (m / "xb").write_bytes, b"new\n")
    _try(r, "exchange lower file", _exchange, m, "xa", m, "xb")
    _try(r, "exchange with missing", _exchange, m, "xa", m, "nothing")
    _try(r, "mkdir for exchange", os.mkdir, m / "xnew")
    _try(r, "exchange lower dir", _exchange, m, "xdir", m, "xnew")
    _try(r, "exchange new dir and file", _exchange, m, "xnew", m / "merged", "from_l2")
    r.append(("exchanged", (m / "xa").read_bytes(), (m / "xb").read_bytes(),
              sorted(os.listdir(m / "merged"))))
    return r


def _xattrs(path: str, skip: frozenset = frozenset()) -> list[tuple[bytes, bytes]]:
    out = []
    for name in os.listxattr(path, follow_symlinks=False):
        key = os.fsencode(name)
        if key.startswith(b"security.") or key in skip:
            continue
        out.append((key, os.getxattr(path, name, follow_symlinks=False)))
    return sorted(out)


def snapshot(top: Path, *, upper: bool = False) -> dict[str, tuple]:
    """What a merged view (or, with `upper`, an upper directory) holds: per relative path its type,
    mode, owner, size, link count, content or target, device number and extended attributes.

    For an upper directory the kernel's own markers (KERNEL_ONLY_XATTRS) are left out, and so is the
    link count of whiteouts (the kernel hard-links them all to one inode in its workdir).
    """
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            data: object = None
            if kind == stat.S_IFREG:
                with open(path, "rb") as f:
                    data = f.read()
            elif kind == stat.S_IFLNK:
                data = os.readlink(path)
            whiteout = kind == stat.S_IFCHR and st.st_rdev == 0
            nlink = None if upper and whiteout else st.st_nlink
            size = st.st_size
            out[os.path.relpath(path, top)] = (
                stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, nlink, data, st.st_rdev,
                _xattrs(path, KERNEL_ONLY_XATTRS if upper else frozenset()))
    return out


def differences(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two snapshots (empty when they are equal)."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return lines
