"""The vhost-user back-end session: one method per front-end request, and the ring state machine.

A ring runs (its queue is served) while it is *started* (it has a kick fd: SET_VRING_KICK, until
GET_VRING_BASE stops it), *enabled* (SET_VRING_ENABLE; rings start enabled when
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated) and has its size, addresses and guest memory.
Whenever one of those changes the handler asks the `Backend` to start or stop the queue.

Dirty-page logging ("Migration"): once the front end has given a log (SET_LOG_BASE) and acked
VHOST_F_LOG_ALL, each queue is started with a `QueueLog`. When that changes on a running queue
(logging switched on or off, VHOST_VRING_F_LOG toggled by SET_VRING_ADDR) the queue is stopped and
restarted at the same index, so when the request that switched logging on is acknowledged no write
can escape the log: the front end waits for that ack (REPLY_ACK) before it starts copying memory.

Back-end state ("Migrating back-end state"): with VHOST_USER_PROTOCOL_F_DEVICE_STATE, once every ring
is stopped the front end sends SET_DEVICE_STATE_FD with one end of a pipe: on the source the session
writes the `Backend`'s saved state into it and closes it, on the destination it reads the state to
the end of file and has the backend load it, before any ring starts. The bytes are the backend's: the
session only carries them, on a thread of its own, since the front end reads (or writes) the pipe only
after the reply. CHECK_DEVICE_STATE waits for that thread and answers whether it succeeded. If the
source's rings start again afterwards, the migration failed and the session goes on there
(`Backend.resume_after_save`).

Refused requests never take the daemon down: the request is answered with a failure status when the
front end asked for one (REPLY_ACK), logged otherwise, and the previous state is kept.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from vhostfs.vhost_user import messages as m
from vhostfs.vhost_user.backend_channel import BackendChannel
from vhostfs.vhost_user.connection import Connection, Message
from vhostfs.vhost_user.dirty_log import DirtyLog, QueueLog
from vhostfs.vhost_user.memory import (
    MAX_MEM_SLOTS,
    GuestMemory,
    GuestMemoryError,
    MappedRegion,
    map_region,
)
from vhostfs.vhost_user.record import Recorder

log = logging.getLogger("vhostfs.vhost_user")

R = m.Request


#: Largest back-end state a destination reads; beyond it the transfer fails.
MAX_DEVICE_STATE = 1 << 30


class _Transfer:
    """One SET_DEVICE_STATE_FD transfer, run on its own thread; `error` says why it failed."""

    def __init__(self, backend: Backend, direction: int, fd: int) -> None:
        self.backend = backend
        self.direction = direction
        self.fd = fd
        self.error: str | None = None
        self.size = 0
        name = "save" if direction == m.VHOST_TRANSFER_STATE_DIRECTION_SAVE else "load"
        self.thread = threading.Thread(target=self._run, name=f"vhostfs-state-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            os.set_blocking(self.fd, True)
            if self.direction == m.VHOST_TRANSFER_STATE_DIRECTION_SAVE:
                self._save()
            else:
                self._load()
        except Exception as e:  # reported by CHECK_DEVICE_STATE too; the session goes on
            self.error = str(e) or type(e).__name__
            what = "saved" if self.direction == m.VHOST_TRANSFER_STATE_DIRECTION_SAVE else "loaded"
            if isinstance(e, (OSError, ValueError)):
                log.error("the device state could not be %s: %s", what, self.error)
            else:
                log.exception("the device state could not be %s", what)
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _save(self) -> None:
        start = time.monotonic()
        data = memoryview(self.backend.save_state())
        self.size = len(data)
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
        log.info("device state saved: %d bytes in %.1f ms", self.size, (time.monotonic() - start) * 1e3)

    def _load(self) -> None:
        chunks = []
        while chunk := os.read(self.fd, 1 << 20):
            self.size += len(chunk)
            if self.size > MAX_DEVICE_STATE:
                raise ValueError(f"device state larger than {MAX_DEVICE_STATE} bytes")
            chunks.append(chunk)
        os.close(self.fd)
        self.fd = -1
        start = time.monotonic()
        self.backend.load_state(b"".join(chunks))
        log.info("device state loaded: %d bytes in %.1f ms", self.size, (time.monotonic() - start) * 1e3)

    def wait(self) -> str | None:
        self.thread.join()
        return self.error


@dataclass(slots=True)
class Vring:
    """What the front end told us about one ring."""

    num: int = 0
    base: int = 0
    addr: m.VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False
    enabled: bool = False
    running: bool = False
    #: The log the running queue was started with.
    log: QueueLog | None = None


class Backend(Protocol):
    """The device behind the session (vhostfs.device.VirtioFsDevice)."""

    #: Most queues the device can serve (GET_QUEUE_NUM).
    max_queues: int
    #: Virtio feature bits the device offers, ring features included.
    features: int
    #: Protocol feature bits the device supports beyond the session's own.
    protocol_features: int

    def check_ring_size(self, num: int) -> None:
        """Raises ValueError unless the device's queues can have `num` entries (SET_VRING_NUM)."""

    def check_ring_addresses(self, desc: int, avail: int, used: int) -> None:
        """Raises ValueError unless the rings may lie at these addresses (SET_VRING_ADDR: alignment)."""

    def start_queue(self, index: int, vring: Vring, memory: GuestMemory, features: int,
                    log: QueueLog | None) -> None:
        """Starts serving queue `index`; raises GuestMemoryError/ValueError if the ring is unusable.

        With a `log`, every write the queue makes to guest memory is logged through it.
        """

    def stop_queue(self, index: int) -> int:
        """Stops queue `index` after its in-flight requests; returns the next avail index."""

    def set_call_fd(self, index: int, fd: int) -> None:
        """Replaces the call eventfd of a running queue (the session owns and closes fds)."""

    def set_memory(self, memory: GuestMemory) -> None:
        """A new memory table: running queues switch to it."""

    def config(self) -> bytes:
        """The device configuration space (GET_CONFIG)."""

    def reset(self) -> None:
        """The device is reset (RESET_OWNER/RESET_DEVICE or disconnect): drop session state."""

    # Optional, for devices that migrate (VHOST_USER_PROTOCOL_F_DEVICE_STATE in protocol_features):
    #   save_state() -> bytes, the device's state while every queue is stopped (raises to refuse);
    #   load_state(data: bytes), takes over a saved state before any queue starts (raises ValueError
    #   or OSError, changing nothing, for a state it cannot account for);
    #   resume_after_save(), the saved state goes on here after all (the migration failed).
    # Optional, for devices with VIRTIO shared memory regions (VHOST_USER_PROTOCOL_F_SHMEM):
    #   shmem_regions: list[int], the size of each region by shmid (GET_SHMEM_CONFIG);
    #   set_backend_channel(channel: BackendChannel | None), the channel to send SHMEM_MAP/UNMAP on,
    #   None once the front end is gone. The device owns and closes the channel it is given.


