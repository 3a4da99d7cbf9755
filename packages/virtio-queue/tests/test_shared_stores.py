"""Ring fields the driver reads while the device writes them never show a value we did not mean.

`struct.pack_into` zero-fills its destination before storing, so publishing the used idx with
it lets a driver on another CPU read 0 for a moment (it then takes ~65k phantom used elements).
This watches the used idx from another process while the device publishes as fast as it can,
restarting from 1 before the idx would wrap: the watcher must never see 0.
"""

from __future__ import annotations

import os
import time

import pytest
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout, SplitQueue

SIZE = 1 << 20
WATCH_SECONDS = 0.6


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second CPU to watch from")
def test_a_concurrent_reader_never_sees_a_used_idx_we_did_not_publish() -> None:
    fd = os.memfd_create("shared-stores", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    memory = GuestMemory([MemoryRegion.from_fd(fd, 0, SIZE, 0, 0)])
    os.close(fd)
    try:
        layout = QueueLayout.at(0x1000, 256)
        DriverQueue(memory, layout)  # lays the rings out

        def device() -> SplitQueue:  # publishes 2, 3, ... from its first add_used
            return SplitQueue(
                memory, 256, layout.desc_addr, layout.avail_addr, layout.used_addr, next_used=1
            )

        dev = device()
        dev.add_used(0, 0)
        # One 16-bit load per read, as a driver does (two byte reads could tear by themselves).
        used = memory.slice(layout.used_addr + 2, 2).cast("H")
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the watcher: read the used idx in a tight loop
            os.close(ready_r)
            os.close(result_r)
            zeros = 0
            os.write(ready_w, b"x")
            deadline = time.monotonic() + WATCH_SECONDS
            while time.monotonic() < deadline:
                for _ in range(1000):
                    if not used[0]:
                        zeros += 1
            os.write(result_w, zeros.to_bytes(8, "little"))
            os._exit(0)
        os.close(ready_w)
        os.close(result_w)
        assert os.read(ready_r, 1) == b"x"
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            for _ in range(1000):
                dev.add_used(0, 0)
            if dev.next_used > 0xF000:
                dev = device()
        zeros = int.from_bytes(os.read(result_r, 8), "little")
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(result_r)
        assert zeros == 0
    finally:
        memory.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second CPU to watch from")
def test_a_concurrent_device_never_sees_an_avail_idx_the_driver_did_not_publish() -> None:
    """The driver-side queue (tests' front-ends) has the same duty for the avail idx: a device
    that reads 0 mid-store sees ~65k phantom chains and declares the ring broken."""
    fd = os.memfd_create("shared-stores-avail", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    memory = GuestMemory([MemoryRegion.from_fd(fd, 0, SIZE, 0, 0)])
    os.close(fd)
    try:
        layout = QueueLayout.at(0x1000, 256)
        driver = DriverQueue(memory, layout, start_index=1)
        avail = memory.slice(layout.avail_addr + 2, 2).cast("H")
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the device: read the avail idx in a tight loop
            os.close(ready_r)
            os.close(result_r)
            zeros = 0
            os.write(ready_w, b"x")
            deadline = time.monotonic() + WATCH_SECONDS
            while time.monotonic() < deadline:
                for _ in range(1000):
                    if not avail[0]:
                        zeros += 1
            os.write(result_w, zeros.to_bytes(8, "little"))
            os._exit(0)
        os.close(ready_w)
        os.close(result_w)
        assert os.read(ready_r, 1) == b"x"
        deadline = time.monotonic() + WATCH_SECONDS
        value = 1
        while time.monotonic() < deadline:
            for _ in range(1000):
                value = value % 0xFFFE + 1  # 1..0xFFFE: never 0 on purpose
                driver.set_avail_idx(value)
                driver.publish()
        zeros = int.from_bytes(os.read(result_r, 8), "little")
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(result_r)
        assert zeros == 0
    finally:
        memory.close()
