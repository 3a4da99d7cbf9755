"""A full memory barrier for the store-then-load handshakes of virtio 1.2 section 2.7.7.

The device publishes an index (used idx, avail_event) and then reads the driver's suppression
field (used_event, avail idx); the driver does the mirror image. Without a store-load fence on
both sides each can miss the other's update and the queue stalls. CPython has no fence
primitive, but acquiring an uncontended lock executes a locked read-modify-write instruction,
which on x86 (the host this project targets) is a full barrier. It costs ~50 ns, paid once per
batch, not per descriptor.
"""

from __future__ import annotations

import threading

_fence_lock = threading.Lock()


def memory_barrier() -> None:
    """Order every earlier store to guest memory before every later load (x86: mfence-like)."""
    _fence_lock.acquire()
    _fence_lock.release()
