"""The device's half of a split virtqueue (virtio 1.2 section 2.7).

SplitQueue reads descriptor chains the driver made available, validates them against what a
hostile driver could do, hands them out as DescriptorChains of memoryviews into guest memory,
publishes used elements and decides whether the driver wants an interrupt (2.7.7, 2.7.10).
It knows nothing about device types, vhost-user or eventfds: the caller kicks and signals.

Hot path notes: the 16-bit ring fields are items of ``memoryview.cast("H")`` views of the rings
and descriptors are read with a precompiled little-endian struct; the avail idx is read once per
batch (cached in ``_shadow_avail``), and guest addresses are translated through the memory's most
recently used region before any lookup.

Shared-memory stores: ``struct.pack_into`` zero-fills its destination before it stores the value,
so a driver reading at the same moment can see 0 in a field we only meant to move forward (a used
idx of 0 makes a driver consume ~65k phantom elements; an avail_event of 0 can cost a kick).
Every field the driver may read while we write it (used idx, used flags, avail_event) is stored
through the cast views instead: one native 16-bit store, which x86 performs atomically.
"""

from __future__ import annotations

import logging
import sys

from .barrier import memory_barrier
from .chain import DescriptorChain
from .errors import GuestMemoryError, InvalidAvailIndex, InvalidChain, QueueError
from .layout import (
    MAX_QUEUE_SIZE,
    RING_HEADER_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_USED_ELEM,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_event_offset,
    used_ring_size,
)
from .memory import GuestMemory

__all__ = ["SplitQueue"]

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # the cast views below are in native byte order
    raise ImportError("virtio_queue's split queue needs a little-endian host (virtio is LE)")

_unpack_desc = VIRTQ_DESC.unpack_from
_pack_used_elem = VIRTQ_USED_ELEM.pack_into
# Building a chain without a Python-level __init__ call saves ~30 ns per pop.
_new_chain = DescriptorChain.__new__
# Item indexes into the rings viewed as u16 arrays.
_H_FLAGS = 0  # virtq_avail.flags / virtq_used.flags
_H_IDX = 1  # virtq_avail.idx / virtq_used.idx
_H_RING = 2  # virtq_avail.ring[0]
_USED_RING = RING_HEADER_SIZE


def _invalid(head: int, reason: str) -> InvalidChain:
    log.warning("invalid descriptor chain at head %d: %s", head, reason)
    return InvalidChain(head, reason)


