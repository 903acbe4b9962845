"""A record of the vhost-user messages of a session, one line each, for `vhostfs --record-vhost-user`.

Both channels are recorded: the front end's connection and the back-end channel of
SET_BACKEND_REQ_FD. The direction says which one:

    front->back  a request on the connection        back->front  its reply
    back=>front  a back-end channel request         front=>back  its reply

then the request name as vhostfs knows it, the request number as it was on the wire, the header
flags (with NEED_REPLY/REPLY spelled out), the payload size, the number of fds and the payload in
hex, without its trailing zero bytes (the size says how many there were). A line is written whole
under a lock, so the queue threads' back-end requests do not mix.
Addresses and fd numbers in payloads differ from run to run; the layout does not.
"""

from __future__ import annotations

import threading
from typing import TextIO

from vhostfs.vhost_user import messages as m

#: Directions, as the record spells them.
FRONT_TO_BACK = "front->back"
BACK_TO_FRONT = "back->front"
BACKEND_REQUEST = "back=>front"
BACKEND_REPLY = "front=>back"


def request_name(direction: str, request: int) -> str:
    """The name of `request` without its VHOST_USER_ / VHOST_USER_BACKEND_ prefix, on the channel
    `direction` belongs to."""
    kind = m.BackendRequest if direction in (BACKEND_REQUEST, BACKEND_REPLY) else m.Request
    try:
        name = kind(request).name
    except ValueError:
        return str(request)
    return name.removeprefix("VHOST_USER_BACKEND_").removeprefix("VHOST_USER_")


def format_line(direction: str, header: bytes, payload: bytes, nfds: int) -> str:
    """One record line for a message with the 12-byte `header` and `payload`."""
    request, flags, size = m.HEADER.unpack(header)
    tags = (" NEED_REPLY" if flags & m.VHOST_USER_NEED_REPLY_MASK else "") + (
        " REPLY" if flags & m.VHOST_USER_REPLY_MASK else "")
    name = request_name(direction, request)
    data = payload.rstrip(b"\0").hex()
    return (f"{direction} {name} request={request} flags={flags:#x}{tags} size={size} fds={nfds} "
            f"payload={data}")


class Recorder:
    """Appends record lines to `out` (a text file the recorder owns and closes)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def message(self, direction: str, header: bytes, payload: bytes, nfds: int = 0) -> None:
        line = format_line(direction, header, payload, nfds)
        with self._lock:
            if not self._out.closed:
                self._out.write(line + "\n")
                self._out.flush()

    def close(self) -> None:
        with self._lock:
            self._out.close()
