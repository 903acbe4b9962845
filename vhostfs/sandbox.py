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

Without root (user_namespaces(7)): the namespace sandbox starts with a new user namespace, in which the
process holds every capability, and goes on as above. The ID mapping is --uid-map/--gid-map, or by
default the caller's own ID as 0 plus the caller's subordinate IDs (/etc/subuid, /etc/subgid) as 1 and
up where it has some, or else just the caller's own ID as itself (virtiofsd's default). A mapping other
than one line for the caller's own ID needs newuidmap(1)/newgidmap(1) (Debian's uidmap package),
which are setuid root and check the subordinate ID files. They must run outside the new namespace, so
a helper process forked before unshare(CLONE_NEWUSER) writes the maps, then reports back over a pipe.
The outer process keeps its IDs (it removes the socket at the end); the daemon becomes the
namespace's root where 0 is mapped. chroot needs root (CAP_SYS_CHROOT): use the namespace sandbox.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

from vhostfs import native
from vhostfs.fs.idmap import IdMapError, NamespaceMapping, check_namespace_mappings

log = logging.getLogger("vhostfs.sandbox")

MODES = ("namespace", "chroot", "none")

# <sched.h> and <sys/mount.h> (Linux).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
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
        #: The user namespace's (uid_map, gid_map), when the sandbox made one.
        self.user_namespace: tuple[list[NamespaceMapping], list[NamespaceMapping]] | None = None

    def describe(self) -> str:
        """Which sandbox and ID mapping are in force, for the start-up log line."""
        if self.mode == "none":
            where = "sandbox none (not confined)"
        else:
            where = f"sandbox {self.mode} (confined to {self.shared_dir})"
        if self.user_namespace is None:
            if os.geteuid() == 0:
                return f"{where}, host IDs"
            return f"{where}, running as uid {os.geteuid()} gid {os.getegid()}: files get those IDs"
        uids, gids = self.user_namespace
        return (f"{where}, user namespace uid {', '.join(map(str, uids))}; "
                f"gid {', '.join(map(str, gids))} (inside -> host)")

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


def _subordinate(path: str, name: str, own: int) -> tuple[int, int] | None:
    """The first range (start, count) of `path` (/etc/subuid, /etc/subgid) for user `name` or ID `own`."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(own)) and fields[1].isdigit() and fields[2].isdigit():
            if int(fields[2]) > 0:
                return int(fields[1]), int(fields[2])
    return None


def default_mappings(uid: int, gid: int, user: str) -> tuple[list[NamespaceMapping], list[NamespaceMapping]]:
    """The user namespace's mapping without --uid-map/--gid-map (see the module doc), per kind: the
    caller's ID as 0 plus its subordinate IDs from 1 where it has some, else its ID as itself."""
    maps = []
    for own, path in ((uid, "/etc/subuid"), (gid, "/etc/subgid")):
        sub = _subordinate(path, user, own)
        if sub is None:
            maps.append([NamespaceMapping(own, own, 1)])
        else:
            maps.append([NamespaceMapping(0, own, 1), NamespaceMapping(1, sub[0], sub[1])])
    return maps[0], maps[1]


def _needs_helper(mappings: Sequence[NamespaceMapping], own: int) -> bool:
    """Whether writing `mappings` needs newuidmap/newgidmap (anything but the caller's own ID once)."""
    return len(mappings) != 1 or mappings[0].outside != own or mappings[0].count != 1


def _write_maps(pid: int, uids: Sequence[NamespaceMapping], gids: Sequence[NamespaceMapping]) -> str | None:
    """Writes the maps of process `pid` (run outside its new user namespace); the error or None."""
    for kind, mappings, own in (("uid", uids, os.geteuid()), ("gid", gids, os.getegid())):
        try:
            if _needs_helper(mappings, own):
                tool = f"new{kind}map"
                argv = [tool, str(pid)] + [str(v) for m in mappings for v in (m.inside, m.outside, m.count)]
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if done.returncode:
                    return f"{' '.join(argv)}: {done.stderr.strip() or f'exit status {done.returncode}'}"
            else:
                if kind == "gid":
                    # An unprivileged gid_map needs setgroups(2) denied first (user_namespaces(7)).
                    with open(f"/proc/{pid}/setgroups", "w") as f:
                        f.write("deny")
                m = mappings[0]
                with open(f"/proc/{pid}/{kind}_map", "w") as f:
                    f.write(f"{m.inside} {m.outside} 1\n")
        except OSError as e:
            return f"writing the {kind} map: {e}"
    return None