def _bit(n: int) -> int:
    return 1 << n


#: Protocol features the session itself implements.
SESSION_PROTOCOL_FEATURES = (
    _bit(m.VHOST_USER_PROTOCOL_F_MQ)
    | _bit(m.VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | _bit(m.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    | _bit(m.VHOST_USER_PROTOCOL_F_BACKEND_REQ)
    | _bit(m.VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD)
    | _bit(m.VHOST_USER_PROTOCOL_F_RESET_DEVICE)
    | _bit(m.VHOST_USER_PROTOCOL_F_LOG_SHMFD)
)


class Session:
    """Serves one front-end connection for `backend`."""

    def __init__(self, backend: Backend, recorder: Recorder | None = None) -> None:
        self.backend = backend
        #: Records the back-end channel's messages too (the connection records its own).
        self.recorder = recorder
        self.vrings = [Vring() for _ in range(backend.max_queues)]
        self.memory = GuestMemory([])
        self.owner = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.backend_channel: socket.socket | None = None
        self.dirty_log: DirtyLog | None = None
        #: The last device state transfer, until CHECK_DEVICE_STATE; whether a save was the last one.
        self._transfer: _Transfer | None = None
        self._saved = False
        self._handlers = {
            R.VHOST_USER_GET_FEATURES: self.get_features,
            R.VHOST_USER_SET_FEATURES: self.set_features,
            R.VHOST_USER_SET_OWNER: self.set_owner,
            R.VHOST_USER_RESET_OWNER: self.reset_owner,
            R.VHOST_USER_SET_MEM_TABLE: self.set_mem_table,
            R.VHOST_USER_SET_LOG_BASE: self.set_log_base,
            R.VHOST_USER_SET_LOG_FD: self.set_log_fd,
            R.VHOST_USER_SET_VRING_NUM: self.set_vring_num,
            R.VHOST_USER_SET_VRING_ADDR: self.set_vring_addr,
            R.VHOST_USER_SET_VRING_BASE: self.set_vring_base,
            R.VHOST_USER_GET_VRING_BASE: self.get_vring_base,
            R.VHOST_USER_SET_VRING_KICK: self.set_vring_kick,
            R.VHOST_USER_SET_VRING_CALL: self.set_vring_call,
            R.VHOST_USER_SET_VRING_ERR: self.set_vring_err,
            R.VHOST_USER_GET_PROTOCOL_FEATURES: self.get_protocol_features,
            R.VHOST_USER_SET_PROTOCOL_FEATURES: self.set_protocol_features,
            R.VHOST_USER_GET_QUEUE_NUM: self.get_queue_num,
            R.VHOST_USER_SET_VRING_ENABLE: self.set_vring_enable,
            R.VHOST_USER_SET_BACKEND_REQ_FD: self.set_backend_req_fd,
            R.VHOST_USER_GET_CONFIG: self.get_config,
            R.VHOST_USER_SET_CONFIG: self.set_config,
            R.VHOST_USER_RESET_DEVICE: self.reset_device,
            R.VHOST_USER_GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            R.VHOST_USER_ADD_MEM_REG: self.add_mem_reg,
            R.VHOST_USER_REM_MEM_REG: self.rem_mem_reg,
            R.VHOST_USER_GET_SHMEM_CONFIG: self.get_shmem_config,
            R.VHOST_USER_SET_DEVICE_STATE_FD: self.set_device_state_fd,
            R.VHOST_USER_CHECK_DEVICE_STATE: self.check_device_state,
        }
        #: Requests answered with a payload of their own (no REPLY_ACK on top).
        self._with_reply = {
            R.VHOST_USER_GET_FEATURES, R.VHOST_USER_GET_PROTOCOL_FEATURES, R.VHOST_USER_GET_VRING_BASE,
            R.VHOST_USER_GET_QUEUE_NUM, R.VHOST_USER_GET_CONFIG, R.VHOST_USER_GET_MAX_MEM_SLOTS,
            R.VHOST_USER_GET_SHMEM_CONFIG, R.VHOST_USER_SET_DEVICE_STATE_FD, R.VHOST_USER_CHECK_DEVICE_STATE,
        }
        #: What a refused request of `_with_reply` answers (default: an empty payload).
        self._error_replies = {
            R.VHOST_USER_SET_DEVICE_STATE_FD: m.U64.pack(1 | m.VHOST_USER_DEVICE_STATE_NO_FD),
            R.VHOST_USER_CHECK_DEVICE_STATE: m.U64.pack(1),
        }
        #: Requests whose messages may carry fds.
        self._take_fds = {
            R.VHOST_USER_SET_MEM_TABLE, R.VHOST_USER_SET_VRING_KICK, R.VHOST_USER_SET_VRING_CALL,
            R.VHOST_USER_SET_VRING_ERR, R.VHOST_USER_SET_BACKEND_REQ_FD, R.VHOST_USER_ADD_MEM_REG,
            R.VHOST_USER_REM_MEM_REG, R.VHOST_USER_SET_LOG_BASE, R.VHOST_USER_SET_LOG_FD,
            R.VHOST_USER_SET_DEVICE_STATE_FD,
        }

    # -- the loop -------------------------------------------------------------------------------
    def serve(self, conn: Connection) -> None:
        """Handles requests until the front end disconnects or breaks the framing; then resets and closes."""
        try:
            while True:
                try:
                    msg = conn.receive()
                except m.VhostUserError as e:
                    log.error("closing the connection: %s", e)
                    return
                except ConnectionError as e:
                    log.info("front end connection lost: %s", e)
                    return
                if msg is None:
                    log.info("front end disconnected")
                    return
                try:
                    reply = self.dispatch(msg)
                finally:
                    msg.close()
                if reply is not None:
                    conn.reply(msg.header.request, reply)
        finally:
            self.shutdown()
            conn.close()

    def dispatch(self, msg: Message) -> bytes | None:
        """Handles one request; returns the reply payload to send, if any."""
        request = msg.header.request
        name = m.request_name(request)
        handler = self._handlers.get(request)
        ack = msg.header.need_reply and self._has_protocol(m.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        if handler is None:
            log.warning("refusing unsupported %s", name)
            return m.U64.pack(1) if msg.header.need_reply else None
        if msg.fds and request not in self._take_fds:
            log.warning("%s carries %d unexpected fds: refused", name, len(msg.fds))
            return m.U64.pack(1) if ack else None
        log.debug("%s %s", name, msg.payload.hex())
        # With LOG_SHMFD, SET_LOG_BASE is answered with a u64 status whatever the flags say
        # ("Communication": the requests that always have a reply).
        status_reply = request == R.VHOST_USER_SET_LOG_BASE and self._has_protocol(
            m.VHOST_USER_PROTOCOL_F_LOG_SHMFD)
        try:
            result = handler(msg)
        except (m.VhostUserError, GuestMemoryError, ValueError, OSError) as e:
            log.error("%s refused: %s", name, e)
            if request in self._with_reply:
                # The front end waits for this reply: answer with a failure status, or an empty
                # payload it will reject.
                return self._error_replies.get(request, b"")
            return m.U64.pack(1) if ack or status_reply else None
        if request in self._with_reply:
            return result
        return m.U64.pack(0) if ack or status_reply else None

    def shutdown(self) -> None:
        """Stops every queue and forgets the session (on disconnect)."""
        if self._transfer is not None:
            self._transfer.wait()
            self._transfer = None
        self._reset()
        self.memory = GuestMemory([])
        self.dirty_log = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
            self._give_backend_channel(None)

    # -- helpers --------------------------------------------------------------------------------
    def _has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol_features & (1 << bit))

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise m.VhostUserError(f"vring index {index} >= queue count {len(self.vrings)}")
        return self.vrings[index]

    def _update(self, index: int) -> None:
        """Starts or stops queue `index` to match its state."""
        vr = self.vrings[index]
        ready = vr.started and vr.enabled and vr.num > 0 and vr.addr is not None and bool(
            self.memory.regions)
        if ready and not vr.running:
            if self._saved:
                # The source's rings start again after its state was saved: the migration failed.
                self._saved = False
                resume = getattr(self.backend, "resume_after_save", None)
                if resume is not None:
                    resume()
                log.info("queues restarted after the device state was saved: the session goes on here")
            queue_log = self._queue_log(vr)
            self.backend.start_queue(index, vr, self.memory, self.acked_features, queue_log)
            vr.running = True
            vr.log = queue_log
            log.info("queue %d started (size %d, base %d%s)", index, vr.num, vr.base,
                     ", logging writes" if queue_log is not None else "")
        elif not ready and vr.running:
            vr.base = self.backend.stop_queue(index)
            vr.running = False
            log.info("queue %d stopped at %d", index, vr.base)

    def _stop(self, index: int) -> None:
        vr = self.vrings[index]
        if vr.running:
            vr.base = self.backend.stop_queue(index)
            vr.running = False

    def _queue_log(self, vr: Vring) -> QueueLog | None:
        """How queue `vr` must log its writes now (None: it need not)."""
        if self.dirty_log is None or not self.acked_features & (1 << m.VHOST_F_LOG_ALL):
            return None
        assert vr.addr is not None
        used_log = vr.addr.log if vr.addr.flags & (1 << m.VHOST_VRING_F_LOG) else None
        return QueueLog(self.dirty_log, used_log)

    def _update_logs(self) -> None:
        """Restarts the running queues whose logging no longer matches the session's."""
        for index, vr in enumerate(self.vrings):
            if not vr.running:
                continue
            wanted = self._queue_log(vr)
            current = vr.log
            if (wanted is None) != (current is None) or (
                    wanted is not None and current is not None
                    and (wanted.dirty, wanted.used_log_addr) != (current.dirty, current.used_log_addr)):
                self._stop(index)
                self._update(index)

    def _reset(self) -> None:
        for i, vr in enumerate(self.vrings):
            self._stop(i)
            for fd in (vr.kick_fd, vr.call_fd, vr.err_fd):
                if fd >= 0:
                    os.close(fd)
            self.vrings[i] = Vring()
        self.acked_features = 0
        self.backend.reset()

    def _set_memory(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.backend.set_memory(memory)
        for i in range(len(self.vrings)):
            self._update(i)

    # -- requests -------------------------------------------------------------------------------
    def get_features(self, msg: Message) -> bytes:
        return m.U64.pack(self.backend.features | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES)

    def set_features(self, msg: Message) -> None:
        features = m.parse_u64(msg.payload)
        offered = self.backend.features | 1 << m.VHOST_USER_F_PROTOCOL_FEATURES
        if features & ~offered:
            raise m.VhostUserError(f"features {features & ~offered:#x} were not offered")
        self.acked_features = features
        self._update_logs()

    def get_protocol_features(self, msg: Message) -> bytes:
        return m.U64.pack(SESSION_PROTOCOL_FEATURES | self.backend.protocol_features)

    def set_protocol_features(self, msg: Message) -> None:
        features = m.parse_u64(msg.payload)
        offered = SESSION_PROTOCOL_FEATURES | self.backend.protocol_features
        if features & ~offered:
            raise m.VhostUserError(f"protocol features {features & ~offered:#x} were not offered")
        self.acked_protocol_features = features

    def set_owner(self, msg: Message) -> None:
        self.owner = True

    def reset_owner(self, msg: Message) -> None:
        self._reset()
        self.owner = False

    def reset_device(self, msg: Message) -> None:
        self._reset()

    def get_queue_num(self, msg: Message) -> bytes:
        return m.U64.pack(len(self.vrings))

    def get_max_mem_slots(self, msg: Message) -> bytes:
        return m.U64.pack(MAX_MEM_SLOTS)

    def set_mem_table(self, msg: Message) -> None:
        regions = m.parse_mem_table(msg.payload)
        if len(msg.fds) != len(regions):
            raise m.VhostUserError(f"{len(regions)} regions but {len(msg.fds)} fds")
        mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, msg.fds, strict=True):
                mapped.append(map_region(region, fd))
            memory = GuestMemory(mapped)
        except BaseException:
            for r in mapped:
                r.unmap()
            raise
        self._set_memory(memory)

    def add_mem_reg(self, msg: Message) -> None:
        region = m.parse_single_region(msg.payload)
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"ADD_MEM_REG with {len(msg.fds)} fds")
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise m.VhostUserError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        mapped = map_region(region, msg.fds[0])
        try:
            memory = self.memory.with_region(mapped)
        except BaseException:
            mapped.unmap()
            raise
        self._set_memory(memory)

    def rem_mem_reg(self, msg: Message) -> None:
        region = m.parse_single_region(msg.payload)
        found: MappedRegion | None = next((r for r in self.memory.regions if r.describes(region)), None)
        if found is None:
            raise m.VhostUserError(f"no memory region at guest address {region.guest_phys_addr:#x}")
        self._set_memory(self.memory.without(found))

    def set_vring_num(self, msg: Message) -> None:
        index, num = m.parse_vring_state(msg.payload)
        vr = self._vring(index)
        try:
            self.backend.check_ring_size(num)
        except ValueError as e:
            raise m.VhostUserError(f"SET_VRING_NUM: {e}") from None
        if vr.running:
            raise m.VhostUserError(f"SET_VRING_NUM on running queue {index}")
        vr.num = num

    def set_vring_addr(self, msg: Message) -> None:
        addr = m.parse_vring_addr(msg.payload)
        vr = self._vring(addr.index)
        try:
            self.backend.check_ring_addresses(addr.desc, addr.avail, addr.used)
        except ValueError as e:
            raise m.VhostUserError(f"SET_VRING_ADDR: {e}") from None
        if vr.running:
            # During migration the front end toggles VHOST_VRING_F_LOG (and sets log_guest_addr) on
            # running rings; moving the rings themselves needs the ring stopped first.
            assert vr.addr is not None
            if (addr.desc, addr.used, addr.avail) != (vr.addr.desc, vr.addr.used, vr.addr.avail):
                raise m.VhostUserError(f"SET_VRING_ADDR moves the rings of running queue {addr.index}")
            vr.addr = addr
            self._update_logs()
            return
        vr.addr = addr

    def set_vring_base(self, msg: Message) -> None:
        index, base = m.parse_vring_state(msg.payload)
        vr = self._vring(index)
        if vr.running:
            raise m.VhostUserError(f"SET_VRING_BASE on running queue {index}")
        vr.base = base & 0xFFFF

    def get_vring_base(self, msg: Message) -> bytes:
        index, _ = m.parse_vring_state(msg.payload)
        vr = self._vring(index)
        # "GET_VRING_BASE stops the ring": no more processing until the next kick fd.
        vr.started = False
        self._update(index)
        if vr.kick_fd >= 0:
            os.close(vr.kick_fd)
            vr.kick_fd = -1
        return m.VRING_STATE.pack(index, vr.base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int, int]:
        index, no_fd = m.parse_vring_fd_index(msg.payload)
        vr = self._vring(index)
        if no_fd:
            if msg.fds:
                raise m.VhostUserError("fd passed with VHOST_USER_VRING_NOFD_MASK set")
            return vr, index, -1
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"expected one fd, got {len(msg.fds)}")
        return vr, index, msg.take_fds()[0]

    def set_vring_kick(self, msg: Message) -> None:
        vr, index, fd = self._vring_fd(msg)
        if fd < 0:
            raise m.VhostUserError("polling mode (no kick fd) is not supported")
        if vr.running:
            self._stop(index)
        if vr.kick_fd >= 0:
            os.close(vr.kick_fd)
        vr.kick_fd = fd
        vr.started = True
        if not self.acked_features & (1 << m.VHOST_USER_F_PROTOCOL_FEATURES):
            vr.enabled = True
        self._update(index)

    def set_vring_call(self, msg: Message) -> None:
        vr, index, fd = self._vring_fd(msg)
        old = vr.call_fd
        vr.call_fd = fd
        if vr.running:
            self.backend.set_call_fd(index, fd)
        if old >= 0:
            os.close(old)

    def set_vring_err(self, msg: Message) -> None:
        vr, _, fd = self._vring_fd(msg)
        if vr.err_fd >= 0:
            os.close(vr.err_fd)
        vr.err_fd = fd

    def set_vring_enable(self, msg: Message) -> None:
        index, enable = m.parse_vring_state(msg.payload)
        vr = self._vring(index)
        if enable not in (0, 1):
            raise m.VhostUserError(f"SET_VRING_ENABLE with {enable}")
        vr.enabled = bool(enable)
        self._update(index)

    def set_backend_req_fd(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"SET_BACKEND_REQ_FD with {len(msg.fds)} fds")
        # An fd that is not a socket raises OSError here and stays the message's to close; the old
        # channel is kept until the new one is known to be good.
        channel = socket.socket(fileno=msg.fds[0])
        msg.take_fds()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = channel
        self._give_backend_channel(
            BackendChannel(self.backend_channel.dup(), self.acked_protocol_features, recorder=self.recorder))

    def _give_backend_channel(self, channel: BackendChannel | None) -> None:
        give = getattr(self.backend, "set_backend_channel", None)
        if give is not None:
            give(channel)
        elif channel is not None:
            channel.close()

    def get_shmem_config(self, msg: Message) -> bytes:
        if not self._has_protocol(m.VHOST_USER_PROTOCOL_F_SHMEM):
            raise m.VhostUserError("GET_SHMEM_CONFIG without VHOST_USER_PROTOCOL_F_SHMEM")
        sizes = list(getattr(self.backend, "shmem_regions", []))
        padded = sizes + [0] * (m.VIRTIO_MAX_SHMEM_REGIONS - len(sizes))
        return m.SHMEM_CONFIG.pack(sum(1 for size in sizes if size), 0, *padded)

    def get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = m.parse_config(msg.payload)
        config = self.backend.config()
        if offset + size > len(config):
            raise m.VhostUserError(f"config range {offset}+{size} beyond {len(config)} bytes")
        return m.CONFIG_HEADER.pack(offset, size, flags) + config[offset:offset + size]

    def set_config(self, msg: Message) -> None:
        # The virtio-fs configuration space (tag, num_request_queues) is read-only (virtio 1.2, 5.11.4).
        raise m.VhostUserError("the virtio-fs configuration space is read-only")

    def set_log_base(self, msg: Message) -> None:
        if not self._has_protocol(m.VHOST_USER_PROTOCOL_F_LOG_SHMFD):
            raise m.VhostUserError("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD")
        size, offset = m.parse_log(msg.payload)
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"SET_LOG_BASE with {len(msg.fds)} fds")
        # The mapping outlives the fd, which the message closes.
        self.dirty_log = DirtyLog(msg.fds[0], size, offset)
        self._update_logs()

    def set_log_fd(self, msg: Message) -> None:
        # The eventfd may be used to tell the front end the log changed ("Migration"): optional, and
        # the front end reads the bitmap when it syncs anyway, so it is taken and closed.
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"SET_LOG_FD with {len(msg.fds)} fds")

    def set_device_state_fd(self, msg: Message) -> bytes:
        if not self._has_protocol(m.VHOST_USER_PROTOCOL_F_DEVICE_STATE):
            raise m.VhostUserError("SET_DEVICE_STATE_FD without VHOST_USER_PROTOCOL_F_DEVICE_STATE")
        direction, _ = m.parse_device_state_params(msg.payload)
        if len(msg.fds) != 1:
            raise m.VhostUserError(f"SET_DEVICE_STATE_FD with {len(msg.fds)} fds")
        running = [i for i, vr in enumerate(self.vrings) if vr.running]
        if running:
            # Phase "stopped": the state is only whole once no request is in flight.
            raise m.VhostUserError(f"device state transfer while queue {running[0]} runs")
        if self._transfer is not None:
            error = self._transfer.wait()
            log.warning("a device state transfer was not checked%s",
                        f" (it failed: {error})" if error else "")
        self._saved = direction == m.VHOST_TRANSFER_STATE_DIRECTION_SAVE
        self._transfer = _Transfer(self.backend, direction, msg.take_fds()[0])
        # No channel of our own: the front end's pipe carries the state.
        return m.U64.pack(m.VHOST_USER_DEVICE_STATE_NO_FD)

    def check_device_state(self, msg: Message) -> bytes:
        if not self._has_protocol(m.VHOST_USER_PROTOCOL_F_DEVICE_STATE):
            raise m.VhostUserError("CHECK_DEVICE_STATE without VHOST_USER_PROTOCOL_F_DEVICE_STATE")
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            raise m.VhostUserError("CHECK_DEVICE_STATE without a device state transfer")
        return m.U64.pack(0 if transfer.wait() is None else 1)
