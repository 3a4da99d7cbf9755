"""The INFLIGHT_SHMFD area for split virtqueues: layout, bookkeeping and recovery.

QEMU ``docs/interop/vhost-user.rst``, "Inflight I/O tracking": the back-end allocates a shared
buffer (GET_INFLIGHT_FD), the front-end keeps it across back-end restarts and hands it back
(SET_INFLIGHT_FD), and the back-end records in it which descriptor heads it has taken from the
available ring but not yet returned, so a restarted back-end can resubmit them in order.

    struct DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }     16 bytes
    struct QueueRegionSplit { u64 features; u16 version; u16 desc_num;
                              u16 last_batch_head; u16 used_idx; DescStateSplit desc[]; }

One queue region per virtqueue, each ``queue_region_size(queue_size)`` bytes, the same stride as
libvhost-user uses so either implementation can pick up the other's area. Native byte order.

This module knows the area's layout and rules only: not the rings, the socket or the device.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass

__all__ = [
    "DESC_STATE_SPLIT",
    "INFLIGHT_VERSION",
    "QUEUE_REGION_SPLIT",
    "DescStateSplit",
    "InflightArea",
    "InflightQueue",
    "QueueRegionSplit",
    "allocate_inflight_fd",
    "queue_region_size",
]

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64

QUEUE_REGION_SPLIT = struct.Struct("=QHHHH")
DESC_STATE_SPLIT = struct.Struct("=B5xHQ")
_HEADER_SIZE = QUEUE_REGION_SPLIT.size  # 16
_DESC_SIZE = DESC_STATE_SPLIT.size  # 16

# Item indexes into the region viewed as u16 / u64 arrays (all offsets are naturally aligned).
_H_VERSION = 8 // 2
_H_DESC_NUM = 10 // 2
_H_LAST_BATCH_HEAD = 12 // 2
_H_USED_IDX = 14 // 2


@dataclass(frozen=True, slots=True)
class QueueRegionSplit:
    """The header of one queue's region."""

    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int


