"""The /dev/fuse transport: the FUSE server answering the host kernel's own FUSE client.

`mount` attaches a FUSE file system to a directory and returns the /dev/fuse fd that carries its
requests; `FuseDevSession` serves a `FuseServer` on that fd from worker threads; `serve_filesystem`
does both for any `Filesystem` and returns once the file system is unmounted. `unmount` detaches it.

As root the mount is a plain mount(2). Other users go through the set-user-ID helper fusermount3
(Debian package fuse3): it opens /dev/fuse, mounts, and passes the fd back over the socket named by
the `_FUSE_COMMFD` environment variable, as an SCM_RIGHTS message.

Every worker reads whole requests, one per read(2), into its own buffer and writes the reply with one
write(2) on the same fd: the kernel matches a reply to the request read from that fd (a cloned fd has
its own list of requests being processed).

FUSE passthrough (`Backing`, docs/fuse-passthrough.md): where the file system offers the host fd of
an open file (`Open.backing_fd`), the session registers it with the kernel (FUSE_DEV_IOC_BACKING_OPEN)
and the kernel then reads, writes and mmaps the host file itself. The kernel allows this only to a
process with CAP_SYS_ADMIN in the initial user namespace; without it the session serves file data
itself, as it does for any file the kernel refuses.

FUSE over io_uring (`io_uring`, vhostfs.fuse.uring): where the kernel offers it, requests and replies
travel on per-CPU io_uring queues after INIT, and the /dev/fuse workers only see what the kernel still
sends there (FORGET, INTERRUPT) and serve everything when the rings cannot be used.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from vhostfs import native
from vhostfs.fuse import abi, uring
from vhostfs.fuse.filesystem import Filesystem
from vhostfs.fuse.server import FuseServer
from vhostfs.iov import Reader, Writer

log = logging.getLogger("vhostfs.fuse.dev")

#: fuse.h: #define FUSE_DEV_IOC_CLONE _IOR(FUSE_DEV_IOC_MAGIC, 0, uint32_t), magic 229.
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0
#: fuse.h (7.40) struct fuse_backing_map: fd, flags, padding.
BACKING_MAP = struct.Struct("<iIQ")
assert BACKING_MAP.size == 16
#: _IOW(FUSE_DEV_IOC_MAGIC, 1, struct fuse_backing_map): returns the new backing id.
FUSE_DEV_IOC_BACKING_OPEN = (1 << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
#: _IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t): the backing id to close.
FUSE_DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2
BACKING_ID = struct.Struct("<I")
_CAP_SYS_ADMIN = 21

# mount(2) flags (linux/mount.h) and umount2(2) flags.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1 << 10
MS_NODIRATIME = 1 << 11
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_FORCE = 1
MNT_DETACH = 2

#: Mount options that are mount(2) flags, not FUSE options: name -> (flag, set it?).
_FLAG_OPTIONS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
}
# Set-user-ID programs and device nodes of a user-supplied file system are not honoured unless
# asked for (fusermount3 forces the same for non-root users).
_DEFAULT_FLAGS = MS_NOSUID | MS_NODEV
#: Options mount() writes itself from its arguments; the caller may not pass them in `options`.
_RESERVED = frozenset({"fd", "rootmode", "user_id", "group_id", "fsname", "subtype"})

# The largest extended attribute value or list (XATTR_SIZE_MAX): GETXATTR/LISTXATTR ask up to this.
_XATTR_SIZE_MAX = 1 << 16
# Room for the headers in front of a WRITE payload (fuse_in_header + fuse_write_in are 80 bytes);
# the kernel refuses reads into buffers smaller than 8192 bytes or than max_write plus these.
_REQUEST_OVERHEAD = 4096 + abi.IN_HEADER.size
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _fusermount() -> str:
    path = shutil.which("fusermount3")
    if path is None:
        raise PermissionError(errno.EPERM, "mounting FUSE as a non-root user needs fusermount3 "
                                           "(Debian package fuse3), which is not installed")
    return path


def _split_options(options: str) -> tuple[int, list[str], list[str]]:
    """Splits a comma-separated option string into (mount flags, flag option names, other options)."""
    flags = _DEFAULT_FLAGS
    named: list[str] = []
    rest: list[str] = []
    for item in options.split(","):
        item = item.strip()
        if not item:
            continue
        if item.partition("=")[0] in _RESERVED:
            raise ValueError(f"mount option {item!r} is set by mount() itself")
        if item in _FLAG_OPTIONS:
            flag, on = _FLAG_OPTIONS[item]
            flags = flags | flag if on else flags & ~flag
            named.append(item)
        else:
            rest.append(item)
    return flags, named, rest


def mount(mountpoint: str, *, fsname: str = "vhostfs", subtype: str = "vhostfs",
          allow_other: bool | None = None, default_permissions: bool | None = None, options: str = "") -> int:
    """Mounts a FUSE file system of type fuse.`subtype` on directory `mountpoint`; returns its /dev/fuse fd.

    The fd (close-on-exec) carries the kernel's requests, starting with INIT; serve it with
    `FuseDevSession`. Closing it without serving aborts the connection (the mount then answers ENOTCONN).

    `allow_other` lets every user, not just the mounting one, use the file system; it defaults to on
    for root and off otherwise (fusermount3 allows it to others only with user_allow_other in
    /etc/fuse.conf). `default_permissions` makes the kernel check access against the file modes
    before asking the file system; it defaults to on. `options` is a comma-separated list of mount
    flags (ro, noexec, noatime, ...: nosuid and nodev are on unless "suid"/"dev" is given) and further
    FUSE options such as max_read=N; fd, rootmode, user_id, group_id, fsname and subtype are refused
    there (ValueError) because this function sets them.

    Raises OSError when the mount fails, PermissionError when a non-root caller has no fusermount3.
    """
    for what, value in (("fsname", fsname), ("subtype", subtype)):
        if not value or any(c in value for c in ", \t\n\\"):
            raise ValueError(f"{what} {value!r} must be non-empty, without commas, blanks or backslashes")
    if not stat.S_ISDIR(os.stat(mountpoint).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory", mountpoint)
    root = os.geteuid() == 0
    flags, named, rest = _split_options(options)
    if allow_other is None:
        allow_other = root
    if default_permissions is None:
        default_permissions = True
    for opt, on in (("allow_other", allow_other), ("default_permissions", default_permissions)):
        if opt in rest:
            rest.remove(opt)
        if on:
            rest.append(opt)
    if not root:
        fuse_options = [f"fsname={fsname}", f"subtype={subtype}", *named, *rest]
        return _fusermount_mount(mountpoint, ",".join(fuse_options))
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                         *rest])
        native.mount(fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(), flags,
                     data.encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fusermount_mount(mountpoint: str, options: str) -> int:
    """Mounts through fusermount3 and receives the /dev/fuse fd it opened over a socketpair."""
    helper = _fusermount()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            done = subprocess.run([helper, "-o", options, "--", mountpoint], env=env,
                                  pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Our copy of the helper's end is closed, so this sees end-of-file if nothing was sent.
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if done.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise OSError(errno.EIO, f"fusermount3 could not mount {mountpoint}: {message}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmounts the file system at `mountpoint` (`lazy`: detach now, finish when no longer busy).

    Root uses umount2(2); others fusermount3 -u. Raises OSError (EBUSY while files are open, unless
    `lazy`; EINVAL when nothing is mounted there).
    """
    if os.geteuid() == 0:
        native.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0)
        return
    done = subprocess.run([_fusermount(), "-u", *(["-z"] if lazy else []), "--", mountpoint],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise OSError(errno.EINVAL, f"fusermount3 could not unmount {mountpoint}: {message}")


def _detach(mountpoint: str) -> None:
    """Unmounts as cleanly as possible; as root, in any case so that the serving workers get ENODEV.

    A busy mount is detached: as root after aborting its connection, otherwise (fusermount3 -u -z)
    served on until its last open file is closed.
    """
    try:
        unmount(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY and os.geteuid() == 0:
            log.warning("unmounting %s: %s", mountpoint, exc)
            return
    if os.geteuid() == 0:
        # Files are still open. For FUSE, MNT_FORCE aborts the connection (fuse_umount_begin), which
        # fails the pending and future requests and ends the workers' reads; it usually stays busy, so
        # the mount is then detached.
        try:
            native.umount2(os.fsencode(mountpoint), MNT_FORCE)
            return
        except OSError:
            pass
    try:
        unmount(mountpoint, lazy=True)
    except OSError as exc:
        log.warning("lazy unmount of %s: %s", mountpoint, exc)


def passthrough_allowed() -> tuple[bool, str]:
    """Whether this process may register backing files (FUSE passthrough), and if not, why.

    fs/fuse/backing.c checks capable(CAP_SYS_ADMIN): the capability in the initial user namespace,
    which a process in a user namespace of its own never has.
    """
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        with open("/proc/self/uid_map") as f:
            initial_ns = f.read().split() == ["0", "0", "4294967295"]
    except (OSError, StopIteration, ValueError) as exc:
        return False, f"the capabilities cannot be read ({exc})"
    if not caps >> _CAP_SYS_ADMIN & 1:
        return False, "it needs CAP_SYS_ADMIN"
    if not initial_ns:
        return False, "it needs CAP_SYS_ADMIN in the initial user namespace, and this is another one"
    return True, ""


class Backing:
    """The backing files of one /dev/fuse connection (FUSE passthrough): a `BackingFiles` for FuseServer.

    One backing id per node, registered from the fd of the node's first passed-through handle and
    shared by the node's later ones (the kernel refuses two backing files for one inode), closed with
    the last of them (FUSE_DEV_IOC_BACKING_CLOSE). The kernel keeps its own reference to the host
    file for as long as files opened through the id are open, so closing the id never cuts I/O short.

    When the kernel refuses a registration the handle is served through the file system, and so are
    the node's other handles until the last of them is released (the kernel refuses a passed-through
    open next to a served one); the first refusal of each kind is logged once. EPERM (no
    CAP_SYS_ADMIN in the initial user namespace, or passthrough not negotiated) turns registration
    off for the rest of the session. Thread-safe.
    """

    def __init__(self, fd: int, max_stack_depth: int = 1) -> None:
        if max_stack_depth not in (1, 2):
            raise ValueError(f"max_stack_depth must be 1 or 2, not {max_stack_depth}")
        self.fd = fd
        self.max_stack_depth = max_stack_depth
        self._lock = threading.Lock()
        self._nodes: dict[int, list] = {}  # nodeid -> [backing id (None: refused), handles]
        self._handles: set[tuple[int, int]] = set()  # (nodeid, fh) of the handles counted
        self._refused: set[int] = set()
        self._off = False

    def __len__(self) -> int:
        """The backing ids open now."""
        with self._lock:
            return sum(entry[0] is not None for entry in self._nodes.values())

    def open(self, nodeid: int, fh: int, fd: int) -> int | None:
        """The backing id for handle `fh` of `nodeid`, registering `fd` if the node has none; None
        when the kernel refuses it (then the handle is served by the file system)."""
        with self._lock:
            if self._off:
                return None
            entry = self._nodes.get(nodeid)
            if entry is None:
                try:
                    backing_id = fcntl.ioctl(self.fd, FUSE_DEV_IOC_BACKING_OPEN,
                                             bytearray(BACKING_MAP.pack(fd, 0, 0)))
                except OSError as exc:
                    self._refuse(exc)
                    backing_id = None
                entry = self._nodes[nodeid] = [backing_id, 0]
            entry[1] += 1
            self._handles.add((nodeid, fh))
            return entry[0]

    def _refuse(self, exc: OSError) -> None:
        code = exc.errno or 0
        if code == errno.EPERM:
            self._off = True
        if code not in self._refused:
            self._refused.add(code)
            log.warning("the kernel refused a backing file (%s): %s", os.strerror(code),
                        "serving file data through the daemon from now on" if self._off
                        else "serving such files' data through the daemon")

    def release(self, nodeid: int, fh: int) -> None:
        """Drops the reference of handle `fh` of `nodeid`; the node's backing id closes with its last
        handle."""
        with self._lock:
            if (nodeid, fh) not in self._handles:
                return
            self._handles.discard((nodeid, fh))
            entry = self._nodes[nodeid]
            entry[1] -= 1
            if entry[1]:
                return
            del self._nodes[nodeid]
        if entry[0] is not None:
            self._close(entry[0])

    def clear(self) -> None:
        """Closes every backing id (the session ends)."""
        with self._lock:
            ids = [entry[0] for entry in self._nodes.values() if entry[0] is not None]
            self._nodes.clear()
            self._handles.clear()
        for backing_id in ids:
            self._close(backing_id)

    def _close(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self.fd, FUSE_DEV_IOC_BACKING_CLOSE, BACKING_ID.pack(backing_id))
        except OSError as exc:
            # ENODEV/ENOTCONN: the connection is gone, and the kernel freed its backing files with it.
            log.debug("closing backing id %d: %s", backing_id, exc)


class FuseDevSession:
    """Serves `server` (a FuseServer) on the /dev/fuse fd `fd` with `threads` worker threads.

    `max_write` sizes the request buffers (max_write + 4096 + header each); it must be at least the
    `server`'s own max_write, which is what the server offers the kernel at INIT (ValueError
    otherwise). Reply buffers hold the largest READ the kernel may ask for (max_pages pages, from the
    server's max_write and max_read) and the largest extended attribute.

    The session does not own `fd`: it closes only the clones it opens. `mountpoint`, when given, is
    what `stop` unmounts to end the workers; without it, `stop` only makes each worker exit after its
    next request, and the session ends when someone unmounts the file system.

    `passthrough` (FUSE passthrough, see `Backing`) gives the server a `Backing` on `fd` unless it has
    one already, so that open files the file system offers are passed through to the kernel; it is
    left off, with one log line, when the process lacks CAP_SYS_ADMIN in the initial user namespace.
    `max_stack_depth` is the stacking depth announced then (2 lets backing files live on overlayfs,
    but then this mount cannot be an overlayfs layer itself).

    `io_uring` offers FUSE_OVER_IO_URING at INIT when the kernel has it enabled and io_uring works
    (else one log line says why); once INIT is answered, one queue per possible CPU is registered,
    each served by `threads` / queues threads (at least one).

    `upgradable` sessions read the fd non-blocking, so that `handover` can pause their workers (not
    with io_uring, whose queues cannot be handed over).
    """

    def __init__(self, server: FuseServer, fd: int, *, threads: int = 4, max_write: int = 1 << 20,
                 mountpoint: str | None = None, passthrough: bool = False, max_stack_depth: int = 1,
                 io_uring: bool = False, upgradable: bool = False) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if server.max_write > max_write:
            raise ValueError(f"the server offers {server.max_write}-byte writes, buffers hold {max_write}")
        self.server = server
        self.fd = fd
        self.threads = threads
        self.max_write = max_write
        self.mountpoint = mountpoint
        self._request_size = max_write + _REQUEST_OVERHEAD
        # The server announces max_pages as 4 KiB units of its larger transfer size, and the kernel
        # counts them in its own pages.
        pages = -(-max(server.max_write, server.max_read or 0) // 4096)
        self._reply_size = abi.OUT_HEADER.size + max(pages * _PAGE, _XATTR_SIZE_MAX)
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._error: OSError | None = None
        self.upgradable = upgradable
        # Live upgrade (`handover`): the workers park between requests while `_paused`; `_wake` gets
        # them out of their poll; once `_handed_over` they leave without unmounting.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._cond = threading.Condition()
        self._paused = False
        self._parked = 0
        self._workers = 0
        self._handed_over = False
        if passthrough and server.backing is None:
            allowed, why = passthrough_allowed()
            if allowed:
                server.backing = Backing(fd, max_stack_depth)
            else:
                log.info("FUSE passthrough is off: %s; file data goes through the daemon", why)
        self._uring: uring.UringQueues | None = None
        self._uring_checked = False
        if io_uring:
            why = uring.unavailable()
            if why is None:
                try:
                    queues = uring.possible_cpus()
                    payload = max(8192, server.max_write, pages * _PAGE)
                    self._uring = uring.UringQueues(fd, server.handle, payload, queues=queues,
                                                    threads_per_queue=max(1, threads // queues))
                except OSError as exc:
                    why = f"its rings cannot be set up ({exc.strerror})"
            if self._uring is None:
                log.info("FUSE over io_uring is off: %s; requests come through /dev/fuse", why)
            else:
                server.want |= abi.FUSE_OVER_IO_URING

    def serve(self) -> None:
        """Serves requests until the file system is unmounted or `stop` is called, then returns.

        Ends the server's session (`FuseServer.reset`, which calls `Filesystem.destroy`) on the way
        out: the kernel sends no DESTROY for a plain FUSE mount. Raises the OSError that made a
        worker give up (an unexpected read error), after stopping the others.
        """
        fds = [self.fd] + [self._clone() for _ in range(self.threads - 1)]
        if self.upgradable:
            # Non-blocking reads: a worker waits in poll(2), which a handover can wake (a worker
            # blocked in read(2) could not be stopped without unmounting). Blocking reads stay the
            # default: the kernel wakes one blocked reader per request, poll(2) wakes them all.
            for fd in set(fds):
                os.set_blocking(fd, False)
        self._workers = len(fds)
        workers = [threading.Thread(target=self._work, args=(fd,), name=f"fusedev-{i}", daemon=True)
                   for i, fd in enumerate(fds)]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if self._uring is not None:
                self._uring.join()
        finally:
            if any(worker.is_alive() for worker in workers):
                # Interrupted (KeyboardInterrupt in join): take the mount down before leaving.
                self.stop()
                for worker in workers:
                    worker.join()
                if self._uring is not None:
                    self._uring.join()
            if self._stopping:
                # A stop() on another thread (a signal's) may have ended the workers before it was
                # done: aborting a busy mount fails their reads at once, and the detach comes after.
                # Returning then would let the process exit with the file system still mounted.
                self._stopped.wait()
            for fd in set(fds) - {self.fd}:
                os.close(fd)
            os.close(self._wake)
            self.server.reset()
        if self._error is not None:
            raise self._error

    @property
    def handed_over(self) -> bool:
        """True once `handover` gave the session to a successor (the mount stays)."""
        return self._handed_over

    def handover(self, give: Callable[[int, bytes], bool], timeout: float = 30) -> bool:
        """Live upgrade: hands the running session to a successor without unmounting.

        The workers finish the requests they serve (requests waiting without bound, such as a
        blocking lock, are interrupted and answer EINTR) and park; the session is saved
        (`FuseServer.save_state`) and `give(fd, state)` passes the /dev/fuse fd and the state on.
        If it returns True the workers exit and `serve` returns, leaving the mount to the successor;
        otherwise (or when the session cannot be saved) they go on serving here. The kernel keeps
        the requests that arrive meanwhile queued for whoever reads the fd next.
        """
        with self._cond:
            if not self.upgradable or self._uring is not None or self._stopping or self._paused \
                    or self._handed_over:
                log.error("handover refused: %s", "the session uses io_uring" if self._uring is not None
                          else "the session cannot be handed over now")
                return False
            self._paused = True
        paused = time.monotonic()
        os.eventfd_write(self._wake, 1)
        ok = False
        try:
            self.server.interrupt_waits()
            with self._cond:
                if not self._cond.wait_for(lambda: self._parked == self._workers, timeout):
                    log.error("handover: %d of %d workers still busy after %s s",
                              self._workers - self._parked, self._workers, timeout)
                    return False
            try:
                state = self.server.save_state()
            except OSError as exc:
                log.error("handover: the session cannot be saved: %s", exc)
                return False
            ok = give(self.fd, state)
            if not ok:
                self.server.fs.resume_after_save()
            else:
                log.info("handover: %d bytes of session state; requests waited %.1f ms",
                         len(state), (time.monotonic() - paused) * 1e3)
            return ok
        finally:
            with self._cond:
                self._handed_over = ok
                self._paused = False
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                self._cond.notify_all()

    def _park(self) -> bool:
        """Waits while a handover is under way; False once the session was handed over."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self._paused:
                self._cond.wait()
            self._parked -= 1
            return not self._handed_over

    def stop(self) -> None:
        """Makes the workers exit: unmounts `mountpoint` (if the session has one) so that their reads
        fail with ENODEV, and returns once it is unmounted (or detached). Idempotent: a second call
        waits for the first to finish. Callable from any thread, but not from a signal handler that
        may interrupt `stop` itself."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if not first:
            self._stopped.wait()
            return
        try:
            if self.mountpoint is not None:
                _detach(self.mountpoint)
        finally:
            self._stopped.set()

    def _clone(self) -> int:
        """A new /dev/fuse fd attached to the session's connection, or the session fd if cloning fails.

        Separate fds let the kernel hand requests to the workers without one shared queue lock.
        """
        clone = -1
        try:
            clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(clone, FUSE_DEV_IOC_CLONE, self.fd.to_bytes(4, "little"))
            return clone
        except OSError as exc:
            if clone >= 0:
                os.close(clone)
            log.debug("cloning the /dev/fuse fd failed (%s): workers share the session fd", exc)
            return self.fd

    def _work(self, fd: int) -> None:
        request = bytearray(self._request_size)
        request_view = memoryview(request)
        reply_view = memoryview(bytearray(self._reply_size))
        handle = self.server.handle
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._stopping:
            if self._paused:
                if not self._park():
                    return
                continue
            try:
                n = os.readv(fd, [request])
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # unmounted, or the connection was aborted
                    return
                if exc.errno in (errno.ENOENT, errno.EINTR):
                    # ENOENT: the request was interrupted and withdrawn before it could be read.
                    continue
                if exc.errno == errno.EAGAIN:
                    # Nothing to read (a non-blocking fd): wait for a request, or for a handover.
                    poller.poll()
                    continue
                log.error("reading /dev/fuse failed: %s", exc)
                with self._lock:
                    self._error = self._error or exc
                self.stop()
                return
            length = handle(Reader([request_view[:n]]), Writer([reply_view]))
            if not length:
                continue
            try:
                os.write(fd, reply_view[:length])
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                # ENOENT: the request was interrupted and is gone; nobody waits for the reply.
                if exc.errno != errno.ENOENT:
                    log.error("the kernel refused a %d-byte reply: %s", length, exc)
            if not self._uring_checked and self.server.initialized:
                self._start_uring()

    def _start_uring(self) -> None:
        """After the INIT reply: registers the io_uring queues if INIT negotiated them."""
        with self._lock:
            if self._uring_checked:
                return
            self._uring_checked = True
            conn = self.server.conn
            if self._uring is None or conn is None:
                return
            if not conn.want & conn.capable & abi.FUSE_OVER_IO_URING:
                log.info("FUSE over io_uring is off: the kernel did not offer it at INIT")
                self._uring = None
                return
            log.info("FUSE over io_uring: %d queues", self._uring.queues)
            self._uring.start()


def serve_filesystem(fs: Filesystem, mountpoint: str, *, threads: int = 4, foreground: bool = True,
                     max_write: int = 1 << 20, passthrough: bool = False, io_uring: bool = False,
                     upgrade_socket: str | None = None, take_over: str | None = None,
                     **mount_opts: Any) -> None:
    """Mounts `fs` at `mountpoint` over /dev/fuse and serves it until it is unmounted, then returns.

    `mount_opts` are `mount`'s keyword arguments (fsname, subtype, allow_other, default_permissions,
    options); `passthrough` and `io_uring` are `FuseDevSession`'s. Called from the main thread,
    SIGTERM and SIGINT unmount the file system (and so end the serving) while it runs; the previous
    handlers are restored afterwards. `fs.destroy()` is called when the session ends.

    Live upgrade (vhostfs.fuse.upgrade): with `upgrade_socket`, a successor may take the mount over
    through that Unix socket; this call then returns with the file system still mounted. With
    `take_over`, nothing is mounted: the mount served by the server listening on that socket is
    taken over, its session loaded into `fs` (StateError or UpgradeError when that fails, and the
    old server goes on).

    With `foreground` False the process forks once the mount is in place: the parent returns at once,
    and the child, in a new session with its standard streams on /dev/null, serves and then exits
    with os._exit (status 0, or 1 after an error). `fs` then runs in the child, so it must hold no
    state bound to the parent process (such as an fd of /proc/self, which names the parent's pid).
    Raises OSError/ValueError when the mount fails.
    """
    mountpoint = os.path.abspath(mountpoint)
    server = FuseServer(fs, max_write=max_write)
    if take_over is not None:
        fd = _take_over(server, take_over, passthrough)
    else:
        fd = mount(mountpoint, **mount_opts)
    args = (server, fd, mountpoint, threads, max_write, passthrough, io_uring, upgrade_socket)
    if not foreground:
        if os.fork():
            os.close(fd)
            return
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        try:
            _serve(*args)
        except BaseException:
            log.exception("serving %s failed", mountpoint)
            os._exit(1)
        os._exit(0)
    _serve(*args)


def _take_over(server: FuseServer, path: str, passthrough: bool) -> int:
    """The /dev/fuse fd of the mount served on upgrade socket `path`, its session loaded into `server`."""
    from vhostfs.fuse import upgrade

    fd, state, conn = upgrade.take_over(path)
    try:
        if passthrough and passthrough_allowed()[0]:
            # Negotiated as the session was: with the backing files of this connection.
            server.backing = Backing(fd, 1)
        server.load_state(state)
    except (ValueError, OSError) as exc:
        os.close(fd)
        upgrade.answer(conn, str(exc))
        raise
    upgrade.answer(conn, None)
    log.info("took over the mount served on %s (%d bytes of session state)", path, len(state))
    return fd


def _serve(server: FuseServer, fd: int, mountpoint: str, threads: int, max_write: int,
           passthrough: bool, io_uring: bool, upgrade_socket: str | None = None) -> None:
    if io_uring and upgrade_socket is not None:
        # Requests on io_uring queues are bound to this process's rings: a handover could not pause
        # and pass them on.
        log.info("FUSE over io_uring is off: a mount that may be handed over (--upgrade-socket) "
                 "reads its requests from /dev/fuse")
        io_uring = False
    session = FuseDevSession(server, fd, threads=threads, max_write=max_write, mountpoint=mountpoint,
                             passthrough=passthrough, io_uring=io_uring,
                             upgradable=upgrade_socket is not None)
    listener = None
    if upgrade_socket is not None:
        from vhostfs.fuse.upgrade import UpgradeListener

        listener = UpgradeListener(upgrade_socket, session)

    def on_signal(signum: int, frame: object) -> None:
        # stop() takes a lock and unmounts; from a thread of its own, it can neither deadlock with a
        # stop() the signal interrupted nor hold up the main thread.
        log.info("signal %d: unmounting %s", signum, mountpoint)
        threading.Thread(target=session.stop, name="fusedev-stop", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        session.serve()
    finally:
        if listener is not None:
            listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(fd)
