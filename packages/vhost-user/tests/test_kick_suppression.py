"""The queue runner's drain loop: kicks suppressed while the device works, a re-check before
sleeping (virtio 1.2 2.7.7 / 2.7.10), and no endless loop over buffers a device keeps."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from vhost_user.server import _drain
from vhost_user.vring import Vring
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout

DATA = 0x10000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([MemoryRegion.anonymous(0, 1 << 20)])
    yield mem
    mem.close()


def _setup(memory: GuestMemory, event_idx: bool) -> tuple[DriverQueue, Vring]:
    drv = DriverQueue(memory, QueueLayout.at(0x1000, 16), event_idx=event_idx)
    return drv, Vring(2, drv.device_queue())


def _consumer(
    vring: Vring, during_first: Callable[[], None] | None = None
) -> tuple[list[int], Callable[[int, Vring], None]]:
    """A handle_kick that drains the ring, running `during_first` in the middle of call 1."""
    handled: list[int] = []
    calls = [0]

    def handle(index: int, v: Vring) -> None:
        calls[0] += 1
        while (chain := v.pop()) is not None:
            handled.append(chain.head)
            if calls[0] == 1 and during_first is not None and len(handled) == 1:
                during_first()
            v.add_used(chain.head, 0)

    return handled, handle


@pytest.mark.parametrize("event_idx", [False, True])
def test_buffer_added_while_handling_is_served_without_a_kick(
    memory: GuestMemory, event_idx: bool
) -> None:
    drv, vring = _setup(memory, event_idx)
    first = drv.add_chain([(DATA, 16, False)])
    drv.publish()
    kicks: list[bool] = []
    late: list[int] = []

    def driver_adds_one() -> None:
        late.append(drv.add_chain([(DATA + 16, 16, False)]))
        kicks.append(drv.publish())

    handled, handle = _consumer(vring, driver_adds_one)
    _drain(handle, 2, vring)
    assert kicks == [False]  # the driver was told not to kick while we worked
    assert handled == [first, late[0]]  # served anyway, in the same drain
    # Kicks are on again once the drain is over: the next buffer gets one.
    drv.add_chain([(DATA + 32, 16, False)])
    assert drv.publish() is True


@pytest.mark.parametrize("event_idx", [False, True])
def test_buffer_added_after_the_last_pop_is_caught_by_the_recheck(
    memory: GuestMemory, event_idx: bool
) -> None:
    """The driver publishes after the device found the ring empty but before kicks are back
    on: no kick comes, so only the re-check after enabling can find it."""
    drv, vring = _setup(memory, event_idx)
    drv.add_chain([(DATA, 16, False)])
    drv.publish()
    handled: list[int] = []
    kicks: list[bool] = []
    late: list[int] = []
    calls = [0]

    def handle(index: int, v: Vring) -> None:
        calls[0] += 1
        while (chain := v.pop()) is not None:
            handled.append(chain.head)
            v.add_used(chain.head, 0)
        if calls[0] == 1:  # the ring looked empty: now the driver adds one
            late.append(drv.add_chain([(DATA + 16, 16, False)]))
            kicks.append(drv.publish())

    _drain(handle, 2, vring)
    assert kicks == [False]
    assert late[0] in handled
    assert calls[0] == 2  # once more for the late buffer, and that was all


def test_buffers_a_device_keeps_do_not_make_it_loop(memory: GuestMemory) -> None:
    """An event queue holds buffers until it has events: waiting buffers alone must not
    make the drain go round again."""
    drv, vring = _setup(memory, False)
    for i in range(3):
        drv.add_chain([(DATA + 16 * i, 16, True)])
    drv.publish()
    calls = [0]

    def keep(index: int, v: Vring) -> None:
        calls[0] += 1

    _drain(keep, 1, vring)
    assert calls[0] == 1


def test_the_driver_is_notified_once_per_pass(memory: GuestMemory) -> None:
    drv, vring = _setup(memory, False)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vring.call_fd = efd
        for i in range(4):
            drv.add_chain([(DATA + 16 * i, 16, False)])
        drv.publish()
        handled, handle = _consumer(vring)
        _drain(handle, 2, vring)
        assert len(handled) == 4
        assert os.eventfd_read(efd) == 1  # one call notification for the batch
        assert len(drv.get_used()) == 4
    finally:
        os.close(efd)
