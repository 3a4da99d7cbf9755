"""The virtio-scsi event queue: hot-plug and parameter-change events for the driver.

Holds `EventQueue`, which delivers `virtio_scsi_event`s (virtio 1.2 section 5.6.6.3) into the
buffers the driver keeps on the eventq: TRANSPORT_RESET with RESCAN / REMOVED when a LUN is
added or removed (only with VIRTIO_SCSI_F_HOTPLUG), PARAM_CHANGE with the sense code of the
change (only with VIRTIO_SCSI_F_CHANGE). Events wait in a short backlog until the driver posts a
buffer ("the device can throttle events to avoid dropping them"); past the backlog they are
dropped and the next event delivered carries VIRTIO_SCSI_T_EVENTS_MISSED, so the driver rescans.
Knows nothing about vhost-user messages, images or SCSI commands.
"""

from __future__ import annotations

import collections
import logging

from virtio_queue import InvalidChain, VirtioQueueError

from .requestq import RequestVring
from .virtio_scsi import (
    EVENT,
    VIRTIO_SCSI_T_EVENTS_MISSED,
    EventType,
    ResetReason,
    encode_virtio_lun,
)

__all__ = ["CAPACITY_DATA_HAS_CHANGED", "EventQueue"]

logger = logging.getLogger(__name__)

#: PARAM_CHANGE `reason`: asc in bits 0-7, ascq in bits 8-15 (5.6.6.3) -> 2Ah/09h.
CAPACITY_DATA_HAS_CHANGED = 0x2A | (0x09 << 8)


class EventQueue:
    """The eventq of one device instance (one front-end connection)."""

    #: Events kept while the driver has no buffer posted; more are dropped (EVENTS_MISSED).
    MAX_BACKLOG = 64

    def __init__(self) -> None:
        self.hotplug = False
        self.change = False
        self._vring: RequestVring | None = None
        self._backlog: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self._missed = False
        #: Events written into driver buffers so far (for logs and tests).
        self.delivered = 0

    # -- queue lifecycle --------------------------------------------------------------------

    def start(self, vring: RequestVring) -> None:
        """The eventq became live: deliver anything waiting."""
        self._vring = vring
        self.flush()

    def stop(self) -> None:
        """The eventq stopped; events wait in the backlog for the next start."""
        self._vring = None

    def reset(self) -> None:
        """Device reset: forget the queue, the backlog and the missed flag."""
        self._vring = None
        self._backlog.clear()
        self._missed = False

    @property
    def pending(self) -> int:
        """Events waiting for a driver buffer."""
        return len(self._backlog)

    # -- producing events -------------------------------------------------------------------

    def lun_added(self, lun: int) -> None:
        """Announce a new LUN (TRANSPORT_RESET / RESCAN), if HOTPLUG was negotiated."""
        if self.hotplug:
            self._push(EventType.TRANSPORT_RESET, lun, ResetReason.RESCAN)

    def lun_removed(self, lun: int) -> None:
        """Announce a removed LUN (TRANSPORT_RESET / REMOVED), if HOTPLUG was negotiated."""
        if self.hotplug:
            self._push(EventType.TRANSPORT_RESET, lun, ResetReason.REMOVED)

    def capacity_changed(self, lun: int) -> None:
        """Announce a new capacity (PARAM_CHANGE 2Ah/09h), if CHANGE was negotiated."""
        if self.change:
            self._push(EventType.PARAM_CHANGE, lun, CAPACITY_DATA_HAS_CHANGED)

    def _push(self, event: int, lun: int, reason: int) -> None:
        if len(self._backlog) >= self.MAX_BACKLOG:
            logger.warning("event backlog full: event %d for LUN %d dropped", event, lun)
            self._missed = True
        else:
            self._backlog.append((event, encode_virtio_lun(0, lun), reason))
        self.flush()

    # -- delivering -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write waiting events into the driver's buffers (also called on every eventq kick)."""
        vring = self._vring
        if vring is None or not (self._backlog or self._missed):
            return
        used = False
        try:
            while self._backlog or self._missed:
                try:
                    chain = vring.pop()
                except InvalidChain as exc:
                    logger.warning("event queue: %s", exc)
                    vring.add_used(exc.head, 0)
                    used = True
                    continue
                if chain is None:
                    break
                used = True
                if chain.writable_len < EVENT.size:
                    # 5.6.6.3: the driver MUST post at least sizeof(virtio_scsi_event).
                    logger.warning("event buffer %d is %d bytes", chain.head, chain.writable_len)
                    vring.add_used(chain.head, 0)
                    continue
                if self._backlog:
                    event, lun_field, reason = self._backlog.popleft()
                else:
                    event, lun_field, reason = EventType.NO_EVENT, bytes(8), 0
                if self._missed:
                    event |= VIRTIO_SCSI_T_EVENTS_MISSED
                    self._missed = False
                written = chain.writer().write(EVENT.pack(event, lun_field, reason))
                vring.add_used(chain.head, written)
                self.delivered += 1
                logger.info("event %#x LUN %s reason %#x delivered", event, lun_field.hex(), reason)
        except VirtioQueueError as exc:
            logger.error("event queue is broken: %s", exc)
        if used:
            vring.notify()
