"""Test helper: a small guest (1 MiB of RAM, one 16-entry queue) for driver/device tests."""

from __future__ import annotations

from dataclasses import dataclass

from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout

RAM_SIZE = 1 << 20
QUEUE_BASE = 0x1000
DATA = 0x10000  # data buffers live from here
TABLES = 0x80000  # indirect tables live from here


@dataclass
class Guest:
    """1 MiB of guest RAM at GPA 0 with a 16-entry queue laid out at 0x1000."""

    memory: GuestMemory
    layout: QueueLayout
    data: int = DATA
    tables: int = TABLES

    def driver(self, *, event_idx: bool = False, start_index: int = 0) -> DriverQueue:
        return DriverQueue(self.memory, self.layout, event_idx=event_idx, start_index=start_index)

    def fill(self, gpa: int, data: bytes) -> None:
        self.memory.slice(gpa, len(data))[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.memory.slice(gpa, length))


def make_guest() -> Guest:
    return Guest(GuestMemory([MemoryRegion.anonymous(0, RAM_SIZE)]), QueueLayout.at(QUEUE_BASE, 16))