def _enter_user_namespace(uids: list[NamespaceMapping], gids: list[NamespaceMapping]) -> None:
    """Moves the calling process into a new user namespace with `uids` and `gids` mapped; raises
    SandboxError saying what to change where the machine does not allow it."""
    for kind, mappings, own in (("uid", uids, os.geteuid()), ("gid", gids, os.getegid())):
        tool = f"new{kind}map"
        if _needs_helper(mappings, own) and shutil.which(tool) is None:
            raise SandboxError(
                f"--sandbox=namespace without root: mapping {kind}s {', '.join(map(str, mappings))} needs "
                f"{tool} (Debian: apt install uidmap), or pass --{kind}-map=:{own}:{own}:1: to map only "
                f"your own {kind}")
    to_helper_r, to_helper_w = os.pipe()
    from_helper_r, from_helper_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    # The helper keeps the signals blocked (see prepare): it ends by itself once the pipe closes.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    helper = os.fork()
    if helper:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    else:
        # The helper: wait until the parent has its namespace, write the maps, report, exit.
        status = 1
        try:
            os.close(to_helper_w)
            os.close(from_helper_r)
            if os.read(to_helper_r, 1) == b"m":
                error = _write_maps(os.getppid(), uids, gids)
                os.write(from_helper_w, (error or "").encode()[:4000] or b"ok")
                status = 0
        finally:
            os._exit(status)
    os.close(to_helper_r)
    os.close(from_helper_w)
    try:
        try:
            native.unshare(CLONE_NEWUSER)
        except OSError as e:
            hint = ("this kernel or machine does not allow unprivileged user namespaces: allow them "
                    "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor's "
                    "kernel.apparmor_restrict_unprivileged_userns) or pass --sandbox=none")
            if e.errno == errno.EINVAL:
                hint = "the daemon has more than one thread, which unshare(CLONE_NEWUSER) refuses"
            raise SandboxError(f"--sandbox=namespace without root: cannot create a user namespace: "
                               f"{e.strerror} ({hint})") from e
        os.write(to_helper_w, b"m")
        reply = os.read(from_helper_r, 4096).decode(errors="replace")
    finally:
        os.close(to_helper_w)
        os.close(from_helper_r)
        os.waitpid(helper, 0)
    if reply != "ok":
        raise SandboxError(f"--sandbox=namespace without root: cannot map IDs into the user namespace: "
                           f"{reply or 'the helper process failed'} (check /etc/subuid and /etc/subgid, or "
                           f"pass --uid-map/--gid-map with IDs you own)")


def prepare(mode: str, shared_dir: str, cleanup: Callable[[], None], uid_map: Sequence[str] = (),
            gid_map: Sequence[str] = ()) -> Sandbox:
    """First step of entering sandbox `mode` (see the module doc); raises SandboxError.

    In namespace mode the calling process becomes the outer one and never returns from here: it
    exits with the daemon's status after calling `cleanup`. The daemon (the child) continues.
    `uid_map` and `gid_map` are --uid-map/--gid-map lines (":inside:outside:count:"), only for the
    namespace sandbox of a daemon started without root.
    """
    if mode not in MODES:
        raise SandboxError(f"unknown sandbox mode {mode!r}")
    root = os.geteuid() == 0
    try:
        uids = [NamespaceMapping.parse(text, "--uid-map") for text in uid_map]
        gids = [NamespaceMapping.parse(text, "--gid-map") for text in gid_map]
        check_namespace_mappings(uids, "--uid-map")
        check_namespace_mappings(gids, "--gid-map")
    except IdMapError as e:
        raise SandboxError(str(e)) from None
    if (uids or gids) and (root or mode != "namespace"):
        raise SandboxError("--uid-map/--gid-map place a daemon started without root in a user namespace: "
                           "they need --sandbox=namespace and no root (as root, use --translate-uid/"
                           "--translate-gid)")
    if mode == "chroot" and not root:
        raise SandboxError("--sandbox=chroot needs root (CAP_SYS_CHROOT): use --sandbox=namespace, which "
                           "works without root, or --sandbox=none")
    sandbox = Sandbox(mode, shared_dir)
    if mode != "namespace":
        return sandbox
    if not root:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = str(os.geteuid())
        default_uids, default_gids = default_mappings(os.geteuid(), os.getegid(), user)
        uids = uids or default_uids
        gids = gids or default_gids
        _enter_user_namespace(uids, gids)
        sandbox.user_namespace = (uids, gids)
    try:
        native.unshare(CLONE_NEWPID)
    except OSError as e:
        raise SandboxError(f"--sandbox=namespace: unshare: {e} (try --sandbox=chroot or none)") from e
    sys.stdout.flush()
    sys.stderr.flush()
    # SIGTERM and the like are blocked across fork(2): in the child, Python runs its after-fork
    # callbacks (logging's) first, and a SystemExit the handler raises there would be dropped with
    # the signal. Unblocked again, a pending one is handled where it can end the start-up.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    pid = os.fork()
    if pid:
        _supervise(pid, cleanup, mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if sandbox.user_namespace is not None:
        # The daemon is the namespace's root where 0 is mapped (it then creates files as any mapped
        # ID, as root does on the host); it keeps every capability of the namespace either way.
        for set_ids in (os.setresgid, os.setresuid):
            try:
                set_ids(0, 0, 0)
            except OSError:
                log.debug("0 is not mapped in the user namespace: the daemon keeps its IDs")
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


def _supervise(pid: int, cleanup: Callable[[], None], mask: set[signal.Signals]) -> None:
    """The outer process: forwards signals to the daemon `pid`, reaps it, cleans up, exits as it did.
    The forwarded signals are blocked on entry; `mask` is the signal mask to restore once they are
    handled here (one that came meanwhile is forwarded then)."""
    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # waitpid has reaped it already, and Python runs the handler only after that

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
