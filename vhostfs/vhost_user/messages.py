"""vhost-user wire format: request codes, flags, payload structs and their validation (pure functions).

Names follow docs/interop/vhost-user.rst in QEMU. vhost-user uses the host's native byte order ("=").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class VhostUserError(Exception):
    """A message that breaks the protocol: the request is refused (or the connection closed)."""


class Request(IntEnum):
    """Front-end requests ("Front-end message types")."""

    VHOST_USER_GET_FEATURES = 1
    VHOST_USER_SET_FEATURES = 2
    VHOST_USER_SET_OWNER = 3
    VHOST_USER_RESET_OWNER = 4
    VHOST_USER_SET_MEM_TABLE = 5
    VHOST_USER_SET_LOG_BASE = 6
    VHOST_USER_SET_LOG_FD = 7
    VHOST_USER_SET_VRING_NUM = 8
    VHOST_USER_SET_VRING_ADDR = 9
    VHOST_USER_SET_VRING_BASE = 10
    VHOST_USER_GET_VRING_BASE = 11
    VHOST_USER_SET_VRING_KICK = 12
    VHOST_USER_SET_VRING_CALL = 13
    VHOST_USER_SET_VRING_ERR = 14
    VHOST_USER_GET_PROTOCOL_FEATURES = 15
    VHOST_USER_SET_PROTOCOL_FEATURES = 16
    VHOST_USER_GET_QUEUE_NUM = 17
    VHOST_USER_SET_VRING_ENABLE = 18
    VHOST_USER_SEND_RARP = 19
    VHOST_USER_NET_SET_MTU = 20
    VHOST_USER_SET_BACKEND_REQ_FD = 21
    VHOST_USER_IOTLB_MSG = 22
    VHOST_USER_SET_VRING_ENDIAN = 23
    VHOST_USER_GET_CONFIG = 24
    VHOST_USER_SET_CONFIG = 25
    VHOST_USER_CREATE_CRYPTO_SESSION = 26
    VHOST_USER_CLOSE_CRYPTO_SESSION = 27
    VHOST_USER_POSTCOPY_ADVISE = 28
    VHOST_USER_POSTCOPY_LISTEN = 29
    VHOST_USER_POSTCOPY_END = 30
    VHOST_USER_GET_INFLIGHT_FD = 31
    VHOST_USER_SET_INFLIGHT_FD = 32
    VHOST_USER_GPU_SET_SOCKET = 33
    VHOST_USER_RESET_DEVICE = 34
    VHOST_USER_VRING_KICK = 35
    VHOST_USER_GET_MAX_MEM_SLOTS = 36
    VHOST_USER_ADD_MEM_REG = 37
    VHOST_USER_REM_MEM_REG = 38
    VHOST_USER_SET_STATUS = 39
    VHOST_USER_GET_STATUS = 40
    VHOST_USER_GET_SHARED_OBJECT = 41
    VHOST_USER_SET_DEVICE_STATE_FD = 42
    VHOST_USER_CHECK_DEVICE_STATE = 43
    VHOST_USER_GET_SHMEM_CONFIG = 44


class BackendRequest(IntEnum):
    """Back-end requests, sent on the channel of SET_BACKEND_REQ_FD ("Back-end message types").

    The out-of-tree virtio-fs DAX patches used 6..9 for FS_MAP, FS_UNMAP, FS_SYNC and FS_IO; upstream
    gave those numbers to SHARED_OBJECT_* and SHMEM_MAP, and no protocol feature tells the two meanings
    apart, so vhostfs speaks only the upstream SHMEM requests.
    """

    VHOST_USER_BACKEND_IOTLB_MSG = 1
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2
    VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    VHOST_USER_BACKEND_SHARED_OBJECT_ADD = 6
    VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE = 7
    VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP = 8
    VHOST_USER_BACKEND_SHMEM_MAP = 9
    VHOST_USER_BACKEND_SHMEM_UNMAP = 10


# Header flags ("Message Specification").
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
VHOST_USER_FLAGS_KNOWN = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK

# Virtio feature bits (virtio 1.2, 6 "Reserved Feature Bits"; vhost.h for the vhost ones).
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

# Protocol feature bits ("Protocol features").
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_MTU = 4
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16
VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19
VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT = 20
#: Shared memory regions (GET_SHMEM_CONFIG, BACKEND_SHMEM_MAP/UNMAP): bit 22 in QEMU 11.1, the first
#: release to have them; drafts of the extension used 20, which 11.1 gives to GET_VRING_BASE_INFLIGHT.
#: tests/data/qemu-11.1-dax-session.txt records QEMU 11.1 negotiating it.
VHOST_USER_PROTOCOL_F_SHMEM = 22

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 are the index, bit 8 says no fd is passed.
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

#: Largest payload accepted: no request in the protocol comes near it (SET_MEM_TABLE is 264 bytes).
MAX_PAYLOAD = 4096
#: Regions one SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: Largest number of file descriptors one message may carry.
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS

HEADER = struct.Struct("=III")  # request, flags, size
assert HEADER.size == 12
U64 = struct.Struct("=Q")
assert U64.size == 8
VRING_STATE = struct.Struct("=II")  # index, num
assert VRING_STATE.size == 8
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
assert VRING_ADDR.size == 40
MEMORY_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
assert MEMORY_REGION.size == 32
MEMORY_HEADER = struct.Struct("=II")  # nregions, padding
assert MEMORY_HEADER.size == 8
SINGLE_MEMORY_REGION = struct.Struct("=Q32x")  # padding, then one region
assert SINGLE_MEMORY_REGION.size == 40
CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags
assert CONFIG_HEADER.size == 12
LOG = struct.Struct("=QQ")  # mmap_size, mmap_offset
assert LOG.size == 16
#: SET_DEVICE_STATE_FD payload ("device state transfer parameters"): direction, phase.
DEVICE_STATE_PARAMS = struct.Struct("=II")
assert DEVICE_STATE_PARAMS.size == 8

#: Transfer directions and phases of SET_DEVICE_STATE_FD ("Migrating back-end state"): the source
#: saves (back end writes), the destination loads (back end reads); the only phase is "stopped",
#: after every ring was stopped with GET_VRING_BASE.
VHOST_TRANSFER_STATE_DIRECTION_SAVE = 0
VHOST_TRANSFER_STATE_DIRECTION_LOAD = 1
VHOST_TRANSFER_STATE_PHASE_STOPPED = 0
#: SET_DEVICE_STATE_FD reply: bits 0-7 are the status, bit 8 says the back end returns no fd of its
#: own (the front end's channel is used).
VHOST_USER_DEVICE_STATE_NO_FD = 0x1 << 8

VHOST_VRING_F_LOG = 0

#: SHMEM_MAP / SHMEM_UNMAP payload ("MMAP request"): shmid (u8), 7 bytes padding, fd_offset,
#: shm_offset, len, flags.
MMAP_REQUEST = struct.Struct("=B7xQQQQ")
assert MMAP_REQUEST.size == 40
#: MMAP request flags: without it the front end maps the pages read-only.
VHOST_USER_FLAG_MAP_RW = 1 << 0
#: Shared memory regions GET_SHMEM_CONFIG can describe (VIRTIO_MAX_SHMEM_REGIONS).
VIRTIO_MAX_SHMEM_REGIONS = 256
#: GET_SHMEM_CONFIG reply ("VIRTIO Shared Memory Region configuration"): nregions, padding, then one
#: u64 size per shmid.
SHMEM_CONFIG = struct.Struct(f"=II{VIRTIO_MAX_SHMEM_REGIONS}Q")
assert SHMEM_CONFIG.size == 8 + 8 * VIRTIO_MAX_SHMEM_REGIONS


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def parse_header(data: bytes) -> Header:
    """Parses and checks a message header; a bad one means the stream cannot be trusted any more."""
    request, flags, size = HEADER.unpack(data)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise VhostUserError(f"unsupported protocol version in flags {flags:#x}")
    if flags & ~VHOST_USER_FLAGS_KNOWN:
        raise VhostUserError(f"reserved flag bits set: {flags:#x}")
    if flags & VHOST_USER_REPLY_MASK:
        raise VhostUserError("a reply where a request was expected")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"payload size {size} exceeds {MAX_PAYLOAD}")
    return Header(request, flags, size)


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise VhostUserError(f"{what}: payload of {len(payload)} bytes, need {size}")


def parse_u64(payload: bytes) -> int:
    _need(payload, U64.size, "u64 payload")
    return U64.unpack_from(payload)[0]


def parse_device_state_params(payload: bytes) -> tuple[int, int]:
    """SET_DEVICE_STATE_FD: (direction, phase), refused unless both are values the spec defines."""
    _need(payload, DEVICE_STATE_PARAMS.size, "device state transfer parameters")
    direction, phase = DEVICE_STATE_PARAMS.unpack_from(payload)
    if direction not in (VHOST_TRANSFER_STATE_DIRECTION_SAVE, VHOST_TRANSFER_STATE_DIRECTION_LOAD):
        raise VhostUserError(f"device state transfer direction {direction}")
    if phase != VHOST_TRANSFER_STATE_PHASE_STOPPED:
        raise VhostUserError(f"device state transfer phase {phase} (only 'stopped' exists)")
    return direction, phase


def parse_vring_state(payload: bytes) -> tuple[int, int]:
    _need(payload, VRING_STATE.size, "vring state")
    return VRING_STATE.unpack_from(payload)


def parse_vring_addr(payload: bytes) -> VringAddr:
    _need(payload, VRING_ADDR.size, "vring address")
    return VringAddr(*VRING_ADDR.unpack_from(payload))


def parse_vring_fd_index(payload: bytes) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: returns (index, no_fd)."""
    value = parse_u64(payload)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise VhostUserError(f"reserved bits set in vring fd payload {value:#x}")
    return value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK)


