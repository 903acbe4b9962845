"""The control API: mount, unmount and list the file systems of a running daemon's Vfs.

HTTP/1.1 with JSON bodies over a Unix socket (`--api-socket`), as nydusd and Cloud Hypervisor do; the
requests and answers are documented in docs/control-api.md. A front door like the command line: it
sits above `fs/` and knows nothing of transports.

Security. The socket is created mode 0600 before the sandbox closes in, and every connection is
checked with SO_PEERCRED: a peer whose uid is not the daemon's is answered 403 and nothing else. The
daemon never resolves a host path it was given as text: a mount request carries the directory as an
open fd (SCM_RIGHTS, with the request's first bytes), opened by the caller with the caller's rights;
`source` is only a label for listings. Every request is bounded (`MAX_HEADER`, `MAX_BODY`) and read
with a timeout, one connection at a time; a malformed one gets a 4xx answer and the connection is
closed, and the daemon goes on.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import logging
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vhostfs.fs.vfs import DEFAULT_MAX_MOUNTS, MountOptions, Vfs, VfsOptions
from vhostfs.fuse.filesystem import Filesystem

log = logging.getLogger("vhostfs.control")

#: The largest request head (request line and headers) and body accepted, in bytes.
MAX_HEADER = 8192
MAX_BODY = 65536
#: Seconds a client may take to send its request.
TIMEOUT = 5.0
#: The path of the mounts resource.
MOUNTS = "/api/v1/mounts"
#: The most fds one request may carry (a mount carries one).
_MAX_FDS = 4

_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
            413: "Content Too Large", 500: "Internal Server Error", 507: "Insufficient Storage"}
# Vfs errors as HTTP statuses.
_STATUS = {errno.EINVAL: 400, errno.ENAMETOOLONG: 400, errno.ENOTDIR: 409, errno.ENOENT: 404,
           errno.EEXIST: 409, errno.EBUSY: 409, errno.ENOSPC: 507}
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid

#: Options a mount request (or `--mount`) may set: name -> the type its value must have. The
#: passthrough's options, with the daemon's spellings, then the Vfs's MountOptions.
PASSTHROUGH_OPTIONS: dict[str, type] = {
    "cache": str, "readonly": bool, "xattr": bool, "posix_acl": bool, "readdirplus": bool,
    "announce_submounts": bool, "allow_direct_io": bool, "allow_mmap": bool, "preserve_noatime": bool,
    "posix_lock": bool, "flock": bool, "security_label": bool, "xattrmap": str,
}
MOUNT_OPTIONS: dict[str, type] = {"no_open": bool, "no_opendir": bool, "submount": bool}
#: Options of a `--mount` that serves an overlay (see parse_mount_spec); not for the control API, whose
#: mounts carry one directory fd.
OVERLAY_OPTIONS: dict[str, type] = {"lowerdir": list, "userxattr": bool}


class ApiError(Exception):
    """A request the API refuses: `status` and a message for the JSON answer."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], MountOptions]:
    """(passthrough keyword arguments, MountOptions) of a mount's `options`; ApiError 400 for an
    unknown name or a value of the wrong type."""
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object")
    fs_kw: dict[str, Any] = {}
    mount_kw: dict[str, Any] = {}
    for key, value in options.items():
        kind = PASSTHROUGH_OPTIONS.get(key) or MOUNT_OPTIONS.get(key)
        if kind is None:
            raise ApiError(400, f"unknown option {key!r}")
        if type(value) is not kind:
            raise ApiError(400, f"option {key!r} must be a {kind.__name__}")
        (fs_kw if key in PASSTHROUGH_OPTIONS else mount_kw)[key] = value
    return fs_kw, MountOptions(**mount_kw)


#: Builds the file system of a mount from the directory fd it is given (which it then owns) and the
#: passthrough options; raises ValueError or OSError for options it cannot honour.
FsFactory = Callable[[int, dict[str, Any]], Filesystem]


def info_json(vfs: Vfs) -> list[dict[str, Any]]:
    """The JSON form of `vfs.mounts()`."""
    return [{"mountpoint": m.path, "source": m.source, "type": m.fstype, "options": m.options,
             "counters": m.counters} for m in vfs.mounts()]


