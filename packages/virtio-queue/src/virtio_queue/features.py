"""Reserved virtio feature bits (virtio 1.2 section 6) that concern the transport and the rings.

Device-type feature bits belong to the device packages; vhost-user's own bit
(VHOST_USER_F_PROTOCOL_FEATURES) belongs to vhost_user.
"""

from __future__ import annotations

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40


def feature_mask(*bits: int) -> int:
    """Return the 64-bit feature word with the given bit numbers set."""
    mask = 0
    for bit in bits:
        if not 0 <= bit < 64:
            raise ValueError(f"feature bit {bit} out of range 0..63")
        mask |= 1 << bit
    return mask
