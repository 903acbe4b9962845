"""The `vhostfs` command line: argument parsing, logging and wiring, nothing else.

The options follow virtiofsd's, so vhostfs can be launched wherever virtiofsd is (libvirt, scripts,
Cloud Hypervisor's docs): `vhostfs --socket-path=/tmp/vfs.sock --shared-dir=/srv`, the older
`-o source=/srv,cache=always` spellings, and `--fd=N` for a listening socket the launcher created.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import json
import logging
import logging.handlers
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from typing import Any

from vhostfs import __version__, sandbox, seccomp
from vhostfs.fs import passthrough
from vhostfs.fs.filehandles import INODE_FILE_HANDLES
from vhostfs.fs.passthrough import CACHE_POLICIES
from vhostfs.fs.vfs import MAX_MOUNTS

log = logging.getLogger("vhostfs")

CACHE_MODES = tuple(CACHE_POLICIES)
#: virtiofsd's old "-o cache=" names.
_CACHE_ALIASES = {"none": "never"}
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
              "trace": logging.DEBUG, "off": logging.CRITICAL + 10}


#: C virtiofsd `-o` options accepted without effect: the guest sees the same file system either way
#: (locking and write-back are the guest kernel's choices through FUSE_INIT flags, timeouts are
#: covered by cache=, the rest select optional protocol extensions the kernel may ask for).
_O_IGNORED = frozenset({"timeout", "norace", "allow_root"})
#: C virtiofsd `-o` options that change what the guest sees and that vhostfs does not implement.
_O_UNSUPPORTED = frozenset({"writeback_cache"})
#: C virtiofsd `-o` switches, each with a `no_` form, and the argument they set.
_O_SWITCHES = {
    "xattr": "xattr", "readdirplus": "readdirplus", "writeback": "writeback", "flock": "flock",
    "posix_lock": "posix_lock", "allow_direct_io": "allow_direct_io",
    "announce_submounts": "announce_submounts", "killpriv_v2": "killpriv_v2", "posix_acl": "posix_acl",
    "security_label": "security_label",
}
#: virtiofsd 1.14's negotiated features: --posix-acl[=never|auto|always], --security-label[=...]. The
#: plain switch (and its `-o` form) means "always", as there; its `no_` form "never".
NEGOTIATION_MODES = ("never", "auto", "always")
_NEGOTIATED = ("--posix-acl", "--security-label")


def _apply_o_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Maps the comma-separated `-o` options of the C virtiofsd onto their long options.

    Options vhostfs has no use for are collected in `args.ignored_o`; options it cannot honour and
    unknown ones are command-line errors.
    """
    args.ignored_o = []
    for group in args.o or []:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if apply_passthrough_o(parser, args, key, value):
                continue
            if key == "source":
                args.shared_dir = value
            elif key == "log_level":
                if value not in LOG_LEVELS:
                    parser.error(f"-o log_level={value}: expected one of {', '.join(LOG_LEVELS)}")
                args.log_level = value
            elif key == "sandbox":
                args.sandbox = value
            elif key == "modcaps":
                args.modcaps = value
            elif key in _O_IGNORED:
                # Tuning the guest would not notice: warned about once logging is set up.
                args.ignored_o.append(item)
            elif key in _O_UNSUPPORTED:
                parser.error(f"-o {key} is not supported by vhostfs")
            else:
                parser.error(f"unknown -o option {key!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostfs", description="Serve a host directory to virtual machines over virtio-fs (vhost-user).")
    p.add_argument("--socket-path", help="Unix socket to listen on for the VMM")
    p.add_argument("--socket", dest="socket_path", help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help="inherited, already listening socket fd (as libvirt passes it)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="give the socket to this group, readable and writable by it (mode 0660)")
    p.add_argument("--keep-listening", action="store_true",
                   help="serve the next front end after one disconnects (default: exit, like virtiofsd)")
    p.add_argument("--shared-dir", help="the host directory to share")
    p.add_argument("--mount", action="append", default=[], metavar="GUEST_PATH=HOST_DIR[:OPTIONS]",
                   help="share HOST_DIR at GUEST_PATH of one tree of several file systems (repeatable; "
                        "instead of --shared-dir). OPTIONS, comma-separated, override the passthrough "
                        "options for this mount: ro, cache=MODE, xattr, no_submount, ...; a last "
                        "':lowerdir=DIR[:DIR...]' serves an overlay of those read-only directories "
                        "(topmost first) under HOST_DIR, with userxattr among the OPTIONS if wanted")
    p.add_argument("--max-mounts", type=int, default=None, metavar="N",
                   help="how many file systems --mount and the control API may mount at once (default 256)")
    p.add_argument("--api-socket", metavar="PATH",
                   help="serve the control API (HTTP/JSON: mount, umount, list at run time) on this Unix "
                        "socket, for the daemon's owner only; see `vhostfs ctl`")
    p.add_argument("--tag", help="virtio-fs tag, served through the device configuration space")
    add_passthrough_options(p)
    add_overlay_options(p)
    p.add_argument("--dax-window-size", type=_size, default=0, metavar="SIZE",
                   help="enable DAX: the guest maps host files into a window of SIZE bytes (K, M, G "
                        "suffixes; a multiple of the page size) that the VMM sets up; default 0: off")
    p.add_argument("--record-vhost-user", metavar="FILE",
                   help="write one line per vhost-user message (both directions, the back-end channel "
                        "too) to FILE, for looking at a VMM's session (format: vhostfs/vhost_user/record.py)")
    p.add_argument("--rlimit-nofile", type=int, metavar="N",
                   help="set RLIMIT_NOFILE to N at start (0: leave it; default: raise it to "
                        "min(hard limit, 1000000))")
    p.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                   help="threads serving each request queue (default 0: the queue's own thread)")
    p.add_argument("--poll-us", type=_non_negative, default=2000, metavar="US",
                   help="poll a request queue that ran dry for up to US microseconds before sleeping: "
                        "a guest that waits on each reply gets the next one served sooner; the poll "
                        "shrinks while requests come later than that, and grows back when they come "
                        "sooner (default 2000; 0: sleep at once)")
    p.add_argument("--sandbox", choices=sandbox.MODES, default="namespace",
                   help="confine the daemon to the shared directory: namespace (default: new mount, pid "
                        "and net namespaces, pivot_root into it; without root inside a new user "
                        "namespace), chroot (for containers, root only), or none")
    p.add_argument("--uid-map", action="append", default=[], metavar=":INSIDE:OUTSIDE:COUNT:",
                   help="without root: map host UIDs OUTSIDE.. to INSIDE.. in the daemon's user namespace "
                        "(repeatable; newuidmap and /etc/subuid for any but your own UID; default: your "
                        "UID as 0 and your subordinate UIDs from 1, or only your UID as itself)")
    p.add_argument("--gid-map", action="append", default=[], metavar=":INSIDE:OUTSIDE:COUNT:",
                   help="the same for GIDs (newgidmap, /etc/subgid)")
    p.add_argument("--modcaps", metavar="+CAP:-CAP",
                   help="adjust the capabilities the daemon keeps, e.g. +sys_admin:-mknod (names with or "
                        "without CAP_, colon-separated, each with + to keep or - to drop)")
    p.add_argument("--seccomp", choices=("none", *seccomp.ACTIONS), default="kill",
                   help="system calls outside the daemon's list: kill the daemon (default), log them "
                        "(kernel audit log), trap (SIGSYS), or none (no filter)")
    p.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS))
    p.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user back-end capabilities as JSON and exit")
    p.add_argument("-o", action="append", metavar="OPTIONS", help="virtiofsd-style -o key=value,... options")
    p.add_argument("-f", "--foreground", action="store_true", help="accepted: vhostfs never daemonizes")
    p.add_argument("-d", "--debug", action="store_true", help="same as --log-level=debug")
    p.add_argument("-V", "--version", action="version", version=f"vhostfs {__version__}")
    return p


