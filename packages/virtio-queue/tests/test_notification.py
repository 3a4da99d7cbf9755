"""Notification suppression both ways (virtio 1.2 sections 2.7.7 and 2.7.10)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout, vring_need_event
from vq_guest import Guest


def test_interrupts_without_event_idx(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    assert not drv.event_idx
    drv.add_chain([(guest.data, 4, True)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    dev.add_used(chain.head, 4)
    assert dev.needs_notification()
    assert not dev.needs_notification()  # nothing new since
    drv.add_chain([(guest.data, 4, True)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    drv.set_no_interrupt(True)
    dev.add_used(chain.head, 4)
    assert not dev.needs_notification()  # the driver asked for none (2.7.7.1)


def test_interrupts_with_event_idx(guest: Guest) -> None:
    drv = guest.driver(event_idx=True, start_index=65533)
    dev = drv.device_queue()
    heads = [drv.add_chain([(guest.data, 4, True)]) for _ in range(6)]
    drv.publish()
    drv.set_used_event(65533 + 2)  # interrupt once the used idx moves past 65535
    for head in heads[:2]:
        assert dev.pop() is not None
        dev.add_used(head, 4)
    # First call after start always notifies (nothing is known about earlier interrupts).
    assert dev.needs_notification()
    assert dev.pop() is not None
    dev.add_used(heads[2], 4)  # used idx 65535 -> 0: passes used_event 65535
    assert dev.needs_notification()
    assert dev.pop() is not None
    dev.add_used(heads[3], 4)  # used_event now behind: no interrupt
    assert not dev.needs_notification()
    drv.get_used()  # re-arms: used_event = last seen used idx
    for head in heads[4:]:
        assert dev.pop() is not None
        dev.add_used(head, 4)
    assert dev.needs_notification()
    assert not dev.needs_notification()


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 0xFFFF),
    steps=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 0xFFFF)), min_size=1, max_size=12),
)
def test_needs_notification_follows_vring_need_event(
    start: int, steps: list[tuple[int, int]]
) -> None:
    """Batches of completions against arbitrary used_event values: the device must answer
    exactly vring_need_event(used_event, new, old) where old is the idx at the last check."""
    memory = GuestMemory([MemoryRegion.anonymous(0, 1 << 16)])
    drv = DriverQueue(memory, QueueLayout.at(0, 8), event_idx=True, start_index=start)
    dev = drv.device_queue()
    dev.needs_notification()  # the unconditional first answer
    old = start
    for count, event in steps:
        heads = [drv.add_chain([(0x2000, 4, True)]) for _ in range(count)]
        drv.publish()
        for head in heads:
            assert dev.pop() is not None
            dev.add_used(head, 4)
        drv.set_used_event(event)
        new = (old + count) & 0xFFFF
        assert dev.needs_notification() == vring_need_event(event, new, old)
        drv.get_used()
        old = new
    memory.close()


def test_kicks_without_event_idx(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    drv.add_chain([(guest.data, 4, False)])
    assert drv.publish()  # notifications on by default
    dev.disable_notification()
    drv.add_chain([(guest.data, 4, False)])
    assert not drv.publish()  # VIRTQ_USED_F_NO_NOTIFY
    assert dev.pop() is not None and dev.pop() is not None and dev.pop() is None
    assert not dev.enable_notification()  # nothing pending
    drv.add_chain([(guest.data, 4, False)])
    assert drv.publish()
    assert dev.enable_notification()  # one pending: the device must drain again


def test_kicks_with_event_idx(guest: Guest) -> None:
    drv = guest.driver(event_idx=True, start_index=65534)
    dev = drv.device_queue()
    assert dev.pop() is None  # draining an empty ring publishes avail_event = 65534
    drv.add_chain([(guest.data, 4, False)])
    assert drv.publish()  # 65534 -> 65535 passes avail_event 65534
    drv.add_chain([(guest.data, 4, False)])
    assert not drv.publish()  # the device has not caught up: no second kick
    assert dev.pop() is not None and dev.pop() is not None
    assert dev.pop() is None  # avail_event = 0 now
    drv.add_chain([(guest.data, 4, False)])
    assert drv.publish()
    # With kicks disabled avail_event stays behind, so the driver stops kicking.
    dev.disable_notification()
    assert dev.pop() is not None and dev.pop() is None
    drv.add_chain([(guest.data, 4, False)])
    assert not drv.publish()
    assert dev.enable_notification()  # and the device finds the chain it was not kicked for
    assert dev.pop() is not None and dev.pop() is None
    drv.add_chain([(guest.data, 4, False)])
    assert drv.publish()


def test_no_lost_kick_when_a_chain_lands_during_the_empty_check(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2.7.10: the device re-reads avail idx after publishing avail_event.

    The driver is made to publish a chain right after the device's read of avail idx that
    finds the ring empty, and before the device moves avail_event: the driver then sees a
    stale avail_event and does not kick, so the device must find the chain by itself.
    """
    drv = guest.driver(event_idx=True)
    dev = drv.device_queue()
    drv.add_chain([(guest.data, 4, False)])
    drv.publish()
    assert dev.pop() is not None
    real = dev._avail16
    kicked: list[bool] = []

    class RacingAvail:
        """The avail ring as the device reads it; the driver publishes right after the read
        of avail idx (item 1) that finds the ring empty."""

        def __getitem__(self, item: int) -> int:
            value: int = real[item]
            if item == 1 and not kicked:
                drv.add_chain([(guest.data, 4, False)])
                kicked.append(drv.publish())
            return value

    monkeypatch.setattr(dev, "_avail16", RacingAvail())
    chain = dev.pop()
    assert kicked == [False]  # the race really happened: no kick for this chain
    assert chain is not None