class ControlServer:
    """Serves the control API for `vfs` on `listener` (a listening AF_UNIX stream socket).

    `make_fs` builds a mount's file system (`FsFactory`). `start()` serves from a daemon thread,
    one connection at a time; `close()` stops.
    """

    def __init__(self, vfs: Vfs, listener: socket.socket, make_fs: FsFactory, *, fstype: str = "passthrough",
                 uid: int | None = None) -> None:
        self.vfs = vfs
        self.listener = listener
        self.make_fs = make_fs
        self.fstype = fstype
        self.uid = os.geteuid() if uid is None else uid
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="vhostfs-api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never connected

    def serve(self) -> None:
        """Accepts and answers connections until `close`."""
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stopped:
                    return
                raise
            with conn:
                try:
                    self._connection(conn)
                except Exception:
                    log.exception("control API request failed")

    def _connection(self, conn: socket.socket) -> None:
        pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != self.uid:
            log.warning("control API: refused a peer with uid %d (pid %d)", uid, pid)
            _respond(conn, 403, {"error": "only the daemon's owner may use this socket"})
            _drain(conn)
            return
        conn.settimeout(TIMEOUT)
        fds: list[int] = []
        try:
            try:
                method, target, body = _read_request(conn, fds)
                status, answer = self._dispatch(method, target, body, fds)
            except ApiError as e:
                status, answer = e.status, {"error": str(e)}
                if e.code:
                    answer["errno"] = e.code
            except TimeoutError:
                status, answer = 400, {"error": "request not received in time"}
            _respond(conn, status, answer)
            _drain(conn)
        finally:
            for fd in fds:
                os.close(fd)

    def _dispatch(self, method: str, target: str, body: bytes, fds: list[int]) -> tuple[int, Any]:
        path = target.partition("?")[0]
        if path != MOUNTS:
            raise ApiError(404, f"no resource {path}")
        if method == "GET":
            return 200, {"mounts": info_json(self.vfs)}
        if method not in ("PUT", "DELETE"):
            raise ApiError(405, f"{method} is not allowed on {MOUNTS}")
        try:
            request = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the body must be a JSON object")
        mountpoint = request.get("mountpoint")
        if not isinstance(mountpoint, str):
            raise ApiError(400, "mountpoint (a string) is required")
        if method == "DELETE":
            force = request.get("force", False)
            if type(force) is not bool:
                raise ApiError(400, "force must be a boolean")
            _vfs_call(self.vfs.umount, mountpoint, force=force)
            log.info("control API: unmounted %s%s", mountpoint, " (forced)" if force else "")
            return 204, None
        if len(fds) != 1:
            raise ApiError(400, f"a mount needs the directory's fd (SCM_RIGHTS), got {len(fds)} fds")
        source = request.get("source", "")
        if not isinstance(source, str):
            raise ApiError(400, "source must be a string")
        fs_kw, mount_options = split_options(request.get("options", {}))
        fd = fds.pop()
        try:
            fs = self.make_fs(fd, fs_kw)
        except (OSError, ValueError) as e:
            raise ApiError(400, f"cannot serve the directory: {e}") from None
        try:
            info = _vfs_call(self.vfs.mount, fs, mountpoint, options=mount_options, source=source,
                             fstype=self.fstype, extra=fs_kw)
        except BaseException:
            close = getattr(fs, "close", None)
            if callable(close):
                close()
            raise
        log.info("control API: mounted %s at %s", source or "a directory", info.path)
        return 201, {"mountpoint": info.path, "source": info.source, "type": info.fstype,
                     "options": info.options, "counters": info.counters}


def _vfs_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, "EIO")
        raise ApiError(_STATUS.get(e.errno or 0, 500), e.strerror or str(e), code) from None


