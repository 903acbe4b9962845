"""`vhostfs mount`: serves a host directory on the host itself, through the kernel's FUSE client.

    vhostfs mount --shared-dir SRC MOUNTPOINT [--threads N] [PASSTHROUGH OPTIONS]
                  [--overlay-lower DIR ...]
                  [-o allow_other,default_permissions,...]
    vhostfs mount --mount /a=SRC1 --mount /b=SRC2[:OPTIONS] [--api-socket PATH] MOUNTPOINT ...

With --mount (instead of --shared-dir), several directories are served as one tree (a Vfs, see
vhostfs/fs/vfs.py), and --api-socket serves the same control API as the daemon's, for mounting and
unmounting while it is mounted (`vhostfs ctl`).

The passthrough options (--cache, --readonly, --xattr, --posix-acl, --xattrmap, ... and their `-o`
forms) are the daemon's own, with the same spellings and meanings (vhostfs.cli.add_passthrough_options).

The passthrough file system that virtio-fs guests get, mounted over /dev/fuse: useful to try the
file server without a VM, and as a bind mount that applies its policies (read-only, caching).
It serves in the foreground until unmounted (umount, or SIGTERM/SIGINT, which unmount), as a
service manager expects, or until it hands the mount to a new `vhostfs mount --take-over` (live
upgrade, `--upgrade-socket`; vhostfs/fuse/upgrade.py). Also runnable as `python -m vhostfs.mount_cli ...`.

Command-line wiring like vhostfs/cli.py, which routes `vhostfs mount` here: it joins the FUSE
transport and the passthrough, which know nothing of each other.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vhostfs import control
from vhostfs.cli import (
    LOG_LEVELS,
    add_overlay_options,
    add_passthrough_options,
    apply_passthrough_o,
    negotiated_switches,
    passthrough_options,
    shared_filesystem,
    translate_maps,
    vfs_specs,
)
from vhostfs.fs.passthrough import prepare_process
from vhostfs.fuse.fusedev import serve_filesystem
from vhostfs.fuse.upgrade import UpgradeError

log = logging.getLogger("vhostfs")

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `vhostfs mount` argument parser."""
    p = argparse.ArgumentParser(
        prog="vhostfs mount",
        description="Mount a host directory through the host kernel's FUSE client (/dev/fuse).")
    p.add_argument("mountpoint", help="directory to mount on")
    p.add_argument("--shared-dir", help="the host directory to serve")
    p.add_argument("--mount", action="append", default=[], metavar="GUEST_PATH=HOST_DIR[:OPTIONS]",
                   help="serve HOST_DIR at GUEST_PATH inside MOUNTPOINT (repeatable; not with --shared-dir); "
                        "OPTIONS as the daemon's --mount, :lowerdir=DIR[:DIR...] last for an overlay")
    p.add_argument("--max-mounts", type=_positive, default=None, metavar="N",
                   help="how many file systems may be mounted at once (default 256)")
    p.add_argument("--api-socket", metavar="PATH",
                   help="serve the control API on this Unix socket (owner only); see `vhostfs ctl`")
    p.add_argument("--threads", type=_positive, default=4, help="worker threads (default: 4)")
    p.add_argument("--fuse-passthrough", action=argparse.BooleanOptionalAction, default=True,
                   help="let the kernel read, write and mmap regular files on the host itself (FUSE "
                        "passthrough; needs CAP_SYS_ADMIN, and some options rule it out: see "
                        "docs/fuse-passthrough.md). Default: on where possible")
    p.add_argument("--io-uring", action=argparse.BooleanOptionalAction, default=True,
                   help="take the kernel's requests on per-CPU io_uring queues instead of reading "
                        "/dev/fuse (FUSE over io_uring; needs the fuse module's enable_uring "
                        "parameter). Default: on where the kernel offers it")
    add_passthrough_options(p)
    add_overlay_options(p)
    # A host walk touches far more files than a guest keeps: file handles wherever the share makes them.
    p.set_defaults(inode_file_handles="prefer")
    p.add_argument("-o", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options: allow_other, default_permissions (both on by default for root; "
                        "no_allow_other, no_default_permissions turn them off), fsname=NAME, subtype=NAME, "
                        "ro (implies --readonly), and mount flags such as noexec or noatime; and the "
                        "passthrough's: cache=, xattrmap= and the switches xattr, posix_acl, writeback, "
                        "readdirplus, flock, posix_lock, allow_direct_io, announce_submounts, killpriv_v2, "
                        "security_label with their no_ forms")
    p.add_argument("--upgrade-socket", metavar="PATH",
                   help="listen on this Unix socket for a new vhostfs mount to hand the mount to (live "
                        "upgrade: the mount stays, and programs using it go on)")
    p.add_argument("--take-over", metavar="PATH",
                   help="instead of mounting, take over the mount of the vhostfs mount listening on "
                        "this upgrade socket (same MOUNTPOINT and options)")
    p.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS))
    return p