def apply_passthrough_o(parser: argparse.ArgumentParser, args: argparse.Namespace, key: str,
                        value: str) -> bool:
    """Applies the `-o key[=value]` item to `args` if it configures the passthrough (`cache=`,
    `xattrmap=` and the switches of _O_SWITCHES, with their `no_` forms) and returns whether it did.

    Shared by `vhostfs` and `vhostfs mount`, whose parsers have the options of add_passthrough_options.
    A bad `cache=` value is a command-line error.
    """
    if key == "cache":
        args.cache = _CACHE_ALIASES.get(value, value)
        if args.cache not in CACHE_MODES:
            parser.error(f"-o cache={value}: expected one of {', '.join(CACHE_MODES)}")
    elif key.removeprefix("no_") in _O_SWITCHES and not value:
        name = _O_SWITCHES[key.removeprefix("no_")]
        on = not key.startswith("no_")
        if "--" + name.replace("_", "-") in _NEGOTIATED:
            setattr(args, name, "always" if on else "never")
        else:
            setattr(args, name, on)
    elif key == "xattrmap":
        args.xattrmap = value
    else:
        return False
    return True


def add_passthrough_options(p: argparse.ArgumentParser) -> None:
    """Adds the options that configure the passthrough (see `passthrough_options`) to `p`: the same
    spellings for `vhostfs` and `vhostfs mount`. "The kernel" is the FUSE client: the guest's, or the
    host's own under `vhostfs mount`."""
    p.add_argument("--cache", default="auto", choices=CACHE_MODES,
                   help="how long the kernel may cache names, attributes and data (default: auto)")
    p.add_argument("--xattr", action="store_true", help="enable extended attributes")
    p.add_argument("--readonly", action="store_true", help="refuse every change to the shared directory")
    p.add_argument("--no-readdirplus", dest="readdirplus", action="store_false", default=None,
                   help="answer READDIR only, no READDIRPLUS (the default with --cache=never)")
    p.add_argument("--writeback", action="store_true",
                   help="let the kernel cache writes (FUSE_WRITEBACK_CACHE)")
    p.add_argument("--allow-direct-io", action="store_true",
                   help="pass O_DIRECT opens on to the host (default: dropped)")
    p.add_argument("--allow-mmap", action="store_true",
                   help="allow shared mmap even with --cache=never")
    p.add_argument("--announce-submounts", action="store_true",
                   help="show host mount points inside the share as submounts with their own st_dev")
    p.add_argument("--preserve-noatime", action="store_true", help="pass O_NOATIME opens on to the host")
    p.add_argument("--xattrmap", metavar="RULES",
                   help="rename, hide or refuse extended attributes, in virtiofsd's rule syntax")
    p.add_argument("--no-posix-lock", dest="posix_lock", action="store_false",
                   help="do not serve POSIX record locks (the kernel keeps them local)")
    p.add_argument("--no-flock", dest="flock", action="store_false",
                   help="do not serve flock(2) locks (the kernel keeps them local)")
    p.add_argument("--killpriv-v2", action="store_true",
                   help="clear set-user/group-ID bits as the kernel asks (FUSE_HANDLE_KILLPRIV_V2)")
    p.add_argument("--posix-acl", choices=NEGOTIATION_MODES, default="never", metavar="never|auto|always",
                   help="POSIX ACLs (FUSE_POSIX_ACL); implies --xattr. auto: where the kernel can, "
                        "always (the plain switch): the session fails where it cannot; never (default)")
    p.add_argument("--inode-file-handles", choices=INODE_FILE_HANDLES, default="never",
                   help="hold the files the kernel knows by file handles instead of open fds, so that "
                        "millions of them fit (needs CAP_DAC_READ_SEARCH); prefer: where the file system "
                        "can, mandatory: refuse to start otherwise (default: never for the daemon, as "
                        "virtiofsd; prefer for vhostfs mount). Without handles, idle fds are closed when "
                        "fds run short and the files found again by name")
    p.add_argument("--security-label", choices=NEGOTIATION_MODES, default="never",
                   metavar="never|auto|always",
                   help="set the security context the kernel gives a new file (FUSE_SECURITY_CTX) as an "
                        "extended attribute on the host file; implies --xattr. auto, always (the plain "
                        "switch), never (default) as for --posix-acl")
    p.add_argument("--translate-uid", action="append", default=[], metavar="TYPE:SOURCE:TARGET:COUNT",
                   help="translate UIDs between the kernel and the host, repeatable: guest:G:H:N, "
                        "host:H:G:N, squash-guest:G:H:N, squash-host:H:G:N, forbid-guest:G:N, map:G:H:N "
                        "(both ways); IDs no rule names stay as they are")
    p.add_argument("--translate-gid", action="append", default=[], metavar="TYPE:SOURCE:TARGET:COUNT",
                   help="the same for GIDs")
    p.add_argument("--migration-mode", choices=("find-paths", "file-handles"), default="find-paths",
                   help="how a migration destination (or a live upgrade's new server) finds the "
                        "kernel's files again: by their paths in the share (default), or by file "
                        "handles (needs CAP_DAC_READ_SEARCH and the same file system on both hosts)")
    p.add_argument("--migration-on-error", choices=("abort", "guest-error"), default="abort",
                   help="a file the destination cannot find again fails the migration (abort, default; "
                        "the guest goes on at the source), or only that file, whose requests get EIO")
    p.add_argument("--migration-verify-handles", action="store_true",
                   help="the destination checks by file handle that each file it found by path is the "
                        "source's own (the same shared directory on the same file system)")
    p.add_argument("--migration-confirm-paths", action="store_true",
                   help="the source checks each path once more before sending it, in case another "
                        "process renamed files in the share")