@dataclass(frozen=True, slots=True)
class DescStateSplit:
    """The tracking state of one descriptor head."""

    inflight: int
    next: int
    counter: int


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, rounded up to 64 (libvhost-user's stride)."""
    raw = _DESC_SIZE * queue_size + 2
    size = (raw + INFLIGHT_ALIGNMENT - 1) & ~(INFLIGHT_ALIGNMENT - 1)
    # The stride above always has room for the 16-byte header when queue_size is a power of
    # two; keep a guard so a non-power-of-two size can never overrun into the next queue.
    return max(size, _HEADER_SIZE + _DESC_SIZE * queue_size)


def allocate_inflight_fd(num_queues: int, queue_size: int) -> tuple[int, int]:
    """A fresh zero-filled memfd for GET_INFLIGHT_FD: returns ``(fd, mmap_size)``."""
    size = queue_region_size(queue_size) * num_queues
    fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd, size


class InflightQueue:
    """Bookkeeping of one queue in the shared area (split ring rules of the spec).

    ``begin(head)`` when a head is taken from the available ring; ``before_used(head)`` and
    ``after_used(used_idx)`` around publishing it in the used ring (a batch of one: the spec's
    batch list still makes a crash between the two recoverable).
    """

    __slots__ = ("_b", "_h", "_q", "counter", "size")

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < _HEADER_SIZE + _DESC_SIZE * queue_size:
            raise ValueError("inflight queue region too small for its queue size")
        self._b = view
        self._h = view.cast("H")
        self._q = view.cast("Q")
        self.size = queue_size
        self.counter = 0

    # -- header -------------------------------------------------------------------------
    @property
    def header(self) -> QueueRegionSplit:
        return QueueRegionSplit(*QUEUE_REGION_SPLIT.unpack_from(self._b))

    def desc_state(self, head: int) -> DescStateSplit:
        inflight, nxt, counter = DESC_STATE_SPLIT.unpack_from(
            self._b, _HEADER_SIZE + _DESC_SIZE * head
        )
        return DescStateSplit(inflight, nxt, counter)

    @property
    def version(self) -> int:
        return int(self._h[_H_VERSION])

    @property
    def desc_num(self) -> int:
        return int(self._h[_H_DESC_NUM])

    def initialise(self, used_idx: int) -> None:
        """Claim a zeroed region: features 0, version 1, this queue's size and used index."""
        QUEUE_REGION_SPLIT.pack_into(self._b, 0, 0, INFLIGHT_VERSION, self.size, 0, used_idx)
        self.counter = 0

    # -- hot path -----------------------------------------------------------------------
    def begin(self, head: int) -> None:
        """``head`` was taken from the available ring: stamp its order, mark it in flight."""
        self._q[3 + 2 * head] = self.counter
        self.counter += 1
        self._b[_HEADER_SIZE + _DESC_SIZE * head] = 1

    def before_used(self, head: int) -> None:
        """Link ``head`` into the last-batch list before the used ring's idx moves."""
        h = self._h
        h[11 + 8 * head] = h[_H_LAST_BATCH_HEAD]
        h[_H_LAST_BATCH_HEAD] = head

    def after_used(self, head: int, used_idx: int) -> None:
        """The used idx has moved past ``head``: clear it and record the new used idx."""
        self._b[_HEADER_SIZE + _DESC_SIZE * head] = 0
        self._h[_H_USED_IDX] = used_idx

    # -- reconnection -------------------------------------------------------------------
    def recover(self, used_idx: int) -> list[int]:
        """Repair the last batch and return the heads to resubmit, oldest first.

        Spec "When reconnecting": if ``used_idx`` in the area lags the used ring's idx, the
        back-end died between publishing a batch and clearing it, so the entries of that batch
        (a list from ``last_batch_head`` through ``next``) are no longer in flight.
        """
        h, b = self._h, self._b
        lag = (used_idx - h[_H_USED_IDX]) & 0xFFFF
        head = h[_H_LAST_BATCH_HEAD]
        for _ in range(min(lag, self.size)):
            if head >= self.size:
                break
            b[_HEADER_SIZE + _DESC_SIZE * head] = 0
            head = h[11 + 8 * head]
        h[_H_USED_IDX] = used_idx
        pending = [
            (self._q[3 + 2 * i], i)
            for i in range(self.size)
            if b[_HEADER_SIZE + _DESC_SIZE * i] == 1
        ]
        pending.sort()
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _counter, head in pending]

    def release(self) -> None:
        """Drop the views (before the area is unmapped)."""
        self._h.release()
        self._q.release()
        self._b.release()


class InflightArea:
    """A mapped inflight area: ``num_queues`` regions of ``queue_region_size(queue_size)``."""

    def __init__(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        """Map ``fd`` (the caller keeps ownership of it and may close it afterwards).

        Raises ``ValueError`` for a size that cannot hold the regions, ``OSError`` if the fd
        cannot be mapped.
        """
        stride = queue_region_size(queue_size)
        if num_queues < 1 or stride * num_queues > mmap_size:
            raise ValueError(
                f"inflight area of {mmap_size} bytes cannot hold {num_queues} queues of "
                f"{queue_size} ({stride} bytes each)"
            )
        start = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        lead = mmap_offset - start
        self._mapping = mmap.mmap(
            fd,
            lead + mmap_size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
        self._view = memoryview(self._mapping)[lead : lead + mmap_size]
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._stride = stride
        self._queues: dict[int, InflightQueue] = {}

    def queue(self, index: int, ring_size: int) -> InflightQueue | None:
        """The tracker of queue ``index`` for a ring of ``ring_size``, or None if not covered."""
        if index >= self.num_queues or ring_size > self.queue_size:
            return None
        tracker = self._queues.get(index)
        if tracker is None or tracker.size != ring_size:
            start = index * self._stride
            # The region's desc[] array is indexed by head; a smaller ring uses a prefix.
            tracker = InflightQueue(self._view[start : start + self._stride], ring_size)
            self._queues[index] = tracker
        return tracker

    def close(self) -> None:
        for tracker in self._queues.values():
            tracker.release()
        self._queues.clear()
        self._view.release()
        # If a view is still alive somewhere, the mapping goes when it does.
        with contextlib.suppress(BufferError):
            self._mapping.close()