class SplitQueue:
    """The device side of one split virtqueue whose rings live in guest memory.

    ``desc_addr``/``avail_addr``/``used_addr`` are guest physical addresses. ``next_avail`` is
    where popping resumes (vhost-user SET_VRING_BASE); ``next_used`` defaults to the idx found
    in the used ring, which is what the device last published before a reconnection.

    The ring areas are translated once, here: if guest memory is remapped, build a new queue.
    Raises QueueError for a bad size or index, GuestMemoryError if an area is not in memory.
    """

    __slots__ = (
        "_avail",
        "_avail16",
        "_avail_event",
        "_avail_event_off",
        "_avail_event_published",
        "_desc",
        "_event_idx",
        "_indirect",
        "_mask",
        "_memory",
        "_next_avail",
        "_next_used",
        "_notify_enabled",
        "_shadow_avail",
        "_signalled_used",
        "_signalled_valid",
        "_size",
        "_used",
        "_used16",
        "_used_event",
        "_used_event_off",
    )

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        next_avail: int = 0,
        next_used: int | None = None,
    ) -> None:
        if not is_valid_queue_size(size):
            raise QueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if not 0 <= next_avail <= 0xFFFF:
            raise QueueError(f"next_avail {next_avail} is not a 16-bit index")
        if next_used is not None and not 0 <= next_used <= 0xFFFF:
            raise QueueError(f"next_used {next_used} is not a 16-bit index")
        self._memory = memory
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        self._indirect = indirect
        # The trailing used_event / avail_event fields exist only with EVENT_IDX (2.7.6, 2.7.8).
        trailer = 0 if event_idx else 2
        self._desc = memory.slice(desc_addr, desc_table_size(size))
        self._avail = memory.slice(avail_addr, avail_ring_size(size) - trailer)
        self._used = memory.slice(used_addr, used_ring_size(size) - trailer)
        self._used_event_off = used_event_offset(size)
        self._avail_event_off = avail_event_offset(size)
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._used_event = self._used_event_off >> 1  # items of _avail16 / _used16
        self._avail_event = self._avail_event_off >> 1
        self._next_avail = next_avail
        self._shadow_avail = next_avail
        self._avail_event_published = -1
        if next_used is None:
            next_used = self._used16[_H_IDX]
        self._next_used = next_used
        self._signalled_used = next_used
        self._signalled_valid = False
        self._notify_enabled = True
        if event_idx:
            # Ask for a kick from the first buffer on: the ring may hold any stale value
            # (e.g. after a reconnection), and a stale avail_event would mean no kicks.
            self._used16[self._avail_event] = next_avail
            self._avail_event_published = next_avail

    # -- state -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of entries (a power of two)."""
        return self._size

    @property
    def next_avail(self) -> int:
        """Index of the next available-ring entry to pop (vhost-user GET_VRING_BASE)."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise QueueError(f"next_avail {value} is not a 16-bit index")
        self._next_avail = value
        self._shadow_avail = value

    @property
    def next_used(self) -> int:
        """Index the next used element goes to (= the used idx last published)."""
        return self._next_used

    @property
    def event_idx(self) -> bool:
        """Whether VIRTIO_RING_F_EVENT_IDX is in use."""
        return self._event_idx

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    def avail_idx(self) -> int:
        """The driver's current avail idx, read from the ring."""
        idx: int = self._avail16[_H_IDX]
        return idx

    # -- the available ring ------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """Pop the next available chain, or None when the ring is empty.

        Raises InvalidChain for a chain that breaks a rule; it has been consumed and the
        caller should complete it (``add_used(exc.head, 0)``). Raises InvalidAvailIndex if the
        driver's idx is more than the queue size ahead; nothing is consumed then.
        """
        na = self._next_avail
        if na == self._shadow_avail and not self._refresh_avail(na):
            return None
        head: int = self._avail16[_H_RING + (na & self._mask)]
        self._next_avail = (na + 1) & 0xFFFF
        return self.read_chain(head)

    def _refresh_avail(self, na: int) -> bool:
        """Re-read avail idx after the cached batch is used up; True if entries are there."""
        avail16 = self._avail16
        idx: int = avail16[_H_IDX]
        if idx == na:
            if not self._event_idx or not self._notify_enabled:
                return False
            if self._avail_event_published == na:
                return False
            # 2.7.10: ask for a kick at the next buffer, then look again: the driver may
            # have added one after our read, before it could see the new avail_event.
            self._used16[self._avail_event] = na
            self._avail_event_published = na
            memory_barrier()
            idx = avail16[_H_IDX]
            if idx == na:
                return False
        if (idx - na) & 0xFFFF > self._size:
            log.error("avail idx %d is more than %d entries ahead of %d", idx, self._size, na)
            raise InvalidAvailIndex(idx, na, self._size)
        self._shadow_avail = idx
        return True

    def read_chain(self, head: int) -> DescriptorChain:
        """Read and validate the chain starting at descriptor ``head`` (2.7.5, 2.7.5.3).

        Rules enforced (InvalidChain(head, reason) otherwise): head and next indices inside
        their table; at most queue-size descriptors in the direct chain and at most
        table-length entries in an indirect table (this also catches loops); every buffer
        inside one region of guest memory; no device-readable buffer after a device-writable
        one (2.7.4.2); INDIRECT only when negotiated, without NEXT, not nested, with a
        non-empty table whose length is a multiple of 16 and at most the queue size (2.7.5.3.1).
        """
        size = self._size
        if not 0 <= head < size:
            raise _invalid(head, f"head index {head} >= queue size {size}")
        memory = self._memory
        hot_start, hot_size, hot_view = memory._hot  # package-internal fast path
        unpack = _unpack_desc
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        table = desc = self._desc
        limit = size  # entries in the current table
        budget = size  # descriptors the current table may still contribute
        idx = head
        # Flag values are literals here (NEXT=1, WRITE=2, INDIRECT=4): globals cost a lookup
        # per descriptor on the hottest loop of the device. The two common shapes (writable,
        # or readable before any writable one, each with or without NEXT) are tested by value
        # first; everything else takes the general branch.
        try:
            while True:
                addr, length, flags, nxt = unpack(table, idx << 4)
                off = addr - hot_start
                if flags == 3 or flags == 2:  # VIRTQ_DESC_F_WRITE, with or without NEXT
                    if off >= 0 and off + length <= hot_size:
                        writable.append(hot_view[off : off + length])
                    else:
                        writable.append(memory.slice(addr, length))
                    wlen += length
                elif (flags == 1 or flags == 0) and not writable:
                    if off >= 0 and off + length <= hot_size:
                        readable.append(hot_view[off : off + length])
                    else:
                        readable.append(memory.slice(addr, length))
                    rlen += length
                else:
                    if flags & 4:  # VIRTQ_DESC_F_INDIRECT: switch to its table (2.7.5.3)
                        limit = length >> 4
                        if (
                            table is not desc
                            or flags & 1  # NEXT
                            or not limit
                            or length & 15
                            or limit > size
                            or not self._indirect
                        ):
                            raise self._bad_indirect(head, table is not desc, length, flags)
                        if off >= 0 and off + length <= hot_size:
                            table = hot_view[off : off + length]
                        else:
                            table = memory.slice(addr, length)
                        budget = limit
                        idx = 0
                        continue
                    if not flags & 2 and writable:
                        raise _invalid(head, "device-readable descriptor after a writable one")
                    # Flag bits a split ring does not define are ignored.
                    if off >= 0 and off + length <= hot_size:
                        buf = hot_view[off : off + length]
                    else:
                        buf = memory.slice(addr, length)
                    if flags & 2:
                        writable.append(buf)
                        wlen += length
                    else:
                        readable.append(buf)
                        rlen += length
                if not flags & 1:  # VIRTQ_DESC_F_NEXT
                    break
                budget -= 1
                if not budget or nxt >= limit:
                    if not budget:
                        raise _invalid(head, f"chain longer than {limit} descriptors (a loop?)")
                    raise _invalid(head, f"next index {nxt} >= table size {limit}")
                idx = nxt
        except GuestMemoryError as exc:
            raise _invalid(head, f"descriptor outside guest memory: {exc}") from None
        chain = _new_chain(DescriptorChain)
        chain.head = head
        chain.readable = readable
        chain.writable = writable
        chain.readable_len = rlen
        chain.writable_len = wlen
        return chain

    def _bad_indirect(self, head: int, nested: bool, length: int, flags: int) -> InvalidChain:
        """The InvalidChain for an INDIRECT descriptor that breaks a rule of 2.7.5.3.1."""
        if nested:
            return _invalid(head, "nested indirect descriptor")
        if not self._indirect:
            return _invalid(head, "INDIRECT descriptor but the feature is off")
        if flags & VIRTQ_DESC_F_NEXT:
            return _invalid(head, "descriptor has both INDIRECT and NEXT")
        if length == 0 or length & 15:
            return _invalid(head, f"indirect table length {length} is not 16*n>0")
        return _invalid(head, f"indirect table of {length >> 4} > queue size {self._size}")

    # -- the used ring -----------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Publish chain ``head`` as used with ``length`` bytes written to its buffers (2.7.8).

        A head outside the queue (it can come from InvalidChain) is logged and not published:
        the driver never made such a chain available.
        """
        if not 0 <= head < self._size:
            log.warning("not completing chain with head %d: outside queue of %d", head, self._size)
            return
        used = self._used
        nu = self._next_used
        _pack_used_elem(used, _USED_RING + (nu & self._mask) * USED_ELEM_SIZE, head, length)
        nu = (nu + 1) & 0xFFFF
        self._next_used = nu
        # x86 keeps stores in order: the element is visible before the idx that covers it.
        # (The element may be written with pack_into: the driver reads it only after the idx.)
        self._used16[_H_IDX] = nu

    # -- notification suppression (2.7.7, 2.7.10) --------------------------------------------

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used elements added since last time.

        Call once per batch, after the add_used calls; signal the call eventfd if True.
        """
        memory_barrier()  # our used idx store must precede the read of the driver's fields
        new = self._next_used
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if self._event_idx:
            if not valid:
                return True
            event: int = self._avail16[self._used_event]
            # vring_need_event(event, new, old), inlined.
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        if valid and new == old:
            return False
        flags: int = self._avail16[_H_FLAGS]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask the driver to kick for new buffers; True if some are already available.

        The usual loop: disable_notification(); drain pop(); if enable_notification() is
        True, drain again (a buffer arrived while kicks were off).
        """
        self._notify_enabled = True
        if self._event_idx:
            na = self._next_avail
            self._used16[self._avail_event] = na
            self._avail_event_published = na
        else:
            self._used16[_H_FLAGS] = 0
        memory_barrier()
        return self.avail_idx() != self._next_avail

    def disable_notification(self) -> None:
        """Tell the driver kicks are not needed (best effort: the driver may still kick)."""
        self._notify_enabled = False
        if not self._event_idx:
            self._used16[_H_FLAGS] = VIRTQ_USED_F_NO_NOTIFY
            return
        # With EVENT_IDX the driver kicks when its idx passes avail_event (2.7.10). Left where
        # it is, the next buffer still passes it: one kick per disable. One behind the next
        # entry we pop is never passed: the driver's idx is never behind that entry.
        behind = (self._next_avail - 1) & 0xFFFF
        self._used16[self._avail_event] = behind
        self._avail_event_published = behind