def negotiated_switches(argv: Sequence[str]) -> list[str]:
    """`argv` with each bare --posix-acl or --security-label spelled =always: their value must be
    given with "=" (as virtiofsd requires), so a following argument is never taken for one."""
    return [f"{arg}=always" if arg in _NEGOTIATED else arg for arg in argv]


def translate_maps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Replaces the --translate-uid/--translate-gid rule lists in `args` by checked `IdMap`s (None
    without rules); a rule that does not parse or overlaps another is a command-line error naming it."""
    from vhostfs.fs.idmap import IdMap, IdMapError

    try:
        args.translate_uid = IdMap(args.translate_uid, "--translate-uid") if args.translate_uid else None
        args.translate_gid = IdMap(args.translate_gid, "--translate-gid") if args.translate_gid else None
    except IdMapError as e:
        parser.error(str(e))


def add_overlay_options(p: argparse.ArgumentParser) -> None:
    """Adds the options that turn the shared directory into the upper layer of an overlay (see
    `shared_filesystem`): the same spellings for `vhostfs` and `vhostfs mount`."""
    p.add_argument("--overlay-lower", action="append", default=[], metavar="DIR",
                   help="serve an overlay: DIR is a read-only lower layer under the shared directory, "
                        "which becomes the writable upper layer, in the on-disk format of the kernel's "
                        "overlayfs; repeat for more layers, topmost first (as the kernel's lowerdir)")
    p.add_argument("--overlay-userxattr", action="store_true",
                   help="keep the overlay's markers in user.overlay.* extended attributes instead of "
                        "trusted.overlay.* (the kernel's userxattr option)")


def shared_filesystem(args: argparse.Namespace) -> Any:
    """The file system the options of add_passthrough_options and add_overlay_options describe: the
    passthrough of `args.shared_dir`, or with --overlay-lower, the overlay of the lower directories
    under it. Raises ValueError (or OSError) for a configuration that cannot be served."""
    if args.overlay_lower:
        from vhostfs.fs.overlay import OverlayFs

        return OverlayFs.from_dirs(args.shared_dir, args.overlay_lower, userxattr=args.overlay_userxattr,
                                   **passthrough_options(args))
    from vhostfs.fs.passthrough import Passthrough

    return Passthrough(args.shared_dir, **passthrough_options(args))


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def vfs_specs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """The parsed `--mount` options (see vhostfs.control.parse_mount_spec); a command-line error for
    a malformed one, or for --mount beside --shared-dir: a file system at / is alone in the tree."""
    from vhostfs import control

    if args.mount and args.shared_dir is not None:
        parser.error("--mount replaces --shared-dir (a directory at / would hide every other mount); "
                     "use --mount /=DIR only, or --mount GUEST_PATH=DIR for each")
    specs = []
    for text in args.mount:
        try:
            specs.append(control.parse_mount_spec(text))
        except ValueError as e:
            parser.error(str(e))
    for _, host, options in specs:
        for path in (host, *options.get("lowerdir", ())):
            if not os.path.isdir(path):
                parser.error(f"--mount: {path!r} is not a directory")
    return specs


def _trusted_overlay(args: argparse.Namespace) -> bool:
    """Whether the command line serves an overlay whose markers are trusted.* attributes."""
    if args.overlay_lower and not args.overlay_userxattr:
        return True
    return any(options.get("lowerdir") and not options.get("userxattr") for _, _, options in args.mounts)


def passthrough_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Passthrough keyword arguments that the options of add_passthrough_options set."""
    return {name: getattr(args, name) for name in (
        "cache", "readonly", "xattr", "readdirplus", "writeback", "allow_direct_io", "allow_mmap",
        "announce_submounts", "preserve_noatime", "xattrmap", "posix_lock", "flock", "killpriv_v2",
        "posix_acl", "inode_file_handles", "security_label", "migration_mode", "migration_on_error",
        "migration_verify_handles", "migration_confirm_paths", "translate_uid", "translate_gid")}