def _region(payload: bytes, offset: int) -> MemoryRegion:
    gpa, size, uva, mmap_offset = MEMORY_REGION.unpack_from(payload, offset)
    if size == 0:
        raise VhostUserError("memory region of size 0")
    for base, name in ((gpa, "guest address"), (uva, "user address"), (mmap_offset, "mmap offset")):
        if base + size > 1 << 64:
            raise VhostUserError(f"memory region {name} {base:#x} + size {size:#x} overflows")
    return MemoryRegion(gpa, size, uva, mmap_offset)


def parse_mem_table(payload: bytes) -> list[MemoryRegion]:
    """SET_MEM_TABLE: 1 to 8 regions, each non-empty and not overflowing (overlaps are checked later)."""
    _need(payload, MEMORY_HEADER.size, "memory table")
    nregions, _ = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise VhostUserError(f"memory table with {nregions} regions")
    _need(payload, MEMORY_HEADER.size + nregions * MEMORY_REGION.size, "memory table")
    return [_region(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size) for i in range(nregions)]


def parse_single_region(payload: bytes) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: one region after 8 bytes of padding."""
    _need(payload, SINGLE_MEMORY_REGION.size, "memory region")
    return _region(payload, 8)


def parse_config(payload: bytes) -> tuple[int, int, int, bytes]:
    """GET/SET_CONFIG: (offset, size, flags, data)."""
    _need(payload, CONFIG_HEADER.size, "config")
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    _need(payload, CONFIG_HEADER.size + size, "config data")
    return offset, size, flags, payload[CONFIG_HEADER.size:CONFIG_HEADER.size + size]


def parse_log(payload: bytes) -> tuple[int, int]:
    """SET_LOG_BASE: (mmap_size, mmap_offset)."""
    _need(payload, LOG.size, "log base")
    return LOG.unpack_from(payload)


def reply_header(request: int, size: int) -> bytes:
    return HEADER.pack(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, size)


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
