"""The driver's half of a split virtqueue (what a guest kernel does), for tests and tools.

DriverQueue lays a queue out in guest memory, builds descriptor chains (direct or through an
indirect table) from (gpa, length, device_writable) segments, publishes the avail idx and says
whether the device wants a kick, and collects used elements. Low-level hooks let tests write
arbitrary (hostile) descriptors. It knows nothing about device types or transports.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .barrier import memory_barrier
from .errors import QueueError
from .event_idx import vring_need_event
from .layout import (
    LE16,
    RING_HEADER_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    QueueLayout,
    VirtqDesc,
    VirtqUsedElem,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
)
from .memory import GuestMemory
from .queue import SplitQueue

__all__ = ["DriverQueue", "Segment"]

Segment = tuple[int, int, bool]
"""(guest physical address, length, device-writable) of one buffer."""


class DriverQueue:
    """The driver side of one split queue at ``layout`` in ``memory``.

    The areas are zeroed, then avail idx and used idx are both set to ``start_index`` (as if
    the queue had already carried that many chains: useful to test index wrap-around).
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: QueueLayout,
        *,
        event_idx: bool = False,
        start_index: int = 0,
    ) -> None:
        if not 0 <= start_index <= 0xFFFF:
            raise ValueError(f"start_index {start_index} is not a 16-bit index")
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self._desc = memory.slice(layout.desc_addr, desc_table_size(self.size))
        self._avail = memory.slice(layout.avail_addr, avail_ring_size(self.size))
        self._used = memory.slice(layout.used_addr, used_ring_size(self.size))
        for area in (self._desc, self._avail, self._used):
            area[:] = bytes(len(area))
        # Fields the device may read while we store them (avail idx, flags, used_event) are
        # written as one native 16-bit store through this view: struct.pack_into zero-fills
        # first, and a device that reads an avail idx of 0 mid-store sees a broken ring (the
        # device side does the same for used idx; see queue.py).
        self._avail16 = self._avail.cast("H")
        self._used_event16 = used_event_offset(self.size) >> 1
        LE16.pack_into(self._avail, 2, start_index)
        LE16.pack_into(self._used, 2, start_index)
        LE16.pack_into(self._avail, used_event_offset(self.size), start_index)
        LE16.pack_into(self._used, avail_event_offset(self.size), start_index)
        self._free: deque[int] = deque(range(self.size))
        self._chains: dict[int, list[int]] = {}
        self.start_index = start_index
        self.avail_idx = start_index  # next avail idx to publish
        self._published = start_index
        self.last_used = start_index  # next used-ring entry to collect

    def device_queue(self, *, indirect: bool = True, next_avail: int | None = None) -> SplitQueue:
        """The device's SplitQueue over this layout, resuming at ``start_index`` by default."""
        return SplitQueue(
            self.memory,
            self.size,
            self.layout.desc_addr,
            self.layout.avail_addr,
            self.layout.used_addr,
            event_idx=self.event_idx,
            indirect=indirect,
            next_avail=self.start_index if next_avail is None else next_avail,
        )

    @property
    def num_free(self) -> int:
        """Descriptors not used by any outstanding chain."""
        return len(self._free)

    # -- building chains ---------------------------------------------------------------------

    def add_chain(self, segments: Sequence[Segment], *, indirect_table: int | None = None) -> int:
        """Make a chain of ``segments`` available (not yet published) and return its head.

        With ``indirect_table`` (a GPA with room for 16 bytes per segment) the segments go in
        an indirect table and the chain takes one descriptor (2.7.5.3).
        """
        if not segments:
            raise ValueError("a chain needs at least one segment")
        if indirect_table is not None:
            table = self.memory.slice(indirect_table, 16 * len(segments))
            self._write_table(table, segments)
            head = self._take(1)[0]
            self.write_descriptor(
                head, VirtqDesc(indirect_table, 16 * len(segments), VIRTQ_DESC_F_INDIRECT, 0)
            )
            self._chains[head] = [head]
        else:
            indices = self._take(len(segments))
            for pos, (addr, length, writable) in enumerate(segments):
                last = pos == len(segments) - 1
                flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
                nxt = 0 if last else indices[pos + 1]
                self.write_descriptor(indices[pos], VirtqDesc(addr, length, flags, nxt))
            head = indices[0]
            self._chains[head] = indices
        self.push_avail(head)
        return head

    @staticmethod
    def _write_table(table: memoryview, segments: Sequence[Segment]) -> None:
        last = len(segments) - 1
        for pos, (addr, length, writable) in enumerate(segments):
            flags = (0 if pos == last else VIRTQ_DESC_F_NEXT) | (
                VIRTQ_DESC_F_WRITE if writable else 0
            )
            VIRTQ_DESC.pack_into(table, 16 * pos, addr, length, flags, pos + 1 if pos < last else 0)

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise QueueError(f"need {count} descriptors, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def write_descriptor(self, index: int, desc: VirtqDesc) -> None:
        """Write raw descriptor ``index`` (no bookkeeping: for building hostile chains)."""
        VIRTQ_DESC.pack_into(self._desc, 16 * index, desc.addr, desc.len, desc.flags, desc.next)

    def push_avail(self, head: int) -> None:
        """Put ``head`` in the next avail-ring slot (any 16-bit value; not yet published)."""
        slot = RING_HEADER_SIZE + 2 * (self.avail_idx % self.size)
        LE16.pack_into(self._avail, slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Publish the avail idx; True if the device asked to be kicked for it (2.7.7, 2.7.10)."""
        old, new = self._published, self.avail_idx
        self._avail16[1] = new
        self._published = new
        memory_barrier()
        if self.event_idx:
            avail_event: int = LE16.unpack_from(self._used, avail_event_offset(self.size))[0]
            return vring_need_event(avail_event, new, old)
        flags: int = LE16.unpack_from(self._used, 0)[0]
        return not flags & VIRTQ_USED_F_NO_NOTIFY

    def set_avail_idx(self, value: int) -> None:
        """Write a raw avail idx (for hostile-driver tests)."""
        self.avail_idx = self._published = value & 0xFFFF
        self._avail16[1] = self.avail_idx

    # -- interrupt suppression ---------------------------------------------------------------

    def set_used_event(self, value: int) -> None:
        """Ask for an interrupt once the used idx moves past ``value`` (EVENT_IDX)."""
        self._avail16[self._used_event16] = value & 0xFFFF

    def set_no_interrupt(self, suppress: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT (without EVENT_IDX)."""
        self._avail16[0] = VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0

    # -- the used ring -----------------------------------------------------------------------

    def used_idx(self) -> int:
        """The device's used idx as published in the ring."""
        idx: int = LE16.unpack_from(self._used, 2)[0]
        return idx

    def get_used(self) -> list[VirtqUsedElem]:
        """Collect the used elements published since the last call and free their descriptors.

        Returns the elements in used-ring order. With EVENT_IDX, then asks for an interrupt
        at the next used element (like Linux's virtqueue_enable_cb).
        """
        end = self.used_idx()
        out: list[VirtqUsedElem] = []
        while self.last_used != end:
            slot = RING_HEADER_SIZE + USED_ELEM_SIZE * (self.last_used % self.size)
            elem = VirtqUsedElem.unpack_from(self._used, slot)
            # A head the driver did not make available (hostile-chain tests push raw heads)
            # is reported like any other but frees nothing.
            self._free.extend(self._chains.pop(elem.id, ()))
            out.append(elem)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out