def _setup_logging(level: str, use_syslog: bool) -> None:
    handler: logging.Handler
    if use_syslog:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhostfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] [vhostfs] [%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])


def _listen(path: str, group: int | None = None) -> tuple[socket.socket, int]:
    """Listens on a Unix socket at `path`, guarded by a `<path>.pid` lock file.

    The socket is bound and set to listen under a temporary name in the same directory, then renamed
    to `path`: a front end that connects as soon as the path exists is never refused. The lock stops
    a second daemon from taking over a socket that is being served; a stale socket left by a daemon
    that died is replaced, anything else at `path` is an error. The socket is for its owner only
    (0600), or with a `group` gid, owned by that group too (0660).
    """
    pid_path = path + ".pid"
    lock_fd = os.open(pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise SystemExit(f"vhostfs: {path} is already served by another daemon (lock {pid_path})") from None
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            os.close(lock_fd)
            raise SystemExit(f"vhostfs: {path} exists and is not a socket")
    except FileNotFoundError:
        pass
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # Named through the directory fd, the temporary path stays short whatever the directory's length
    # (sockaddr_un.sun_path holds 108 bytes); the lock makes the name ours alone.
    temp = f".{name}.{os.getpid()}.new"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            sock.bind(f"/proc/self/fd/{dir_fd}/{temp}")
        finally:
            os.umask(old_umask)
        try:
            if group is not None:
                os.chown(temp, -1, group, dir_fd=dir_fd)
                os.chmod(temp, 0o660, dir_fd=dir_fd)
            sock.listen(1)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise
    except BaseException:
        sock.close()
        os.close(lock_fd)
        raise
    finally:
        os.close(dir_fd)
    return sock, lock_fd


def capabilities() -> dict:
    """The vhost-user back-end description (docs/interop/vhost-user.rst, "Backend program conventions").

    "separate-options" tells libvirt to pass --shared-dir, --cache, ... rather than one `-o` list;
    "migrate-precopy" that the back end migrates with the VM (its FUSE session travels as the
    device state, VHOST_USER_PROTOCOL_F_DEVICE_STATE), which libvirt requires of a virtiofs device;
    "posix-acl-negotiation-mode" and "security-label-negotiation-mode" that --posix-acl and
    --security-label take never|auto|always, as virtiofsd 1.14's do.
    """
    return {"type": "fs", "features": ["migrate-precopy", "posix-acl-negotiation-mode",
                                       "security-label-negotiation-mode", "separate-options"]}


_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    """A byte count such as 4096, 64M or 1G (binary units)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    digits = value.rstrip("kmgt")
    unit = value[len(digits):]
    if not digits.isdigit() or unit not in _SIZE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (like 4096, 64M or 1G)")
    size = int(digits) * _SIZE_SUFFIXES[unit]
    if size % os.sysconf("SC_PAGE_SIZE"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of the page size")
    return size


#: virtiofsd's default for --rlimit-nofile.
DEFAULT_RLIMIT_NOFILE = 1_000_000


def set_rlimit_nofile(requested: int | None) -> int:
    """Sets the soft RLIMIT_NOFILE as --rlimit-nofile asks and returns it.

    None (the default) raises the soft limit to min(hard limit, DEFAULT_RLIMIT_NOFILE) and never lowers
    it; 0 leaves it; N sets it to N, raising the hard limit too where the daemon may
    (CAP_SYS_RESOURCE), and the hard limit otherwise, with a warning. /proc/sys/fs/nr_open caps both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested == 0:
        return soft
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = DEFAULT_RLIMIT_NOFILE
    if hard == resource.RLIM_INFINITY:
        hard = nr_open
    if requested is None:
        target = min(hard, DEFAULT_RLIMIT_NOFILE, nr_open)
        if target <= soft:
            return soft
    else:
        target = min(requested, nr_open)
    if target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (OSError, ValueError):
            log.warning("--rlimit-nofile %d: the hard limit is %d and cannot be raised", target, hard)
            target = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)


