"""The typed errors of virtio_queue.

Nothing here knows about device types or transports; every error a hostile or buggy driver can
provoke is one of these, so a device can catch them without catching programming errors.
"""

from __future__ import annotations

__all__ = [
    "GuestMemoryError",
    "InvalidAvailIndex",
    "InvalidChain",
    "QueueError",
    "VirtioQueueError",
]


class VirtioQueueError(Exception):
    """Base class of every error raised by virtio_queue."""


class GuestMemoryError(VirtioQueueError):
    """A guest address range lies outside guest memory or crosses a region boundary."""


class InvalidChain(VirtioQueueError):
    """A descriptor chain broke a rule of virtio 1.2 section 2.7.

    The chain has already been consumed from the available ring, so the device completes it
    (typically ``add_used(exc.head, 0)``) and carries on with the next one: a bad chain never
    wedges the queue.
    """

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(head, reason)
        self.head = head
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid descriptor chain at head {self.head}: {self.reason}"


class QueueError(VirtioQueueError):
    """A queue-level error: bad queue configuration or a broken ring, not one bad chain."""


class InvalidAvailIndex(QueueError):
    """The driver's avail idx ran more than the queue size ahead of the device's next_avail.

    Nothing sensible can be popped from such a ring (virtio 1.2 section 2.7.13.3); the queue's
    state is left unchanged so the caller can decide (usually: mark the device NEEDS_RESET).
    """

    def __init__(self, avail_idx: int, next_avail: int, size: int) -> None:
        super().__init__(avail_idx, next_avail, size)
        self.avail_idx = avail_idx
        self.next_avail = next_avail
        self.size = size

    def __str__(self) -> str:
        return (
            f"avail idx {self.avail_idx} is {(self.avail_idx - self.next_avail) & 0xFFFF} "
            f"entries ahead of next_avail {self.next_avail} (queue size {self.size})"
        )
