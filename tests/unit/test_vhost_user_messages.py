"""vhost-user message parsing and validation, without a socket."""

import pytest

from vhostfs.vhost_user import messages as m


def header(request=1, flags=m.VHOST_USER_VERSION, size=0):
    return m.HEADER.pack(request, flags, size)


def test_header_ok():
    h = m.parse_header(header(5, m.VHOST_USER_VERSION | m.VHOST_USER_NEED_REPLY_MASK, 40))
    assert (h.request, h.size, h.need_reply) == (5, 40, True)


@pytest.mark.parametrize("flags", [0, 2, 3, m.VHOST_USER_VERSION | 0x10, m.VHOST_USER_VERSION | 1 << 31])
def test_header_wrong_version_or_reserved_bits(flags):
    with pytest.raises(m.VhostUserError):
        m.parse_header(header(flags=flags))


def test_header_reply_flag_refused():
    with pytest.raises(m.VhostUserError):
        m.parse_header(header(flags=m.VHOST_USER_VERSION | m.VHOST_USER_REPLY_MASK))


def test_header_size_over_4096():
    with pytest.raises(m.VhostUserError, match="exceeds"):
        m.parse_header(header(size=4097))


def region(gpa=0, size=0x1000, uva=0x10000, off=0):
    return m.MEMORY_REGION.pack(gpa, size, uva, off)


def test_mem_table_parses():
    regions = m.parse_mem_table(m.MEMORY_HEADER.pack(2, 0) + region() + region(0x1000, 0x2000, 0x20000, 64))
    assert regions[1] == m.MemoryRegion(0x1000, 0x2000, 0x20000, 64)


@pytest.mark.parametrize("n", [0, 9, 0xFFFFFFFF])
def test_mem_table_region_count(n):
    with pytest.raises(m.VhostUserError):
        m.parse_mem_table(m.MEMORY_HEADER.pack(n, 0) + region() * 8)


def test_mem_table_shorter_than_count():
    with pytest.raises(m.VhostUserError):
        m.parse_mem_table(m.MEMORY_HEADER.pack(2, 0) + region())


def test_region_size_zero():
    with pytest.raises(m.VhostUserError, match="size 0"):
        m.parse_single_region(bytes(8) + region(size=0))


@pytest.mark.parametrize("kw", [dict(gpa=(1 << 64) - 0x800), dict(uva=(1 << 64) - 1),
                                dict(off=(1 << 64) - 0x10)])
def test_region_overflow(kw):
    with pytest.raises(m.VhostUserError, match="overflows"):
        m.parse_single_region(bytes(8) + region(**kw))


def test_short_payloads():
    for parse in (m.parse_u64, m.parse_vring_state, m.parse_vring_addr, m.parse_single_region,
                  m.parse_config, m.parse_log):
        with pytest.raises(m.VhostUserError):
            parse(b"\0" * 4)


def test_vring_fd_index():
    assert m.parse_vring_fd_index(m.U64.pack(3)) == (3, False)
    assert m.parse_vring_fd_index(m.U64.pack(0x100 | 1)) == (1, True)
    with pytest.raises(m.VhostUserError):
        m.parse_vring_fd_index(m.U64.pack(0x200))