class _Stop:
    """The SIGTERM/SIGINT handler once the daemon serves: it shuts the listening socket and the
    session's connection down, so that the accept or receive the main thread blocks in returns and
    the loop ends as on a disconnect. Raising SystemExit (as during set-up) could land in a finalizer
    or weakref callback, where the exception is dropped and the signal lost."""

    def __init__(self, listener: socket.socket) -> None:
        self.requested = False
        self.listener = listener
        self.conn: socket.socket | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True
        for sock in (self.listener, self.conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed, or a listener that was never connected


class _StartError(Exception):
    """Start-up failed: the daemon exits with this message, after removing its socket."""


class _SocketFiles:
    """The socket at `path` and, with `lock`, its lock file (None: an inherited socket, nothing to
    remove).

    The directory is held open so that the files can be removed after a chroot too.
    """

    def __init__(self, path: str | None, lock: bool = True) -> None:
        self.name = os.path.basename(path) if path is not None else ""
        self.lock = lock
        self.dir_fd = -1 if path is None else os.open(
            os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def remove(self) -> None:
        if self.dir_fd >= 0:
            for name in (self.name, self.name + ".pid") if self.lock else (self.name,):
                try:
                    os.unlink(name, dir_fd=self.dir_fd)
                except FileNotFoundError:
                    pass

    def disown(self) -> None:
        """Leaves the removal to another process (the namespace sandbox's outer one): `remove` does
        nothing from now on, and no directory fd outside the share stays open."""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _parse(argv: list[str]) -> tuple[argparse.Namespace, int | None, tuple]:
    """Parses and checks the command line and sets up logging; returns the arguments, the socket's
    group id (or None) and the capabilities to keep. Errors exit with status 2."""
    from vhostfs import caps

    parser = build_parser()
    args = parser.parse_args(negotiated_switches(argv))
    _apply_o_options(parser, args)
    translate_maps(parser, args)
    _setup_logging("debug" if args.debug else args.log_level, args.syslog)
    for item in args.ignored_o:
        log.warning("-o %s is accepted and has no effect", item)
    args.mounts = vfs_specs(parser, args)
    if args.shared_dir is None and not args.mounts:
        parser.error("--shared-dir (or -o source=DIR) or --mount is required")
    if args.max_mounts is not None and not 1 <= args.max_mounts <= MAX_MOUNTS:
        parser.error(f"--max-mounts must be 1..{MAX_MOUNTS}")
    if args.mounts and args.dax_window_size:
        parser.error("--dax-window-size serves one --shared-dir, not --mount")
    if (args.socket_path is None) == (args.fd is None):
        parser.error("exactly one of --socket-path (--socket) or --fd is required")
    if args.shared_dir is not None and not os.path.isdir(args.shared_dir):
        parser.error(f"shared directory {args.shared_dir!r} is not a directory")
    group = None
    if args.socket_group is not None:
        if args.socket_path is None:
            parser.error("--socket-group needs --socket-path (an inherited socket is the launcher's)")
        try:
            group = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            parser.error(f"--socket-group: no group named {args.socket_group!r}")
    if args.rlimit_nofile is not None and args.rlimit_nofile < 0:
        parser.error("--rlimit-nofile must not be negative")
    try:
        # open_by_handle_at(2) needs CAP_DAC_READ_SEARCH (file handles: --inode-file-handles, and a
        # destination of --migration-mode file-handles), and an overlay's trusted.overlay.* markers
        # CAP_SYS_ADMIN (unless --overlay-userxattr).
        keep_caps = caps.wanted(args.modcaps, file_handles=args.inode_file_handles != "never"
                                or args.migration_mode == "file-handles",
                                trusted_xattrs=_trusted_overlay(args))
    except caps.CapabilityError as e:
        parser.error(str(e))
    if (args.security_label != "never" and "CAP_SYS_ADMIN" not in keep_caps[0] and args.xattrmap is None
            and not os.path.isdir("/sys/fs/selinux")):
        # Without SELinux to decide, the host lets only CAP_SYS_ADMIN set security.* attributes.
        log.warning("--security-label: the host will refuse security.* labels without SELinux; keep "
                    "CAP_SYS_ADMIN (--modcaps=+sys_admin) or store them elsewhere with --xattrmap")
    if args.seccomp != "none" and not seccomp.supported():
        parser.error(f"--seccomp={args.seccomp}: {seccomp.UNSUPPORTED} (this is {os.uname().machine}); "
                     "pass --seccomp=none to serve without a filter")
    return args, group, keep_caps


def _build_device(args: argparse.Namespace, api: bool):
    """The file system, FUSE server and virtio-fs device the options describe, and with --mount or
    the control API (`api`) the Vfs and the factory of its mounts (None, None otherwise)."""
    from vhostfs.device import VirtioFsDevice
    from vhostfs.fuse.server import FuseServer

    vfs = make_fs = None
    try:
        if args.mounts or api:
            from vhostfs import control

            # Held for the mounts the control API adds once /proc cannot be named any more.
            proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            vfs, make_fs = control.build_vfs(args.shared_dir, args.mounts, passthrough_options(args),
                                             proc_fd, max_mounts=args.max_mounts,
                                             shared_lowers=args.overlay_lower,
                                             userxattr=args.overlay_userxattr)
            fs = vfs
        else:
            fs = shared_filesystem(args)
            log.info("%s", fs.describe_inodes())
    except (OSError, ValueError) as e:
        raise _StartError(str(e)) from None
    window = None
    if args.dax_window_size:
        from vhostfs.dax import DaxFilesystem, DaxWindow

        window = DaxWindow(args.dax_window_size)
        fs = DaxFilesystem(fs, window)
    server = FuseServer(fs, map_alignment=window.alignment_log2 if window is not None else None)
    return VirtioFsDevice(server, tag=args.tag, thread_pool_size=args.thread_pool_size,
                          dax_window=window, poll_us=args.poll_us), vfs, make_fs


def _confine(jail, keep_caps: tuple, args: argparse.Namespace) -> None:
    """Locks the sandbox down, drops capabilities and installs the seccomp filter, in that order.

    Last of the set-up and before the first worker thread starts: threads inherit the capabilities
    and the filter of the thread that creates them (see caps.py and seccomp.py).
    """
    from vhostfs import caps

    try:
        jail.lock_down()
        caps.drop(*keep_caps)
        if args.seccomp != "none":
            seccomp.install(args.seccomp, syslog=args.syslog)
    except (sandbox.SandboxError, caps.CapabilityError, seccomp.SeccompError) as e:
        raise _StartError(str(e)) from None


def _in_force(jail, args: argparse.Namespace) -> str:
    """One line: the sandbox, the user namespace's mapping and the ID translation in force."""
    translated = [f"{option} {rule}" for option, ids in (("--translate-uid", args.translate_uid),
                                                          ("--translate-gid", args.translate_gid))
                  if ids is not None for rule in ids.rules]
    return jail.describe() + ("; " + ", ".join(translated) if translated else "")


def _serve(listener: socket.socket, device, keep_listening: bool, recorder=None) -> None:
    """Serves front ends on `listener` until one disconnects (every one with `keep_listening`) or a
    SIGTERM/SIGINT arrives; `recorder` (a vhost_user.record.Recorder) records their messages."""
    from vhostfs.vhost_user.connection import Connection
    from vhostfs.vhost_user.handler import Session

    stop = _Stop(listener)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stop.requested:
        try:
            conn, _ = listener.accept()
        except OSError:
            if stop.requested:
                break
            raise
        stop.conn = conn
        if stop.requested:
            conn.close()
            break
        if not keep_listening:
            listener.close()
        log.info("front end connected")
        # A new session per connection; on disconnect it resets the device (queues, FUSE state), so
        # the next front end starts from scratch.
        Session(device, recorder).serve(Connection(conn, recorder))
        stop.conn = None
        if not keep_listening:
            break
        log.info("waiting for the next front end")
    if stop.requested:
        log.info("terminated by signal")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the daemon (or `vhostfs mount`, or --print-capabilities); returns the exit status.

    The steps: parse the command line, listen on the socket, enter the sandbox, build the device (the
    file system opens the share and /proc/self/fd by path), confine the process, serve. A failure
    after listening removes the socket and its lock file and exits with a message.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mount"]:
        from vhostfs import mount_cli

        return mount_cli.main(argv[1:])
    if argv[:1] == ["ctl"]:
        from vhostfs import control

        return control.ctl_main(argv[1:])
    if "--print-capabilities" in argv:
        # The other options are ignored, as the back-end program conventions ask.
        print(json.dumps(capabilities(), indent=2))
        return 0
    args, group, keep_caps = _parse(argv)
    set_rlimit_nofile(args.rlimit_nofile)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    lock_fd = -1
    if args.fd is not None:
        listener = socket.socket(fileno=args.fd)
    else:
        listener, lock_fd = _listen(args.socket_path, group)
    files = _SocketFiles(args.socket_path)
    recorder = None
    if args.record_vhost_user:
        from vhostfs.vhost_user.record import Recorder

        # Opened before the sandbox closes in: the file is outside the share.
        recorder = Recorder(open(args.record_vhost_user, "w", encoding="ascii"))  # noqa: SIM115
    # The control API's socket is made before the sandbox closes in, like the front end's.
    api_files = _SocketFiles(args.api_socket, lock=False)
    api_listener = None

    def remove_sockets() -> None:
        files.remove()
        api_files.remove()

    try:
        if args.api_socket is not None:
            from vhostfs import control

            try:
                api_listener = control.listen(args.api_socket)
            except OSError as e:
                raise _StartError(f"--api-socket {args.api_socket}: {e}") from None
        # In namespace mode the process that returns here is the sandboxed child; the outer one
        # removes the sockets when it is done (see vhostfs/sandbox.py). The sandbox's root is the
        # share, or the first --mount's directory (the others are held by fds).
        jail_dir = args.shared_dir if args.shared_dir is not None else args.mounts[0][1]
        jail = sandbox.prepare(args.sandbox, jail_dir, remove_sockets, args.uid_map, args.gid_map)
        # After the sandbox's user namespace (rootless), whose root is the one that must drop its groups.
        passthrough.prepare_process()
        if args.sandbox == "namespace":
            files.disown()
            api_files.disown()
        device, vfs, make_fs = _build_device(args, api_listener is not None)
        _confine(jail, keep_caps, args)
        if api_listener is not None:
            control.ControlServer(vfs, api_listener, make_fs).start()
            log.info("control API on %s", args.api_socket)
        log.info("%s", _in_force(jail, args))
        shared = (args.shared_dir if vfs is None
                  else ", ".join(f"{m.source} at {m.path}" for m in vfs.mounts()))
        log.info("serving %s on %s", shared or "no directory yet", args.socket_path or f"fd {args.fd}")
        _serve(listener, device, args.keep_listening, recorder)
    except (_StartError, sandbox.SandboxError) as e:
        raise SystemExit(f"vhostfs: {e}") from None
    except SystemExit:
        log.info("terminated by signal")
    finally:
        # Already on the way out: a SIGTERM now (a launcher stopping a daemon that is exiting by
        # itself) must not kill it halfway, nor during interpreter shutdown, which restores the
        # default action for the handlers set above but keeps SIG_IGN.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        remove_sockets()
        if lock_fd >= 0:
            os.close(lock_fd)
        if recorder is not None:
            recorder.close()
    return 0
