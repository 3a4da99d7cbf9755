"""Byte layouts of the split virtqueue (virtio 1.2 section 2.7), little-endian as VERSION_1 says.

Holds the struct layouts and dataclasses named after the spec's structs, the flag values, the
sizes and alignments of the three areas, and a helper that lays a queue out at a base address.
It knows nothing about guest memory or about who reads and writes the rings.

    struct virtq_desc      { le64 addr; le32 len; le16 flags; le16 next; }          (2.7.5)
    struct virtq_avail     { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }  (2.7.6)
    struct virtq_used_elem { le32 id; le32 len; }                                    (2.7.8)
    struct virtq_used      { le16 flags; le16 idx; struct virtq_used_elem ring[N];
                             le16 avail_event; }                                     (2.7.8)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# virtq_desc.flags (2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# virtq_avail.flags (2.7.6): the driver asks the device not to interrupt it.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# virtq_used.flags (2.7.8): the device asks the driver not to kick it.
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # 2.7: "Queue Size ... maximum 32768"

VIRTQ_DESC = struct.Struct("<QIHH")
VIRTQ_USED_ELEM = struct.Struct("<II")
LE16 = struct.Struct("<H")
# The flags+idx header that starts both the avail and the used ring.
RING_HEADER = struct.Struct("<HH")

DESC_SIZE = VIRTQ_DESC.size  # 16
USED_ELEM_SIZE = VIRTQ_USED_ELEM.size  # 8
RING_HEADER_SIZE = RING_HEADER.size  # 4

# Alignment of each area (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


@dataclass(frozen=True, slots=True)
class VirtqDesc:
    """One ``struct virtq_desc``: a guest buffer, its flags and the index of the next one."""

    addr: int
    len: int
    flags: int = 0
    next: int = 0

    def pack(self) -> bytes:
        return VIRTQ_DESC.pack(self.addr, self.len, self.flags, self.next)

    @classmethod
    def unpack_from(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> VirtqDesc:
        return cls(*VIRTQ_DESC.unpack_from(buffer, offset))


@dataclass(frozen=True, slots=True)
class VirtqUsedElem:
    """One ``struct virtq_used_elem``: the head of a completed chain and the bytes written."""

    id: int
    len: int

    def pack(self) -> bytes:
        return VIRTQ_USED_ELEM.pack(self.id, self.len)

    @classmethod
    def unpack_from(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> VirtqUsedElem:
        return cls(*VIRTQ_USED_ELEM.unpack_from(buffer, offset))


def desc_table_size(queue_size: int) -> int:
    """Bytes of the descriptor table."""
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of the available ring including used_event (present whatever the features)."""
    return RING_HEADER_SIZE + 2 * queue_size + 2


def used_ring_size(queue_size: int) -> int:
    """Bytes of the used ring including avail_event (present whatever the features)."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * queue_size + 2


def used_event_offset(queue_size: int) -> int:
    """Offset of ``used_event`` inside the available ring."""
    return RING_HEADER_SIZE + 2 * queue_size


def avail_event_offset(queue_size: int) -> int:
    """Offset of ``avail_event`` inside the used ring."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * queue_size


def is_valid_queue_size(size: int) -> bool:
    """A split queue's size is a power of two from 1 to 32768 (2.7)."""
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True, slots=True)
class QueueLayout:
    """Where the three areas of one split queue live (guest physical addresses)."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int

    @property
    def end(self) -> int:
        """First address after the used ring."""
        return self.used_addr + used_ring_size(self.size)

    @classmethod
    def at(cls, base: int, size: int, *, used_align: int = USED_ALIGN) -> QueueLayout:
        """Lay a queue of ``size`` entries out contiguously from ``base``.

        ``base`` is rounded up to the descriptor table's 16-byte alignment. ``used_align`` can
        be raised to 4096 to reproduce the legacy layout (2.7.2), which some drivers still use.
        """
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        desc = _align_up(base, DESC_ALIGN)
        avail = _align_up(desc + desc_table_size(size), AVAIL_ALIGN)
        used = _align_up(avail + avail_ring_size(size), used_align)
        return cls(size, desc, avail, used)
