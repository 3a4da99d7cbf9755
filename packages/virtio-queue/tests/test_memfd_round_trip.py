"""Driver and device on real shared memfd memory, each with its own mappings, as with QEMU."""

from __future__ import annotations

import mmap
import os
import random
import select
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest
from virtio_queue import (
    DriverQueue,
    GuestMemory,
    MemoryRegion,
    QueueLayout,
    SplitQueue,
    VirtqUsedElem,
)

PAGE = mmap.PAGESIZE
# Like QEMU on a PC machine: RAM split around the legacy VGA hole, both parts in one memfd.
LOW = (0x0, 0xA0000, 0)  # gpa, size, offset in the memfd
HIGH = (0xC0000, 0x340000, 0xC0000)
FRONT_END_VA = 0x7F55_0000_0000  # where "QEMU" mapped the memfd


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x400000)
    yield fd
    os.close(fd)


def map_guest(fd: int) -> GuestMemory:
    """What vhost-user SET_MEM_TABLE does with the fds it receives (then closes them)."""
    memory = GuestMemory()
    for gpa, size, offset in (LOW, HIGH):
        passed = os.dup(fd)
        memory.add_region(MemoryRegion.from_fd(passed, gpa, size, FRONT_END_VA + offset, offset))
        os.close(passed)
    return memory


def device_queue(
    memory: GuestMemory, layout: QueueLayout, *, event_idx: bool, next_avail: int
) -> SplitQueue:
    """The device learns ring addresses as front-end virtual addresses (SET_VRING_ADDR)."""
    to_user = {gpa: FRONT_END_VA + off for gpa, _, off in (LOW, HIGH)}
    region = memory.find_region(layout.desc_addr)
    assert region is not None
    base_va = to_user[region.guest_phys_addr] - region.guest_phys_addr
    return SplitQueue(
        memory,
        layout.size,
        memory.user_to_guest(base_va + layout.desc_addr),
        memory.user_to_guest(base_va + layout.avail_addr),
        memory.user_to_guest(base_va + layout.used_addr),
        event_idx=event_idx,
        next_avail=next_avail,
    )


def test_read_and_write_requests_through_shared_memory(ram: int) -> None:
    guest = map_guest(ram)  # the guest's own view
    backend = map_guest(ram)  # the device's separate mappings of the same memory
    layout = QueueLayout.at(0x100000, 128)
    drv = DriverQueue(guest, layout, event_idx=True, start_index=65530)
    dev = device_queue(backend, layout, event_idx=True, next_avail=65530)
    image = os.urandom(64 * 1024)
    with tempfile.TemporaryFile() as disk:
        disk.write(image)
        disk.flush()
        requests = {}
        for n in range(12):  # READs of 4 KiB, some through indirect tables, some in low RAM
            hdr = 0x200000 + 64 * n
            data = (0x90000 + 0x1000 * n if n % 5 == 0 else 0x300000 + 0x2000 * n) - 0x800
            guest.slice(hdr, 8)[:] = (n * 4096).to_bytes(8, "little")
            segments = [(hdr, 8, False), (hdr + 32, 1, True), (data, 0x800, True)]
            # Every fifth request has its data split between low and high RAM.
            second = data + 0x800 if n % 5 else 0x3F0000 + 0x1000 * n
            segments.append((second, 0x800, True))
            table = 0x280000 + 256 * n if n % 2 else None
            requests[drv.add_chain(segments, indirect_table=table)] = (n, segments)
        assert drv.publish()
        while (chain := dev.pop()) is not None:
            offset = int.from_bytes(chain.reader().read(8), "little")
            writer = chain.writer()
            writer.write(b"\0")  # status byte first, as virtio-scsi/blk put it
            writer.advance(os.preadv(disk.fileno(), writer.buffers(4096), offset))
            dev.add_used(chain.head, writer.written)
        assert dev.needs_notification()
    used = drv.get_used()
    assert len(used) == 12 and all(e.len == 4097 for e in used)
    for elem in used:
        n, segments = requests[elem.id]
        got = b"".join(bytes(guest.slice(a, ln)) for a, ln, _ in segments[2:])
        assert got == image[n * 4096 : (n + 1) * 4096]
    assert drv.num_free == 128
    guest.close()
    backend.close()


def run_device(
    dev: SplitQueue,
    kick: int,
    call: int,
    stop: threading.Event,
    toggle: bool,
    errors: list[BaseException],
) -> None:
    """A device thread: wait for kicks, echo 4 bytes per chain, signal when asked to."""
    try:
        while not stop.is_set():
            if not select.select([kick], [], [], 0.05)[0]:
                continue
            os.eventfd_read(kick)
            while True:
                if toggle:
                    dev.disable_notification()
                while (chain := dev.pop()) is not None:
                    w = chain.writer()
                    w.write(chain.reader().read(4))
                    dev.add_used(chain.head, w.written)
                if dev.needs_notification():
                    os.eventfd_write(call, 1)
                if not toggle or not dev.enable_notification():
                    break
    except BaseException as exc:  # surfaced by the main thread
        errors.append(exc)


@pytest.mark.parametrize("toggle", [True, False], ids=["toggle-notifications", "plain-drain"])
def test_threaded_driver_and_device_lose_no_notification(ram: int, toggle: bool) -> None:
    """Driver and device in two threads with eventfds, interleaving at every bytecode.

    The device either disables kicks while draining and re-enables them (then drains again if
    enable_notification() says so), or simply drains pop() to None on every kick.
    """
    guest, backend = map_guest(ram), map_guest(ram)
    layout = QueueLayout.at(0x100000, 64)
    total = 3000
    for event_idx in (True, False):
        drv = DriverQueue(guest, layout, event_idx=event_idx, start_index=65000)
        dev = device_queue(backend, layout, event_idx=event_idx, next_avail=65000)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        stop = threading.Event()
        errors: list[BaseException] = []

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        thread = threading.Thread(target=run_device, args=(dev, kick, call, stop, toggle, errors))
        thread.start()
        rng = random.Random(event_idx)
        sent = done = 0
        timeouts = waits = 0
        try:
            while done < total:
                while sent < total and drv.num_free >= 2 and rng.random() < 0.7:
                    buf = 0x300000 + 16 * (sent % 1024)
                    guest.slice(buf, 4)[:] = sent.to_bytes(4, "little")
                    drv.add_chain([(buf, 4, False), (buf + 8, 4, True)])
                    sent += 1
                    if rng.random() < 0.5 and drv.publish():
                        os.eventfd_write(kick, 1)
                if drv.publish():
                    os.eventfd_write(kick, 1)
                elems: list[VirtqUsedElem] = drv.get_used()
                done += len(elems)
                assert all(e.len == 4 for e in elems)
                if elems or drv.used_idx() != drv.last_used:
                    continue
                if sent - done == drv.size // 2 or sent == total:
                    # Everything is in flight: only an interrupt can wake us.
                    waits += 1
                    if select.select([call], [], [], 2.0)[0]:
                        os.eventfd_read(call)
                    elif drv.used_idx() == drv.last_used:
                        timeouts += 1
                        break
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old_interval)
            os.close(kick)
            os.close(call)
        assert not errors
        assert timeouts == 0, "a notification was lost"
        assert done == total
        assert waits > 0  # the driver really depended on interrupts
    guest.close()
    backend.close()
