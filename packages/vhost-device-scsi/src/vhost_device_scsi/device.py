"""The virtio-scsi device behind vhost-user: features, config space, and queue dispatch.

Holds `ScsiBackend`, the `vhost_user.VhostUserBackend` of a virtio-scsi host (virtio 1.2 section
5.6) with one target (target 0) whose LUNs a `scsi_core.target.Target` serves: queue 0 is the
controlq, 1 the eventq, 2.. the request queues. One instance serves one front-end connection;
the Target outlives it (reconnections keep LUN state). `DeviceSettings` holds the config-space
values and why they are what they are. Knows nothing about images, sockets or the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from scsi_core.target import Response, Target
from vhost_user.backend import VhostUserBackend
from vhost_user.busy_poll import BusyPoll
from vhost_user.errors import RequestError
from vhost_user.messages import ProtocolFeature
from vhost_user.vring import Vring
from virtio_queue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)

from .completions import CompletionChannel
from .controlq import ControlQueue
from .eventq import EventQueue
from .requestq import PendingCommand, RequestQueues
from .virtio_scsi import (
    CDB_DEFAULT_SIZE,
    CONFIG,
    CONFIG_CDB_SIZE_OFFSET,
    CONFIG_SENSE_SIZE_OFFSET,
    SENSE_DEFAULT_SIZE,
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_F_INOUT,
    VirtioScsiConfig,
)

__all__ = ["CONTROL_QUEUE", "EVENT_QUEUE", "FIRST_REQUEST_QUEUE", "DeviceSettings", "ScsiBackend"]

logger = logging.getLogger(__name__)

CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2

#: Largest CDB the request parser accepts (SPC: variable-length CDBs up to 260 bytes).
MAX_CDB_SIZE = 260
#: Largest sense we would copy out (SPC-5: sense data is at most 252 bytes).
MAX_SENSE_SIZE = 252


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """What the device offers; each value is the one the daemon actually honours.

    * `num_request_queues`: request queues served (config `num_queues`).
    * `max_queue_size`: largest ring accepted (vhost-user SET_VRING_NUM).
    * `seg_max`: data segments per command; 2 fewer than a 128-entry ring so that a command
      fits a minimal ring even without indirect descriptors (QEMU's default for that size).
      The request path itself has no segment limit.
    * `max_sectors`: a transfer-size hint in 512-byte sectors; requests are not split or
      limited by the transport, 0xFFFF is the customary maximum (32 MiB).
    * `cmd_per_lun`: commands a LUN may have outstanding; requests are served as they come,
      so this is only bounded by the ring (128 = the smallest ring we expect).
    * `hotplug`, `change`: offer VIRTIO_SCSI_F_HOTPLUG / VIRTIO_SCSI_F_CHANGE.
    """

    num_request_queues: int = 1
    max_queue_size: int = 1024
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    hotplug: bool = True
    change: bool = True

    def config(self) -> VirtioScsiConfig:
        """The config space at reset (5.6.4)."""
        return VirtioScsiConfig(
            num_queues=self.num_request_queues,
            seg_max=self.seg_max,
            max_sectors=self.max_sectors,
            cmd_per_lun=self.cmd_per_lun,
        )


class ScsiBackend(VhostUserBackend):
    """A virtio-scsi host with target 0, for one vhost-user front-end connection.

    `on_connect(backend)` / `on_disconnect(backend)` let the daemon keep a list of live
    devices to send hot-plug events to; they are called from `run`, which vhost_user starts
    beside the connection and cancels when it ends.
    """

    def __init__(
        self,
        target: Target,
        settings: DeviceSettings | None = None,
        *,
        nexus: Hashable = 0,
        on_connect: Callable[[ScsiBackend], None] | None = None,
        on_disconnect: Callable[[ScsiBackend], None] | None = None,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        self.settings = settings or DeviceSettings()
        self.busy_poll = busy_poll
        if self.settings.num_request_queues < 1:
            raise ValueError("a virtio-scsi device needs at least one request queue")
        self.num_queues = FIRST_REQUEST_QUEUE + self.settings.num_request_queues
        self.max_queue_size = self.settings.max_queue_size
        self.target = target
        self.channel: CompletionChannel[PendingCommand, Response] = CompletionChannel()
        self.requests = RequestQueues(target, self.channel, nexus=nexus)
        self.control = ControlQueue(target, self.requests.finish_all, nexus=nexus)
        self.events = EventQueue()
        self._config = self.settings.config()
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect

    # -- negotiation ------------------------------------------------------------------------

    def features(self) -> int:
        """VERSION_1, indirect descriptors, event index, INOUT, and HOTPLUG/CHANGE if enabled."""
        bits = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_SCSI_F_INOUT
        )
        if self.settings.hotplug:
            bits |= 1 << VIRTIO_SCSI_F_HOTPLUG
        if self.settings.change:
            bits |= 1 << VIRTIO_SCSI_F_CHANGE
        return bits

    def protocol_features(self) -> int:
        """The config space can be read over vhost-user (GET_CONFIG)."""
        return int(ProtocolFeature.CONFIG)

    def set_features(self, features: int) -> None:
        """Apply what the driver acknowledged: INOUT, HOTPLUG and CHANGE gate behaviour."""
        self.requests.inout = bool(features & (1 << VIRTIO_SCSI_F_INOUT))
        self.events.hotplug = bool(features & (1 << VIRTIO_SCSI_F_HOTPLUG))
        self.events.change = bool(features & (1 << VIRTIO_SCSI_F_CHANGE))
        logger.debug("features acknowledged: %#x", features)

    # -- config space -----------------------------------------------------------------------

    @property
    def config(self) -> VirtioScsiConfig:
        """The current config space (sense_size and cdb_size as the driver set them)."""
        return self._config

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of struct virtio_scsi_config."""
        if offset < 0 or size < 0 or offset + size > CONFIG.size:
            raise RequestError(f"config read {offset}+{size} outside the {CONFIG.size}-byte space")
        return self._config.pack()[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        """Only sense_size and cdb_size are driver-writable (5.6.4.2); anything else is refused."""
        old = self._config.pack()
        raw = bytearray(old)
        if offset < 0 or offset + len(data) > CONFIG.size:
            raise RequestError(f"config write {offset}+{len(data)} outside the config space")
        raw[offset : offset + len(data)] = data
        new = VirtioScsiConfig.unpack(bytes(raw))
        writable = (CONFIG_SENSE_SIZE_OFFSET, CONFIG_CDB_SIZE_OFFSET)
        for start in range(0, CONFIG.size, 4):  # every field lies inside one 4-byte word
            if start not in writable and raw[start : start + 4] != old[start : start + 4]:
                raise RequestError(f"config field at offset {start} is read-only")
        if not 1 <= new.cdb_size <= MAX_CDB_SIZE:
            raise RequestError(f"cdb_size {new.cdb_size} outside 1..{MAX_CDB_SIZE}")
        if not 0 <= new.sense_size <= MAX_SENSE_SIZE:
            raise RequestError(f"sense_size {new.sense_size} outside 0..{MAX_SENSE_SIZE}")
        self._config = new
        self.requests.set_sizes(new.cdb_size, new.sense_size)
        logger.info("driver set cdb_size %d, sense_size %d", new.cdb_size, new.sense_size)

    # -- queues -----------------------------------------------------------------------------

    def queue_started(self, index: int, vring: Vring) -> None:
        """Route the started ring to its handler."""
        if index >= FIRST_REQUEST_QUEUE:
            self.requests.start(vring)
        elif index == EVENT_QUEUE:
            self.events.start(vring)

    def handle_kick(self, index: int, vring: Vring) -> None:
        """Drain the kicked ring (vhost_user notifies the driver afterwards)."""
        if index >= FIRST_REQUEST_QUEUE:
            self.requests.process(vring, notify=False)
        elif index == CONTROL_QUEUE:
            self.control.process(vring, notify=False)
        else:
            # The driver posted event buffers: deliver waiting events into them.
            self.events.flush()

    def spin_on_ring(self, index: int) -> bool:
        """Only the request queues are polled while spinning: control and event queues carry
        no I/O, and their kicks are few."""
        return index >= FIRST_REQUEST_QUEUE

    def queue_stopped(self, index: int, vring: Vring) -> None:
        """Stop routing to the ring; late completions for it are dropped."""
        if index >= FIRST_REQUEST_QUEUE:
            self.requests.stop(index)
        elif index == EVENT_QUEUE:
            self.events.stop()

    def reset(self) -> None:
        """Device reset: config back to defaults (5.6.4.1), no events pending."""
        self._config = self.settings.config()
        self.requests.set_sizes(CDB_DEFAULT_SIZE, SENSE_DEFAULT_SIZE)
        self.events.reset()

    # -- background work --------------------------------------------------------------------

    async def run(self) -> None:
        """Finish commands completed on other threads; register for hot-plug events."""
        if self._on_connect is not None:
            self._on_connect(self)
        busy = self.busy_poll
        channel_fd = self.channel.fileno()
        if busy is not None:
            busy.watch(channel_fd)
        try:
            while True:
                await self.channel.wait()
                self.requests.finish_all()
                if busy is not None:
                    busy.activity()
        finally:
            if busy is not None:
                busy.unwatch(channel_fd)
            if self._on_disconnect is not None:
                self._on_disconnect(self)
            self.channel.close()
