"""The daemon's sandbox, as virtiofsd's --sandbox: namespace, chroot or none.

It lives at the top of the package, not under fs/, because it changes the whole process, not the
file system code: the command line calls it between listening on the socket and serving (see
docs/architecture.md, "Security model").

Entering happens in two steps around building the file system, because the passthrough must open the
share and /proc/self/fd while they can still be named by path:

1. `prepare(mode, shared_dir)`. namespace: unshare(2) a new pid namespace and fork once, as
   unshare(CLONE_NEWPID) only puts *children* in it; the child then unshares new mount and network
   namespaces of its own. The parent stays outside all three: it forwards SIGTERM, SIGINT and SIGHUP
   to the child, waits for it, runs the cleanup it was given (removing the socket and its lock file,
   which the child can no longer name) and exits with the child's status; `prepare` never returns
   in the parent. The child, pid 1 of its namespace, makes
   every mount private to it (MS_SLAVE, so nothing it mounts reaches the host), mounts a fresh proc on
   /proc (so /proc/self is itself) and bind-mounts the share onto itself (pivot_root needs a mount
   point). chroot and none: nothing yet.
2. The caller builds the file system (it opens the share and /proc/self/fd).
3. `lock_down()`. namespace: pivot_root(2) into the share and detach the old root, so no path the
   daemon can name leads outside the share; the held /proc/self/fd stays usable. chroot: chroot(2)
   into the share (for containers, where new namespaces are often not allowed). none: nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from vhostfs import native

log = logging.getLogger("vhostfs.sandbox")

MODES = ("namespace", "chroot", "none")

# <sched.h> and <sys/mount.h> (Linux).
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

#: Signals the outer process passes on to the sandboxed daemon.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SandboxError(Exception):
    """The sandbox could not be set up (the daemon must not serve unconfined instead)."""


class Sandbox:
    """A prepared sandbox: `lock_down()` finishes it once the file system is built."""

    def __init__(self, mode: str, shared_dir: str) -> None:
        self.mode = mode
        self.shared_dir = os.path.realpath(shared_dir)

    def lock_down(self) -> None:
        """Confines the process to the share: pivot_root (namespace) or chroot; raises SandboxError."""
        if self.mode != "none":
            # glibc loads libgcc_s when a thread first exits (to unwind it), by a path the sandbox no
            # longer has; loaded now, it is found among the loaded libraries.
            try:
                ctypes.CDLL("libgcc_s.so.1")
            except OSError:
                log.warning("libgcc_s.so.1 not found: threads may fail to exit in the sandbox")
        try:
            if self.mode == "namespace":
                os.chdir(self.shared_dir)
                # pivot_root(".", "."): the old root ends up under the new one, then is detached.
                native.pivot_root(b".", b".")
                native.umount2(b".", MNT_DETACH)
                os.chdir("/")
            elif self.mode == "chroot":
                os.chroot(self.shared_dir)
                os.chdir("/")
        except OSError as e:
            raise SandboxError(f"--sandbox={self.mode}: cannot enter {self.shared_dir}: {e}") from e
        if self.mode != "none":
            log.info("sandbox %s: confined to %s", self.mode, self.shared_dir)


def prepare(mode: str, shared_dir: str, cleanup: Callable[[], None]) -> Sandbox:
    """First step of entering sandbox `mode` (see the module doc); raises SandboxError.

    In namespace mode the calling process becomes the outer one and never returns from here: it
    exits with the daemon's status after calling `cleanup`. The daemon (the child) continues.
    """
    if mode not in MODES:
        raise SandboxError(f"unknown sandbox mode {mode!r}")
    sandbox = Sandbox(mode, shared_dir)
    if mode != "namespace":
        return sandbox
    try:
        native.unshare(CLONE_NEWPID)
    except OSError as e:
        raise SandboxError(f"--sandbox=namespace: unshare: {e} (try --sandbox=chroot or none)") from e
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        _supervise(pid, cleanup)
    try:
        # The mount and network namespaces are the child's alone: pivot_root moves the root of every
        # process in the mount namespace, and the outer process must keep naming the socket's path.
        native.unshare(CLONE_NEWNS | CLONE_NEWNET)
        null = native.ffi.NULL
        native.mount(null, b"/", null, MS_SLAVE | MS_REC, null)
        native.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, null)
        share = os.fsencode(sandbox.shared_dir)
        native.mount(share, share, null, MS_BIND | MS_REC, null)
    except OSError as e:
        raise SandboxError(f"--sandbox=namespace: setting up mounts: {e}") from e
    return sandbox


def _supervise(pid: int, cleanup: Callable[[], None]) -> None:
    """The outer process: forwards signals to the daemon `pid`, reaps it, cleans up, exits as it did."""
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 1 << 8
            break
    try:
        cleanup()
    finally:
        code = os.waitstatus_to_exitcode(status)
        # Killed by a signal: exit as a shell reports it (128 + signal number).
        os._exit(code if code >= 0 else 128 - code)
