"""The FUSE wire ABI: struct sizes and field offsets as include/uapi/linux/fuse.h lays them out."""

from __future__ import annotations

import struct

import pytest

from vhostfs.fuse import abi


@pytest.mark.parametrize(("st", "size"), [
    (abi.IN_HEADER, 40), (abi.OUT_HEADER, 16), (abi.ATTR, 88), (abi.KSTATFS, 80),
    (abi.ENTRY_OUT, 128), (abi.ATTR_OUT, 104), (abi.OPEN_OUT, 16), (abi.WRITE_OUT, 8),
    (abi.GETXATTR_OUT, 8), (abi.INIT_IN, 64), (abi.INIT_IN_COMPAT, 16), (abi.INIT_OUT, 64),
    (abi.SETATTR_IN, 88), (abi.READ_IN, 40), (abi.WRITE_IN, 40), (abi.RELEASE_IN, 24),
    (abi.FLUSH_IN, 24), (abi.CREATE_IN, 16), (abi.MKNOD_IN, 16), (abi.RENAME2_IN, 16),
    (abi.LK_IN, 48), (abi.COPY_FILE_RANGE_IN, 56), (abi.DIRENT, 24), (abi.DIRENTPLUS, 152),
    (abi.STATX, 256), (abi.STATX_OUT, 288), (abi.STATX_IN, 24), (abi.SETUPMAPPING_IN, 40),
    (abi.FALLOCATE_IN, 32), (abi.LSEEK_IN, 24), (abi.SETXATTR_IN, 16), (abi.SETXATTR_IN_COMPAT, 8),
])
def test_struct_sizes_match_fuse_h(st: struct.Struct, size: int) -> None:
    assert st.size == size
    assert st.format.startswith("<")


def test_in_header_field_offsets() -> None:
    raw = abi.IN_HEADER.pack(0x11111111, 26, 0x2222222222222222, 0x3333333333333333, 0x44, 0x55, 0x66, 7, 0)
    assert raw[0:4] == b"\x11" * 4
    assert raw[4:8] == (26).to_bytes(4, "little")
    assert raw[8:16] == b"\x22" * 8
    assert raw[16:24] == b"\x33" * 8
    assert raw[24:36] == bytes([0x44, 0, 0, 0, 0x55, 0, 0, 0, 0x66, 0, 0, 0])
    assert raw[36:38] == b"\x07\x00"


def test_out_header_error_is_signed() -> None:
    assert abi.OUT_HEADER.pack(16, -2, 5) == struct.pack("<IiQ", 16, -2, 5)


def test_entry_out_attr_offsets() -> None:
    # nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec, then fuse_attr
    # (ino @40, size @48, ..., mode @100, nlink @104, uid @108, gid @112, rdev @116, blksize @120)
    attr = (10, 20, 30, 40, 50, 60, 1, 2, 3, 0o100644, 1, 1000, 1001, 0, 4096, 0)
    raw = abi.ENTRY_OUT.pack(5, 6, 7, 8, 9, 11, *attr)
    assert struct.unpack_from("<Q", raw, 40)[0] == 10
    assert struct.unpack_from("<I", raw, 100)[0] == 0o100644
    assert struct.unpack_from("<II", raw, 108) == (1000, 1001)
    assert struct.unpack_from("<I", raw, 120)[0] == 4096


def test_negative_times_travel_as_twos_complement() -> None:
    raw = abi.ATTR.pack(1, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert raw[24:32] == b"\xff" * 8


def test_init_out_layout() -> None:
    raw = abi.INIT_OUT.pack(7, 38, 1 << 17, 0xAABBCCDD, 12, 9, 1 << 20, 1, 256, 12, 0x5, 0, 0)
    assert struct.unpack_from("<IIII", raw) == (7, 38, 1 << 17, 0xAABBCCDD)
    assert struct.unpack_from("<HHII", raw, 16) == (12, 9, 1 << 20, 1)
    assert struct.unpack_from("<HHI", raw, 28) == (256, 12, 5)
    assert raw[36:] == bytes(28)


def test_setattr_in_layout() -> None:
    raw = bytearray(88)
    struct.pack_into("<I", raw, 0, abi.FATTR_MODE | abi.FATTR_SIZE)
    struct.pack_into("<QQ", raw, 8, 3, 4096)          # fh, size
    struct.pack_into("<I", raw, 68, 0o644)            # mode
    struct.pack_into("<II", raw, 76, 1000, 1001)      # uid, gid
    valid, fh, size, _, _, _, _, _, _, _, mode, uid, gid = abi.SETATTR_IN.unpack(raw)
    assert (valid, fh, size, mode, uid, gid) == (abi.FATTR_MODE | abi.FATTR_SIZE, 3, 4096, 0o644, 1000, 1001)


def test_padding_fields_pack_as_zeros() -> None:
    assert abi.WRITE_OUT.pack(5) == b"\x05\x00\x00\x00" + bytes(4)
    assert abi.KSTATFS.pack(1, 2, 3, 4, 5, 6, 7, 8)[56:] == bytes(24)


def test_opcodes_and_flags() -> None:
    assert (abi.FUSE_LOOKUP, abi.FUSE_INIT, abi.FUSE_READDIRPLUS, abi.FUSE_STATX) == (1, 26, 44, 52)
    assert abi.OPCODE_NAMES[abi.FUSE_BATCH_FORGET] == "FUSE_BATCH_FORGET"
    assert abi.FUSE_INIT_EXT == 1 << 30
    assert abi.FUSE_MAP_ALIGNMENT == 1 << 26
    # flags2 bits are the high word: FUSE_HAS_INODE_DAX is bit 1 of flags2.
    assert abi.FUSE_HAS_INODE_DAX >> 32 == 1 << 1
    assert abi.FUSE_SECURITY_CTX >> 32 == 1
    assert abi.FATTR_KILL_SUIDGID == 1 << 11
    assert abi.FOPEN_KEEP_CACHE == 2


@pytest.mark.parametrize(("namelen", "plus", "size"), [
    (1, False, 32), (8, False, 32), (9, False, 40), (0, False, 24),
    (1, True, 160), (8, True, 160), (9, True, 168),
])
def test_dirent_size_is_8_aligned(namelen: int, plus: bool, size: int) -> None:
    assert abi.dirent_size(namelen, plus) == size
