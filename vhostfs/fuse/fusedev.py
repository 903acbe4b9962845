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
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from vhostfs import native
from vhostfs.fuse import abi
from vhostfs.fuse.filesystem import Filesystem
from vhostfs.fuse.server import FuseServer
from vhostfs.iov import Reader, Writer

log = logging.getLogger("vhostfs.fuse.dev")

#: fuse.h: #define FUSE_DEV_IOC_CLONE _IOR(FUSE_DEV_IOC_MAGIC, 0, uint32_t), magic 229.
FUSE_DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

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


class FuseDevSession:
    """Serves `server` (a FuseServer) on the /dev/fuse fd `fd` with `threads` worker threads.

    `max_write` sizes the request buffers (max_write + 4096 + header each); it must be at least the
    `server`'s own max_write, which is what the server offers the kernel at INIT (ValueError
    otherwise). Reply buffers hold the largest READ the kernel may ask for (max_pages pages, from the
    server's max_write and max_read) and the largest extended attribute.

    The session does not own `fd`: it closes only the clones it opens. `mountpoint`, when given, is
    what `stop` unmounts to end the workers; without it, `stop` only makes each worker exit after its
    next request, and the session ends when someone unmounts the file system. `upgradable` sessions
    read the fd non-blocking, so that `handover` can pause their workers.
    """

    def __init__(self, server: FuseServer, fd: int, *, threads: int = 4, max_write: int = 1 << 20,
                 mountpoint: str | None = None, upgradable: bool = False) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if server.max_write > max_write:
            raise ValueError(f"the server offers {server.max_write}-byte writes, buffers hold {max_write}")
        self.server = server
        self.fd = fd
        self.threads = threads
        self.max_write = max_write
        self.mountpoint = mountpoint
        self.upgradable = upgradable
        self._request_size = max_write + _REQUEST_OVERHEAD
        # The server announces max_pages as 4 KiB units of its larger transfer size, and the kernel
        # counts them in its own pages.
        pages = -(-max(server.max_write, server.max_read or 0) // 4096)
        self._reply_size = abi.OUT_HEADER.size + max(pages * _PAGE, _XATTR_SIZE_MAX)
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._error: OSError | None = None
        # Live upgrade (`handover`): the workers park between requests while `_paused`; `_wake` gets
        # them out of their poll; once `_handed_over` they leave without unmounting.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._cond = threading.Condition()
        self._paused = False
        self._parked = 0
        self._workers = 0
        self._handed_over = False

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
        finally:
            if any(worker.is_alive() for worker in workers):
                # Interrupted (KeyboardInterrupt in join): take the mount down before leaving.
                self.stop()
                for worker in workers:
                    worker.join()
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
            if not self.upgradable or self._stopping or self._paused or self._handed_over:
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
                    # Nothing to read: wait for a request, or for a handover to wake us.
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


def serve_filesystem(fs: Filesystem, mountpoint: str, *, threads: int = 4, foreground: bool = True,
                     max_write: int = 1 << 20, upgrade_socket: str | None = None,
                     take_over: str | None = None, **mount_opts: Any) -> None:
    """Mounts `fs` at `mountpoint` over /dev/fuse and serves it until it is unmounted, then returns.

    `mount_opts` are `mount`'s keyword arguments (fsname, subtype, allow_other, default_permissions,
    options). Called from the main thread, SIGTERM and SIGINT unmount the file system (and so end
    the serving) while it runs; the previous handlers are restored afterwards. `fs.destroy()` is
    called when the session ends.

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
        fd = _take_over(server, take_over)
    else:
        fd = mount(mountpoint, **mount_opts)
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
            _serve(server, fd, mountpoint, threads, max_write, upgrade_socket)
        except BaseException:
            log.exception("serving %s failed", mountpoint)
            os._exit(1)
        os._exit(0)
    _serve(server, fd, mountpoint, threads, max_write, upgrade_socket)


def _take_over(server: FuseServer, path: str) -> int:
    """The /dev/fuse fd of the mount served on upgrade socket `path`, its session loaded into `server`."""
    from vhostfs.fuse import upgrade

    fd, state, conn = upgrade.take_over(path)
    try:
        server.load_state(state)
    except (ValueError, OSError) as exc:
        os.close(fd)
        upgrade.answer(conn, str(exc))
        raise
    upgrade.answer(conn, None)
    log.info("took over the mount served on %s (%d bytes of session state)", path, len(state))
    return fd


def _serve(server: FuseServer, fd: int, mountpoint: str, threads: int, max_write: int,
           upgrade_socket: str | None = None) -> None:
    session = FuseDevSession(server, fd, threads=threads, max_write=max_write, mountpoint=mountpoint,
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
