"""Guest memory and virtio split virtqueues (device and driver side) for any virtio device type.

Knows nothing about SCSI, vhost-user or any transport; stdlib only. See docs/interfaces.md.
"""

from .chain import ChainReader, ChainWriter, DescriptorChain
from .driver import DriverQueue, Segment
from .errors import (
    GuestMemoryError,
    InvalidAvailIndex,
    InvalidChain,
    QueueError,
    VirtioQueueError,
)
from .event_idx import vring_need_event
from .features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_ORDER_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET,
    VIRTIO_F_SR_IOV,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    feature_mask,
)
from .layout import MAX_QUEUE_SIZE, QueueLayout, VirtqDesc, VirtqUsedElem
from .memory import GuestMemory, MemoryRegion
from .queue import SplitQueue

__all__ = [
    "MAX_QUEUE_SIZE",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_IN_ORDER",
    "VIRTIO_F_NOTIFICATION_DATA",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_ORDER_PLATFORM",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_RING_RESET",
    "VIRTIO_F_SR_IOV",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "ChainReader",
    "ChainWriter",
    "DescriptorChain",
    "DriverQueue",
    "GuestMemory",
    "GuestMemoryError",
    "InvalidAvailIndex",
    "InvalidChain",
    "MemoryRegion",
    "QueueError",
    "QueueLayout",
    "Segment",
    "SplitQueue",
    "VirtioQueueError",
    "VirtqDesc",
    "VirtqUsedElem",
    "feature_mask",
    "vring_need_event",
]
