"""Ring fields one side reads while the other writes them never show a value not meant.

`struct.pack_into` zero-fills its destination before storing, so publishing the used idx with
it lets a driver on another CPU read 0 for a moment (it then takes ~65k phantom used elements),
and publishing the avail idx with it lets a device read 0 (it then sees a broken ring). Each
test watches the field from another process while the writer publishes as fast as it can,
never the value 0: the watcher must never see 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout, SplitQueue

SIZE = 1 << 20
WATCH_SECONDS = 0.6
LAYOUT = QueueLayout.at(0x1000, 256)

pytestmark = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="needs a second CPU to watch from"
)


@contextmanager
def shared_memory() -> Iterator[GuestMemory]:
    """Guest memory on a memfd, so that a forked watcher sees the same pages."""
    fd = os.memfd_create("shared-stores", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    memory = GuestMemory([MemoryRegion.from_fd(fd, 0, SIZE, 0, 0)])
    os.close(fd)
    try:
        yield memory
    finally:
        memory.close()


def zeros_seen(field: memoryview, publish: Callable[[], None]) -> int:
    """Call ``publish`` in a tight loop for WATCH_SECONDS while a forked process reads the
    16-bit ``field`` (one load per read, as the other side does); how often it read 0."""
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher
        os.close(ready_r)
        os.close(result_r)
        zeros = 0
        os.write(ready_w, b"x")
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            for _ in range(1000):
                if not field[0]:
                    zeros += 1
        os.write(result_w, zeros.to_bytes(8, "little"))
        os._exit(0)
    os.close(ready_w)
    os.close(result_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            for _ in range(1000):
                publish()
        return int.from_bytes(os.read(result_r, 8), "little")
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(result_r)


def test_a_concurrent_reader_never_sees_a_used_idx_we_did_not_publish() -> None:
    with shared_memory() as memory:
        DriverQueue(memory, LAYOUT)  # lays the rings out

        def device() -> SplitQueue:  # publishes 2, 3, ... from its first add_used
            return SplitQueue(
                memory, 256, LAYOUT.desc_addr, LAYOUT.avail_addr, LAYOUT.used_addr, next_used=1
            )

        devices = [device()]
        devices[0].add_used(0, 0)

        def publish() -> None:
            dev = devices[0]
            dev.add_used(0, 0)
            if dev.next_used > 0xF000:  # start again from 1 before the idx would wrap to 0
                devices[0] = device()

        used = memory.slice(LAYOUT.used_addr + 2, 2).cast("H")
        assert zeros_seen(used, publish) == 0


def test_a_concurrent_device_never_sees_an_avail_idx_the_driver_did_not_publish() -> None:
    """The driver-side queue (tests' front-ends) has the same duty for the avail idx: a device
    that reads 0 mid-store sees ~65k phantom chains and declares the ring broken."""
    with shared_memory() as memory:
        driver = DriverQueue(memory, LAYOUT, start_index=1)
        values = iter(range(1 << 62))

        def publish() -> None:
            driver.set_avail_idx(next(values) % 0xFFFE + 1)  # 1..0xFFFE: never 0 on purpose
            driver.publish()

        avail = memory.slice(LAYOUT.avail_addr + 2, 2).cast("H")
        assert zeros_seen(avail, publish) == 0
