"""The `vhostfs` command line: argument parsing, logging and wiring, nothing else.

The options follow virtiofsd's, so vhostfs can be launched wherever virtiofsd is (libvirt, scripts,
Cloud Hypervisor's docs): `vhostfs --socket-path=/tmp/vfs.sock --shared-dir=/srv`, the older
`-o source=/srv,cache=always` spellings, and `--fd=N` for a listening socket the launcher created.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence

from vhostfs import __version__

log = logging.getLogger("vhostfs")

CACHE_MODES = ("never", "metadata", "auto", "always")
#: virtiofsd's old "-o cache=" names.
_CACHE_ALIASES = {"none": "never"}
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG,
              "trace": logging.DEBUG, "off": logging.CRITICAL + 10}


def _apply_o_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Maps the comma-separated `-o` options of the C virtiofsd onto their long options."""
    for group in args.o or []:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key == "source":
                args.shared_dir = value
            elif key == "cache":
                args.cache = _CACHE_ALIASES.get(value, value)
                if args.cache not in CACHE_MODES:
                    parser.error(f"-o cache={value}: expected one of {', '.join(CACHE_MODES)}")
            elif key in ("xattr", "no_xattr"):
                args.xattr = key == "xattr"
            elif key in ("readdirplus", "no_readdirplus"):
                args.no_readdirplus = key == "no_readdirplus"
            elif key in ("writeback", "no_writeback", "flock", "no_flock", "posix_lock",
                         "no_posix_lock", "allow_direct_io", "no_allow_direct_io", "announce_submounts",
                         "killpriv_v2", "no_killpriv_v2", "timeout", "log_level"):
                if key == "log_level":
                    args.log_level = value
                else:
                    log.warning("-o %s is accepted and ignored", key)
            else:
                parser.error(f"unknown -o option {key!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostfs", description="Serve a host directory to virtual machines over virtio-fs (vhost-user).")
    p.add_argument("--socket-path", help="Unix socket to listen on for the VMM")
    p.add_argument("--socket", dest="socket_path", help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help="inherited, already listening socket fd (as libvirt passes it)")
    p.add_argument("--shared-dir", help="the host directory to share")
    p.add_argument("--tag", help="virtio-fs tag, served through the device configuration space")
    p.add_argument("--cache", default="auto", choices=CACHE_MODES, help="guest caching (default: auto)")
    p.add_argument("--xattr", action="store_true", help="enable extended attributes")
    p.add_argument("--readonly", action="store_true", help="refuse every change to the shared directory")
    p.add_argument("--no-readdirplus", action="store_true", help="answer READDIR only, no READDIRPLUS")
    p.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                   help="threads serving each request queue (default 0: the queue's own thread)")
    p.add_argument("--sandbox", choices=("namespace", "chroot", "none"), default="none",
                   help="sandbox mode (namespace and chroot are not implemented yet: refused)")
    p.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS))
    p.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user back-end capabilities as JSON and exit")
    p.add_argument("-o", action="append", metavar="OPTIONS", help="virtiofsd-style -o key=value,... options")
    p.add_argument("-f", "--foreground", action="store_true", help="accepted: vhostfs never daemonizes")
    p.add_argument("-d", "--debug", action="store_true", help="same as --log-level=debug")
    p.add_argument("-V", "--version", action="version", version=f"vhostfs {__version__}")
    return p


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


def _listen(path: str) -> tuple[socket.socket, int]:
    """Binds the listening socket at `path`, guarded by a `<path>.pid` lock file.

    The lock stops a second daemon from taking over a socket that is being served; a stale socket
    left by a daemon that died is replaced.
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
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(1)
    return sock, lock_fd


def capabilities() -> dict:
    """The vhost-user back-end description (docs/interop/vhost-user.rst, "Backend program conventions")."""
    return {"type": "fs"}


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_o_options(parser, args)
    if args.print_capabilities:
        print(json.dumps(capabilities(), indent=2))
        return 0
    _setup_logging("debug" if args.debug else args.log_level, args.syslog)
    if args.shared_dir is None:
        parser.error("--shared-dir (or -o source=DIR) is required")
    if (args.socket_path is None) == (args.fd is None):
        parser.error("exactly one of --socket-path (--socket) or --fd is required")
    if args.sandbox != "none":
        parser.error(f"--sandbox={args.sandbox} is not implemented; pass --sandbox=none")
    if not os.path.isdir(args.shared_dir):
        parser.error(f"shared directory {args.shared_dir!r} is not a directory")

    from vhostfs.device import VirtioFsDevice
    from vhostfs.fs.passthrough import Passthrough
    from vhostfs.fuse.server import FuseServer
    from vhostfs.vhost_user.connection import Connection
    from vhostfs.vhost_user.handler import Session

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    fs = Passthrough(args.shared_dir, cache=args.cache, readonly=args.readonly, xattr=args.xattr)
    server = FuseServer(fs)
    device = VirtioFsDevice(server, tag=args.tag, thread_pool_size=args.thread_pool_size)

    lock_fd = -1
    if args.fd is not None:
        listener = socket.socket(fileno=args.fd)
    else:
        listener, lock_fd = _listen(args.socket_path)
    log.info("serving %s on %s", args.shared_dir, args.socket_path or f"fd {args.fd}")
    try:
        conn, _ = listener.accept()
        listener.close()
        log.info("front end connected")
        Session(device).serve(Connection(conn))
    except SystemExit:
        log.info("terminated by signal")
    finally:
        if args.socket_path is not None:
            for path in (args.socket_path, args.socket_path + ".pid"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            os.close(lock_fd)
    return 0
