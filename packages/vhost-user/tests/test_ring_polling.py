"""Rings polled by the spinner (`BusyPoll.poll_ring` through `run_queue`): served without
kicks while it spins, kicks back on before it parks (virtio 1.2 2.7.10), nothing lost in
between, and a stopped queue left alone. The driver runs on its own thread, as a guest does."""

from __future__ import annotations

import os
import random
import select
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from vhost_user import VhostUserBackend, Vring
from vhost_user.busy_poll import BusyPoll
from vhost_user.server import run_queue
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout
from virtio_queue.layout import VIRTQ_USED_F_NO_NOTIFY, avail_event_offset, used_ring_size

DATA = 0x10000


class EchoBackend(VhostUserBackend):
    """Completes every chain at once (a device whose storage answers inline)."""

    num_queues = 1

    def __init__(self, busy: BusyPoll, *, spin_on_ring: bool = True) -> None:
        self.busy_poll = busy
        self._spin_on_ring = spin_on_ring
        self.served = 0

    def features(self) -> int:
        return 0

    def spin_on_ring(self, index: int) -> bool:
        return self._spin_on_ring

    def handle_kick(self, index: int, vring: Vring) -> None:
        while (chain := vring.pop()) is not None:
            self.served += 1
            vring.add_used(chain.head, 0)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([MemoryRegion.anonymous(0, 1 << 20)])
    yield mem
    mem.close()


