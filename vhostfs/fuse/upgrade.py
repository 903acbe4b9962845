"""Live upgrade of a /dev/fuse mount: a running server hands its mount to a newly started one.

The mount is never unmounted: the kernel's FUSE connection lives as long as some process holds its
/dev/fuse fd, so the old server passes that fd (SCM_RIGHTS) and its session state
(docs/session-state.md) to the new one over a Unix socket, and exits once the new one has loaded the
state. Programs with open files or a working directory in the mount never notice; requests that
arrive meanwhile wait in the kernel's queue for the new server.

The exchange on the socket (integers little-endian):

1. the new server connects and sends `REQUEST` (8 bytes);
2. the old one pauses its workers (FuseDevSession.handover), saves the session and sends `OFFER`
   (magic, state length) with the /dev/fuse fd attached, then the state;
3. the new one loads the state and answers `ANSWER`: b"OK" and 0, or b"NO" and the length of a
   message saying why, then the message. On anything but OK (or a broken connection) the old
   server goes on serving, and the new one exits.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

from vhostfs.fuse.session_state import MAX_STATE_SIZE

log = logging.getLogger("vhostfs.fuse.upgrade")

REQUEST = b"VHFSTAKE"
OFFER = struct.Struct("<8sQ")
assert OFFER.size == 16
OFFER_MAGIC = b"VHFSSESS"
ANSWER = struct.Struct("<2sI")
assert ANSWER.size == 6
MAX_MESSAGE = 4096
#: How long the old server waits for the new one's answer once it has sent the state.
ANSWER_TIMEOUT = 120.0


class UpgradeError(Exception):
    """The handover did not happen; the message says why."""


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 20))
        if not chunk:
            raise UpgradeError("the other server closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def parse_offer(data: bytes) -> int:
    """The state length an OFFER announces; UpgradeError if it is not one or too large."""
    magic, length = OFFER.unpack(data)
    if magic != OFFER_MAGIC:
        raise UpgradeError("not a vhostfs mount offering its session")
    if length > MAX_STATE_SIZE:
        raise UpgradeError(f"a session state of {length} bytes is larger than {MAX_STATE_SIZE}")
    return length


def parse_answer(data: bytes) -> tuple[bool, int]:
    """(accepted, message length) of an ANSWER."""
    verdict, length = ANSWER.unpack(data)
    if verdict not in (b"OK", b"NO") or length > MAX_MESSAGE:
        raise UpgradeError(f"a malformed answer {data!r}")
    return verdict == b"OK", length


class UpgradeListener:
    """Listens on Unix socket `path` for a successor and hands `session` (a FuseDevSession) to it.

    The socket is created mode 0600 (a stale one from a dead server is replaced). `close` stops
    listening and removes the socket unless a successor has taken it over.
    """

    def __init__(self, path: str, session) -> None:
        self.path = path
        self.session = session
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.sock.listen(1)
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="vhostfs-upgrade", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve(conn)
                except (OSError, UpgradeError) as exc:
                    log.error("live upgrade refused: %s", exc)
            if self.session.handed_over:
                self._closed = True
                self.sock.close()
                return

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if _recv_exact(conn, len(REQUEST)) != REQUEST:
            raise UpgradeError("a connection that did not ask for the session")
        log.info("live upgrade: handing the mount to a new server")

        def give(fd: int, state: bytes) -> bool:
            try:
                socket.send_fds(conn, [OFFER.pack(OFFER_MAGIC, len(state))], [fd])
                conn.sendall(state)
                conn.settimeout(ANSWER_TIMEOUT)
                accepted, length = parse_answer(_recv_exact(conn, ANSWER.size))
                message = _recv_exact(conn, length).decode(errors="replace")
            except (OSError, UpgradeError) as exc:
                log.error("live upgrade failed, serving on: %s", exc)
                return False
            if not accepted:
                log.error("the new server refused the session, serving on: %s", message)
            return accepted

        if self.session.handover(give):
            log.info("live upgrade: the new server has the mount; exiting without unmounting")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        if not self.session.handed_over:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def take_over(path: str, timeout: float = 60) -> tuple[int, bytes, socket.socket]:
    """Asks the server listening on `path` for its mount: (the /dev/fuse fd, the session state, the
    connection to `answer` on once the state is loaded). Raises UpgradeError or OSError."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(REQUEST)
        data, fds, _, _ = socket.recv_fds(conn, OFFER.size, 1)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UpgradeError("the server sent no /dev/fuse fd")
        try:
            if len(data) < OFFER.size:
                data += _recv_exact(conn, OFFER.size - len(data))
            state = _recv_exact(conn, parse_offer(data))
        except BaseException:
            os.close(fds[0])
            raise
    except BaseException:
        conn.close()
        raise
    return fds[0], state, conn


def answer(conn: socket.socket, error: str | None) -> None:
    """Tells the old server the outcome (None: the session was loaded), and closes the connection."""
    with conn:
        message = (error or "").encode()[:MAX_MESSAGE]
        conn.sendall(ANSWER.pack(b"NO" if error else b"OK", len(message)) + message)