def _recv(conn: socket.socket, fds: list[int], size: int) -> bytes:
    """Up to `size` bytes from `conn`, adding any fds that came with them to `fds`."""
    data, ancdata, flags, _ = conn.recvmsg(size, socket.CMSG_SPACE(_MAX_FDS * 4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if flags & socket.MSG_CTRUNC:
        raise ApiError(400, f"more than {_MAX_FDS} fds")
    return data


def _read_request(conn: socket.socket, fds: list[int]) -> tuple[str, str, bytes]:
    """(method, target, body) of one HTTP/1.1 request; ApiError for a malformed or oversized one."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEADER:
            raise ApiError(413, f"request head over {MAX_HEADER} bytes")
        chunk = _recv(conn, fds, 4096)
        if not chunk:
            raise ApiError(400, "connection closed before the request ended")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if len(head) > MAX_HEADER:
        raise ApiError(413, f"request head over {MAX_HEADER} bytes")
    try:
        lines = head.decode("ascii").split("\r\n")
        method, target, version = lines[0].split(" ")
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise ApiError(400, f"unsupported protocol {version!r}")
    length = 0
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ApiError(400, "malformed header")
        name = name.strip().lower()
        if name == "content-length":
            if not value.strip().isdigit():
                raise ApiError(400, "malformed Content-Length")
            length = int(value)
        elif name == "transfer-encoding":
            raise ApiError(411, "chunked bodies are not accepted: send Content-Length")
    if length > MAX_BODY:
        raise ApiError(413, f"body over {MAX_BODY} bytes")
    body = rest
    while len(body) < length:
        chunk = _recv(conn, fds, min(65536, length - len(body)))
        if not chunk:
            raise ApiError(400, "connection closed before the body ended")
        body += chunk
    if len(body) > length:
        raise ApiError(400, "more bytes than Content-Length")
    return method, target, body


def _respond(conn: socket.socket, status: int, answer: Any) -> None:
    body = b"" if answer is None else json.dumps(answer).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        conn.sendall(head + body)
    except OSError as e:
        log.debug("control API: the answer could not be sent: %s", e)


def _drain(conn: socket.socket) -> None:
    """Ends the answer and reads what the client still sends (an oversized request's rest, for a while),
    so that closing does not reset the connection before the client has read the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        left = 1 << 20
        while left > 0:
            chunk = conn.recv(65536)
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass  # the client is gone or too slow: nothing more to do for it


def listen(path: str) -> socket.socket:
    """A listening socket at `path` for its owner only (0600); a stale socket there is replaced."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


# -- the client side ------------------------------------------------------------------------------------
def request(api_socket: str, method: str, body: dict[str, Any] | None = None, *, fds: Sequence[int] = (),
            path: str = MOUNTS, raw: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """Sends one request to the control API at `api_socket`; returns (status, decoded JSON or None).

    `fds` travel with the request's first bytes (SCM_RIGHTS). `raw` replaces the whole request (tests).
    """
    data = json.dumps(body).encode() if body is not None else b""
    message = raw if raw is not None else (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(api_socket)
        if fds:
            socket.send_fds(sock, [message[:1]], list(fds))
            message = message[1:]
        try:
            sock.sendall(message)
        except BrokenPipeError:
            pass  # the daemon answered early (an oversized request) and closed
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, payload = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload.strip() else None


def ctl_main(argv: list[str]) -> int:
    """`vhostfs ctl`: the control API from the command line (see docs/control-api.md)."""
    p = argparse.ArgumentParser(prog="vhostfs ctl", description="Mount, unmount and list a vhostfs daemon's "
                                "file systems through its --api-socket.")
    p.add_argument("--api-socket", required=True, help="the daemon's control socket")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the mounts as JSON")
    m = sub.add_parser("mount", help="mount HOST_DIR at GUEST_PATH (the directory is opened here and "
                       "its fd passed to the daemon)")
    m.add_argument("guest_path")
    m.add_argument("host_dir")
    m.add_argument("-o", "--options", default="", metavar="OPTS",
                   help="comma-separated options, as --mount's (ro, cache=never, xattr, no_submount...)")
    u = sub.add_parser("umount", help="unmount GUEST_PATH")
    u.add_argument("guest_path")
    u.add_argument("-f", "--force", action="store_true", help="even with files open (they then get ESTALE)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            status, answer = request(args.api_socket, "GET")
        elif args.command == "umount":
            status, answer = request(args.api_socket, "DELETE", {"mountpoint": args.guest_path,
                                                                 "force": args.force})
        else:
            try:
                options = parse_options(args.options)
            except ValueError as e:
                p.error(str(e))
            fd = os.open(args.host_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                status, answer = request(args.api_socket, "PUT", {
                    "mountpoint": args.guest_path, "source": os.path.realpath(args.host_dir),
                    "options": options}, fds=[fd])
            finally:
                os.close(fd)
    except OSError as e:
        print(f"vhostfs ctl: {e}", file=sys.stderr)
        return 1
    if answer is not None:
        print(json.dumps(answer, indent=2))
    return 0 if 200 <= status < 300 else 1


def _option_kind(key: str) -> type | None:
    return PASSTHROUGH_OPTIONS.get(key) or MOUNT_OPTIONS.get(key) or OVERLAY_OPTIONS.get(key)


def parse_options(text: str) -> dict[str, Any]:
    """`--mount`'s OPTIONS, comma-separated: `name=value` for cache and xattrmap, `name` / `no_name`
    for the switches (`ro` is `readonly`, `userxattr` an overlay's); ValueError for an unknown one."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = {"ro": "readonly", "rw": "no_readonly"}.get(key, key)
        kind = _option_kind(key)
        if kind is str and sep:
            options[key] = value
            continue
        base = key.removeprefix("no_")
        if not sep and _option_kind(key) is bool:
            options[key] = True
        elif not sep and _option_kind(base) is bool:
            options[base] = False
        else:
            raise ValueError(f"unknown mount option {item!r}")
    return options


def parse_mount_spec(text: str) -> tuple[str, str, dict[str, Any]]:
    """`--mount GUEST_PATH=HOST_DIR[:OPTIONS][:lowerdir=DIR[:DIR...]]` as (guest path, host dir,
    options); ValueError if malformed.

    OPTIONS follow the last ":" when that part has no "/" (so a HOST_DIR with a ":" needs a trailing
    ":" to end it). A `:lowerdir=` part, last, makes the mount an overlay with HOST_DIR as its upper
    layer and the DIRs, topmost first, as its lower layers, as the kernel's lowerdir option: it lands
    in the options as a list under "lowerdir"."""
    guest, sep, rest = text.partition("=")
    if not sep or not guest or not rest:
        raise ValueError(f"--mount {text!r}: expected GUEST_PATH=HOST_DIR[:OPTIONS]")
    rest, lower_sep, lowers = rest.partition(":lowerdir=")
    if lower_sep and (not lowers or "" in lowers.split(":")):
        raise ValueError(f"--mount {text!r}: lowerdir= needs one or more directories, separated by ':'")
    host, colon, opts = rest.rpartition(":")
    if not colon or "/" in opts:
        host, opts = rest, ""
    if not host:
        raise ValueError(f"--mount {text!r}: no host directory")
    options = parse_options(opts)
    if lower_sep:
        options["lowerdir"] = lowers.split(":")
    elif "userxattr" in options:
        raise ValueError(f"--mount {text!r}: userxattr is an overlay's option (with lowerdir=)")
    return guest, host, options


def _mount_fs(host: str, options: dict[str, Any], lowers: Sequence[str], userxattr: bool,
              proc_fd: int) -> tuple[Filesystem, str]:
    """The file system of one mount and its type: the passthrough of `host` with `options`, or with
    `lowers` the overlay of those directories under `host` (vhostfs.fs.overlay)."""
    if lowers:
        from vhostfs.fs.overlay import OverlayFs

        return OverlayFs.from_dirs(host, lowers, userxattr=userxattr, proc_fd=proc_fd, **options), "overlay"
    from vhostfs.fs.passthrough import Passthrough

    return Passthrough(host, proc_fd=proc_fd, **options), "passthrough"


def build_vfs(shared_dir: str | None, specs: Sequence[tuple[str, str, dict[str, Any]]],
              base_options: dict[str, Any], proc_fd: int, *,
              max_mounts: int | None = None, shared_lowers: Sequence[str] = (),
              userxattr: bool = False) -> tuple[Vfs, FsFactory]:
    """The daemon's Vfs: `shared_dir` (if any) at "/", and a passthrough per `--mount` spec, each with
    `base_options` (the command line's passthrough options) overridden by its own, at most `max_mounts`
    at once (ValueError outside 1..MAX_MOUNTS); and the factory the
    control API builds new mounts with. `writeback` and `killpriv_v2` are negotiated for the whole
    Vfs, so they come from `base_options` only. Raises OSError or ValueError (the caller reports it).

    An overlay instead of a passthrough: `shared_lowers` (--overlay-lower, with `userxattr`) under
    `shared_dir`, and a spec's "lowerdir" and "userxattr" options (see parse_mount_spec)."""
    from vhostfs.fs.passthrough import Passthrough

    vfs = Vfs(VfsOptions(writeback=bool(base_options.get("writeback")),
                         killpriv_v2=bool(base_options.get("killpriv_v2")),
                         max_mounts=DEFAULT_MAX_MOUNTS if max_mounts is None else max_mounts))

    def make_fs(fd: int, options: dict[str, Any]) -> Filesystem:
        return Passthrough(fd, proc_fd=proc_fd, **{**base_options, **options})

    try:
        if shared_dir is not None:
            root, fstype = _mount_fs(shared_dir, base_options, shared_lowers, userxattr, proc_fd)
            vfs.mount(root, "/", source=os.path.realpath(shared_dir), fstype=fstype)
        for guest, host, options in specs:
            overlay = {k: options[k] for k in OVERLAY_OPTIONS if k in options}
            try:
                fs_kw, mount_options = split_options({k: v for k, v in options.items() if k not in overlay})
            except ApiError as e:
                raise ValueError(f"--mount {guest}: {e}") from None
            lowers = overlay.get("lowerdir", [])
            try:
                fs, fstype = _mount_fs(host, {**base_options, **fs_kw}, lowers,
                                       bool(overlay.get("userxattr")), proc_fd)
            except ValueError as e:
                raise ValueError(f"--mount {guest}: {e}") from None
            try:
                vfs.mount(fs, guest, options=mount_options, source=os.path.realpath(host), fstype=fstype,
                          extra={**fs_kw, **({"lowerdir": ":".join(lowers)} if lowers else {})})
            except BaseException:
                fs.close()  # type: ignore[attr-defined]  (Passthrough and OverlayFs have one)
                raise
    except BaseException:
        vfs.close()
        raise
    return vfs, make_fs


__all__ = ["ApiError", "ControlServer", "build_vfs", "ctl_main", "listen", "parse_mount_spec",
           "parse_options", "request", "split_options"]