@dataclass
class Driver:
    """One request at a time, as a queue-depth-1 guest: add, publish, kick only when the
    device asks (2.7.10), wait for the interrupt, then think for a random while."""

    queue: DriverQueue
    kick_fd: int
    call_fd: int
    kicks: int = 0
    done: int = 0
    error: str = ""

    def run(self, requests: int, max_pause: float, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(requests):
                self.queue.add_chain([(DATA + 64 * (i % 8), 64, False)])
                if self.queue.publish():
                    os.eventfd_write(self.kick_fd, 1)
                    self.kicks += 1
                deadline = time.monotonic() + 2
                while not self.queue.get_used():
                    if time.monotonic() > deadline:
                        self.error = f"request {i} never completed (a lost buffer)"
                        return
                    if select.select([self.call_fd], [], [], 0.01)[0]:
                        os.eventfd_read(self.call_fd)
                self.done += 1
                if max_pause:
                    time.sleep(rng.uniform(0, max_pause))
        except Exception as exc:  # reported to the test, which asserts on it
            self.error = repr(exc)


@asynccontextmanager
async def queue_running(
    memory: GuestMemory, busy: BusyPoll, *, event_idx: bool, spin_on_ring: bool = True
) -> AsyncIterator[tuple[Driver, EchoBackend, trio.CancelScope]]:
    """A live queue served by `run_queue` with ``busy`` spinning; yields its driver."""
    drv = DriverQueue(memory, QueueLayout.at(0x1000, 16), event_idx=event_idx)
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    backend = EchoBackend(busy, spin_on_ring=spin_on_ring)
    vring = Vring(0, drv.device_queue(), call_fd=call_fd)
    scope = trio.CancelScope()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            nursery.start_soon(run_queue, backend, vring, kick_fd, scope)
            await trio.testing.wait_all_tasks_blocked()
            busy.window_ns = busy.max_ns
            yield Driver(drv, kick_fd, call_fd), backend, scope
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(kick_fd)
        os.close(call_fd)


async def _drive(driver: Driver, requests: int, max_pause: float, seed: int = 1) -> None:
    thread = threading.Thread(target=driver.run, args=(requests, max_pause, seed))
    thread.start()
    with trio.fail_after(30):
        while thread.is_alive():
            await trio.sleep(0.002)
    thread.join()
    assert driver.error == ""
    assert driver.done == requests


async def _drive_from_another_process(
    driver: Driver, requests: int, max_pause: float, seed: int
) -> None:
    """`_drive` with the driver in a forked process (the memory is a shared mapping): it then
    runs truly beside the spinner, not only when the spinner lets go of the GIL, as a guest's
    vCPU does. Its figures come back through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the driver: only plain Python and system calls here, then out
        try:
            os.close(read_fd)
            driver.run(requests, max_pause, seed)
            os.write(write_fd, f"{driver.done} {driver.kicks} {driver.error}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with trio.fail_after(30):
            await trio.lowlevel.wait_readable(read_fd)
        report = os.read(read_fd, 4096).decode()  # empty if the child died early
        done, kicks, error = [*report.split(" ", 2), "", "", ""][:3]
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    driver.done, driver.kicks, driver.error = int(done or 0), int(kicks or 0), error
    assert driver.error == ""
    assert driver.done == requests


@pytest.mark.parametrize("event_idx", [False, True])
async def test_a_polled_ring_is_served_without_kicks(memory: GuestMemory, event_idx: bool) -> None:
    busy = BusyPoll(500_000_000)
    async with queue_running(memory, busy, event_idx=event_idx) as (driver, backend, _):
        driver.queue.add_chain([(DATA, 64, False)])  # the first needs its kick: nobody spins
        assert driver.queue.publish() is True
        os.eventfd_write(driver.kick_fd, 1)
        with trio.fail_after(5):
            while not driver.queue.get_used():
                await trio.sleep(0.001)
        await _drive(driver, 300, 0)
        assert backend.served == 301
    # While the spinner spun, the driver was told not to kick and the spinner found the
    # buffers itself; a kick per request (300) is what the kick eventfd alone gives.
    assert driver.kicks < 30
    assert busy.ring_serves >= 270


async def test_without_ring_polling_every_request_is_kicked(memory: GuestMemory) -> None:
    """The same load with the device opting out: the counts above are ring polling's doing."""
    busy = BusyPoll(500_000_000)
    async with queue_running(memory, busy, event_idx=False, spin_on_ring=False) as (d, b, _):
        await _drive(d, 100, 0)
        assert b.served == 100
    # A kick per request, but for one published while a drain had kicks off (its re-check
    # serves it).
    assert d.kicks >= 90
    assert busy.ring_serves == 0


@pytest.mark.parametrize("event_idx", [False, True])
async def test_buffers_published_as_the_spinner_parks_are_never_lost(
    memory: GuestMemory, event_idx: bool
) -> None:
    """Pauses around the spin window make the spinner park between requests, often just as
    the driver publishes: a buffer published after the last look with kicks still off would
    hang the driver (its 2 s deadline fails the test). The driver is another process, so it
    can publish at any instant of the spinner's, as a guest can."""
    # Pauses of 0-300 us (sleeps of ~60-360 us) straddle windows of up to 300 us: about half
    # the spins miss and park (a window that only ever missed would shrink to nothing).
    busy = BusyPoll(300_000)
    async with queue_running(memory, busy, event_idx=event_idx) as (driver, backend, _):
        await _drive_from_another_process(driver, 2000, 0.0003, seed=7)
        assert backend.served == 2000
        # Parked at the end: kicks are on again, so the next buffer asks for one.
        with trio.fail_after(5):
            while busy.spins == 0 or busy._parked is None:
                await trio.sleep(0.001)
        layout = driver.queue.layout
        used = memory.slice(layout.used_addr, used_ring_size(layout.size)).cast("H")
        if event_idx:  # avail_event at the next entry: its publication will kick
            assert used[avail_event_offset(layout.size) // 2] == 2000
        else:
            assert used[0] & VIRTQ_USED_F_NO_NOTIFY == 0
    # The spinner served many itself and parked many times (each park one look after the
    # kicks came back on).
    assert busy.ring_serves > 200
    assert busy.spins - busy.hits > 200


async def test_a_stopped_queue_is_not_touched_by_the_spinner(memory: GuestMemory) -> None:
    busy = BusyPoll(500_000_000)
    async with queue_running(memory, busy, event_idx=False) as (driver, backend, scope):
        await _drive(driver, 20, 0)
        scope.cancel()  # what QueueStopped does
        # The spinner keeps spinning on another hot descriptor meanwhile.
        other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def consume() -> None:
            os.eventfd_read(other)

        try:
            busy.watch(other, consume)
            driver.queue.add_chain([(DATA, 64, False)])
            driver.queue.publish()
            for _ in range(20):
                os.eventfd_write(other, 1)
                busy.activity()
                await trio.sleep(0.002)
        finally:
            busy.unwatch(other)
            os.close(other)
        assert backend.served == 20
        assert driver.queue.used_idx() == 20
