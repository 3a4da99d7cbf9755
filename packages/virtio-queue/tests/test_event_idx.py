"""Property tests of the wrap-safe event-index rule (virtio 1.2 section 2.7.10)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from virtio_queue import vring_need_event

u16 = st.integers(0, 0xFFFF)


@given(old=u16, step=st.integers(0, 0xFFFF), event=u16)
def test_need_event_iff_event_in_window(old: int, step: int, event: int) -> None:
    """Moving old -> old+step (mod 2**16) passes event exactly when event is in [old, new)."""
    new = (old + step) & 0xFFFF
    passed = any((old + i) & 0xFFFF == event for i in range(step)) if step < 64 else None
    expected = (event - old) & 0xFFFF < step
    if passed is not None:
        assert expected == passed
    assert vring_need_event(event, new, old) == expected


@given(old=u16, event=u16)
def test_no_movement_never_needs_event(old: int, event: int) -> None:
    assert not vring_need_event(event, old, old)


@given(old=u16, step=st.integers(1, 0xFFFF))
def test_event_just_before_new_fires(old: int, step: int) -> None:
    """The usual case: the other side asked for "the next one" (event = new - 1)."""
    new = (old + step) & 0xFFFF
    assert vring_need_event((new - 1) & 0xFFFF, new, old)
    assert not vring_need_event(new, new, old)


@given(old=u16, a=st.integers(0, 200), b=st.integers(0, 200), event=u16)
def test_split_batches_fire_exactly_once(old: int, a: int, b: int, event: int) -> None:
    """Publishing in two batches fires at most once, and once iff one batch would fire."""
    mid = (old + a) & 0xFFFF
    new = (mid + b) & 0xFFFF
    first = vring_need_event(event, mid, old)
    second = vring_need_event(event, new, mid)
    assert not (first and second)
    assert (first or second) == vring_need_event(event, new, old)


def test_wraps_across_zero() -> None:
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert vring_need_event(0, 1, 0xFFFE)
    assert not vring_need_event(1, 1, 0xFFFE)
    assert not vring_need_event(0xFFFD, 1, 0xFFFE)
