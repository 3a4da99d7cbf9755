"""Codecs of vhost_user.messages and the framer of vhost_user.framing."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vhost_user.errors import ProtocolError
from vhost_user.framing import MessageFramer
from vhost_user.messages import (
    HEADER_SIZE,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_FLAG_REPLY,
    FrontendRequest,
    Header,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostVringAddr,
    VhostVringState,
    encode_message,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


def test_sizes_match_the_spec() -> None:
    assert HEADER_SIZE == 12
    assert VhostVringState.STRUCT.size == 8
    assert VhostVringAddr.STRUCT.size == 40
    assert VhostUserMemoryRegion.STRUCT.size == 32
    assert VhostUserMemRegMsg.STRUCT.size == 40
    assert VhostUserInflight.STRUCT.size == 24
    assert VhostUserConfig.HEADER_SIZE == 12


def test_header_flags() -> None:
    header = Header.unpack(encode_message(FrontendRequest.GET_FEATURES, flags=1 | 8))
    assert header == Header(1, 9, 0)
    assert header.version == 1 and header.need_reply and not header.is_reply
    assert Header(1, 1 | VHOST_USER_FLAG_REPLY, 0).is_reply
    assert Header(1, VHOST_USER_FLAG_NEED_REPLY, 0).version == 0


@given(u32, u32)
def test_vring_state_round_trip(index: int, num: int) -> None:
    state = VhostVringState(index, num)
    assert VhostVringState.unpack(state.pack()) == state


@given(st.tuples(u32, u32, u64, u64, u64, u64))
def test_vring_addr_round_trip(fields: tuple[int, int, int, int, int, int]) -> None:
    addr = VhostVringAddr(*fields)
    assert VhostVringAddr.unpack(addr.pack()) == addr


@given(st.lists(st.tuples(u64, u64, u64, u64), min_size=1, max_size=8))
def test_memory_round_trip(regions: list[tuple[int, int, int, int]]) -> None:
    table = VhostUserMemory(tuple(VhostUserMemoryRegion(*r) for r in regions))
    packed = table.pack()
    assert len(packed) == 8 + 32 * len(regions)
    assert VhostUserMemory.unpack(packed) == table
    # The full-size form (all eight slots sent) decodes the same.
    assert VhostUserMemory.unpack(packed + bytes(264 - len(packed))) == table


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack("=II", 0, 0),  # no regions
        struct.pack("=II", 9, 0) + bytes(9 * 32),  # too many
        struct.pack("=II", 2, 0) + bytes(32),  # short
        struct.pack("=II", 1, 0) + bytes(8 * 32 + 1),  # longer than the full table
    ],
)
def test_memory_rejects(payload: bytes) -> None:
    with pytest.raises(struct.error):
        VhostUserMemory.unpack(payload)


@given(u32, st.binary(max_size=256), u32)
def test_config_round_trip(offset: int, data: bytes, flags: int) -> None:
    config = VhostUserConfig(offset, len(data), flags, data)
    assert VhostUserConfig.unpack(config.pack()) == config


@pytest.mark.parametrize(
    "payload",
    [
        b"\0" * 11,
        struct.pack("=III", 0, 4, 0) + b"abc",
        struct.pack("=III", 0, 257, 0) + bytes(257),
    ],
)
def test_config_rejects(payload: bytes) -> None:
    with pytest.raises(struct.error):
        VhostUserConfig.unpack(payload)


@given(u64, u64, u16, u16)
def test_inflight_round_trip(size: int, offset: int, nq: int, qs: int) -> None:
    inflight = VhostUserInflight(size, offset, nq, qs)
    assert VhostUserInflight.unpack(inflight.pack()) == inflight
    assert VhostUserInflight.unpack(inflight.pack()[:20]) == inflight
    with pytest.raises(struct.error):
        VhostUserInflight.unpack(inflight.pack()[:16])


@given(st.lists(st.tuples(st.integers(0, 64), st.binary(max_size=300)), max_size=6), st.data())
def test_framer_reassembles_any_split(specs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_message(code, payload) for code, payload in specs)
    framer = MessageFramer()
    got = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, max(1, len(stream) - pos)))
        got.extend(framer.feed(stream[pos : pos + step]))
        pos += step
    assert [(m.header.request, m.payload) for m in got] == specs
    assert framer.idle


def test_framer_attaches_fds_to_the_message_whose_header_they_came_with() -> None:
    framer = MessageFramer()
    first = encode_message(1)
    second = encode_message(12, struct.pack("=Q", 0))
    r, w = os.pipe()
    try:
        messages = framer.feed(first, [])
        assert messages[0].fds == []
        assert framer.bytes_needed() == HEADER_SIZE
        assert framer.feed(second[:HEADER_SIZE], [r]) == []
        assert framer.bytes_needed() == 8
        (message,) = framer.feed(second[HEADER_SIZE:])
        assert message.fds == [r]
    finally:
        os.close(w)
        os.close(r)


def test_framer_refuses_huge_payload_and_closes_fds() -> None:
    framer = MessageFramer()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError):
        framer.feed(struct.pack("=III", 5, 1, 1 << 20), [r])
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the framer
