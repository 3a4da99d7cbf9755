"""The wrap-safe event-index rule of virtio 1.2 section 2.7.7.2 / 2.7.10 (`vring_need_event`).

Pure 16-bit arithmetic, shared by the device side (should I notify the driver?) and the driver
side (should I kick the device?). Knows nothing about memory or rings.
"""

from __future__ import annotations


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``.

    The other side asked to be notified once the index moves past ``event_idx``, i.e. when
    ``event_idx`` lies in the half-open window ``[old_idx, new_idx)`` modulo 2**16. With
    ``new_idx == old_idx`` nothing moved and the answer is always False.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