def _mount_options(parser: argparse.ArgumentParser, items: list[str], args: argparse.Namespace) -> dict:
    """Turns the -o items into serve_filesystem's mount keywords; the passthrough's own items (as
    vhostfs.cli.apply_passthrough_o knows them) and "ro" (--readonly, and a read-only mount) set `args`."""
    opts: dict = {}
    rest = []
    for group in items:
        for item in group.split(","):
            if not item:
                continue
            key, _, value = item.partition("=")
            if key in ("allow_other", "default_permissions"):
                opts[key] = True
            elif key in ("no_allow_other", "no_default_permissions"):
                opts[key.removeprefix("no_")] = False
            elif key in ("fsname", "subtype"):
                opts[key] = value
            elif not apply_passthrough_o(parser, args, key, value):
                if key == "ro":
                    args.readonly = True
                rest.append(item)
    opts["options"] = ",".join(rest)
    return opts


def main(argv: list[str]) -> int:
    """Runs `vhostfs mount` with `argv` (the arguments after "mount"); returns the exit status.

    Returns 0 after the file system was unmounted (by umount, or on SIGTERM/SIGINT, which unmount it),
    1 if it could not be mounted or serving failed. Argument errors exit with status 2, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(negotiated_switches(argv))
    mount_opts = _mount_options(parser, args.o, args)
    translate_maps(parser, args)
    logging.basicConfig(level=LOG_LEVELS[args.log_level],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    specs = vfs_specs(parser, args)
    if args.shared_dir is None and not specs and args.api_socket is None:
        parser.error("--shared-dir, --mount or --api-socket is required")
    if args.shared_dir is not None and not os.path.isdir(args.shared_dir):
        parser.error(f"shared directory {args.shared_dir!r} is not a directory")
    prepare_process()
    api = None
    try:
        if specs or args.api_socket is not None:
            proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fs, make_fs = control.build_vfs(args.shared_dir, specs, passthrough_options(args), proc_fd,
                                            max_mounts=args.max_mounts, shared_lowers=args.overlay_lower,
                                            userxattr=args.overlay_userxattr)
            if args.api_socket is not None:
                api = control.ControlServer(fs, control.listen(args.api_socket), make_fs)
        else:
            fs = shared_filesystem(args)
    except (OSError, ValueError) as exc:  # a bad --xattrmap, no file handles with "mandatory"
        log.error("%s: %s", args.shared_dir or ", ".join(host for _, host, _ in specs), exc)
        return 1
    try:
        if api is not None:
            api.start()
        if args.take_over is None:
            log.info("mounting %s at %s", args.shared_dir or ", ".join(f"{h} at {g}" for g, h, _ in specs),
                     args.mountpoint)
        describe = getattr(fs, "describe_inodes", None)  # a Passthrough's or an OverlayFs's; not a Vfs's
        if describe is not None:
            log.info("%s", describe())
        upgrade = {key: value for key, value in (("upgrade_socket", args.upgrade_socket),
                                                 ("take_over", args.take_over)) if value is not None}
        serve_filesystem(fs, args.mountpoint, threads=args.threads, passthrough=args.fuse_passthrough,
                         io_uring=args.io_uring, **upgrade, **mount_opts)
    except (OSError, ValueError, UpgradeError) as exc:
        log.error("%s: %s", args.mountpoint, exc)
        return 1
    finally:
        if api is not None:
            api.close()
            try:
                os.unlink(args.api_socket)
            except FileNotFoundError:
                pass
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
