"""Byte layouts and the queue layout helper (virtio 1.2 section 2.7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_queue import QueueLayout, VirtqDesc, VirtqUsedElem, feature_mask
from virtio_queue.layout import (
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_event_offset,
    used_ring_size,
)


def test_area_sizes_match_the_spec() -> None:
    # 2.7: descriptor table 16*N, avail ring 6+2*N, used ring 6+8*N.
    assert desc_table_size(256) == 4096
    assert avail_ring_size(256) == 6 + 2 * 256
    assert used_ring_size(256) == 6 + 8 * 256
    assert used_event_offset(256) == 4 + 2 * 256
    assert avail_event_offset(256) == 4 + 8 * 256


@given(st.integers(0, 15), st.integers(0, 1 << 40))
def test_layout_is_aligned_and_disjoint(order: int, base: int) -> None:
    size = 1 << order
    layout = QueueLayout.at(base, size)
    assert layout.desc_addr % 16 == 0 and layout.desc_addr >= base
    assert layout.avail_addr % 2 == 0
    assert layout.used_addr % 4 == 0
    assert layout.avail_addr >= layout.desc_addr + desc_table_size(size)
    assert layout.used_addr >= layout.avail_addr + avail_ring_size(size)
    assert layout.end == layout.used_addr + used_ring_size(size)


def test_legacy_used_alignment() -> None:
    layout = QueueLayout.at(0, 256, used_align=4096)
    assert layout.used_addr % 4096 == 0


@pytest.mark.parametrize("size", [0, 3, 100, 65536, -4])
def test_bad_sizes_rejected(size: int) -> None:
    assert not is_valid_queue_size(size)
    with pytest.raises(ValueError):
        QueueLayout.at(0, size)


@given(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)
def test_desc_round_trip(addr: int, length: int, flags: int, nxt: int) -> None:
    desc = VirtqDesc(addr, length, flags, nxt)
    raw = desc.pack()
    assert len(raw) == 16
    assert raw[:8] == addr.to_bytes(8, "little")
    assert raw[12:14] == flags.to_bytes(2, "little")
    assert VirtqDesc.unpack_from(raw) == desc


def test_used_elem_round_trip() -> None:
    raw = VirtqUsedElem(7, 4096).pack()
    assert raw == (7).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    assert VirtqUsedElem.unpack_from(raw) == VirtqUsedElem(7, 4096)


def test_feature_mask() -> None:
    assert feature_mask(32, 28, 29) == (1 << 32) | (1 << 28) | (1 << 29)
    with pytest.raises(ValueError):
        feature_mask(64)
