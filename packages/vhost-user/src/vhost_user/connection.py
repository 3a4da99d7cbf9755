"""The back-end side of one vhost-user connection, sans-IO (in the style of h11).

Feed it what the socket delivered (``receive_data(bytes, fds)``); it returns events for the I/O
layer: ``SendMessage`` (bytes plus fds to send), ``QueueStarted`` (start watching a kick
eventfd) and ``QueueStopped``. It validates every request against ``RULES`` (payload size, file
descriptors, the protocol feature that gates it), keeps the negotiated state, maps guest memory
and builds ``Vring`` objects for the device. A refused request raises nothing: it is answered
(error ack when REPLY_ACK asked, zero-size GET_CONFIG reply) and logged in one line. When going
on would be unsafe it raises ``ProtocolError`` and the connection must be closed.

Ring states (vhost-user.rst "Ring states"), per queue::

    stopped --SET_VRING_KICK (num, addr, memory known)--> started
    started --SET_VRING_ENABLE 1 (or no F_PROTOCOL_FEATURES)--> started+enabled ("live")
    live --SET_VRING_ENABLE 0--> started;  started/live --GET_VRING_BASE--> stopped
    SET_VRING_NUM / SET_VRING_BASE / a new SET_VRING_ADDR: only while stopped.

The device sees ``queue_started`` / ``queue_stopped`` on entering / leaving "live"; a started but
disabled ring is not processed (as in rust-vmm: storage has no "discard" semantics to offer).

Knows nothing about sockets or trio; the only OS resources it touches are the fds and mappings
the protocol hands it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from virtio_queue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    SplitQueue,
    VirtioQueueError,
)
from virtio_queue.layout import is_valid_queue_size

from .backend import VhostUserBackend
from .errors import ProtocolError, RequestError
from .framing import Message, MessageFramer, close_fds
from .inflight import InflightArea, allocate_inflight_fd
from .messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_FLAG_REPLY,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_INDEX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    FrontendRequest,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostVringAddr,
    VhostVringState,
    encode_message,
)
from .vring import Vring

__all__ = [
    "BASE_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "RULES",
    "BackendConnection",
    "Event",
    "QueueStarted",
    "QueueStopped",
    "Rule",
    "SendMessage",
]

log = logging.getLogger(__name__)

# Protocol features this implementation fully supports; a device may add CONFIG.
BASE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.RESET_DEVICE
)
DEVICE_PROTOCOL_FEATURES = ProtocolFeature.CONFIG
# GET_MAX_MEM_SLOTS: as libvhost-user (QEMU caps it at what the platform supports).
MAX_MEM_SLOTS = 32
_MAX_INFLIGHT_QUEUES = 1024
_PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
_REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_FLAG_REPLY
_ACK_OK = U64.pack(0)
_ACK_ERROR = U64.pack(1)


# -- events ----------------------------------------------------------------------------------
@dataclass(slots=True)
class SendMessage:
    """Send ``data`` with ``fds`` attached; the sender closes the fds once sent."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass(slots=True)
class QueueStarted:
    """A ring went live: wait on ``kick_fd``, then ``handle_kick`` + ``vring.notify()``."""

    vring: Vring
    kick_fd: int


@dataclass(slots=True)
class QueueStopped:
    """A ring left the live state: stop processing it."""

    vring: Vring


Event = SendMessage | QueueStarted | QueueStopped


# -- the rule table --------------------------------------------------------------------------
class Fds(enum.Enum):
    """How many file descriptors a request carries."""

    NONE = "none"
    ONE = "one"
    VRING = "one unless the no-fd bit is set"
    REGIONS = "one per memory region"
    OPTIONAL = "none (one tolerated and closed)"


class Reply(enum.Enum):
    """What a request is answered with (ACK: only when REPLY_ACK need_reply asks)."""

    ACK = "ack"
    U64 = "u64"
    STATE = "vring state"
    CONFIG = "config"
    INFLIGHT = "inflight"


_NO_FEATURE = ProtocolFeature(0)


@dataclass(frozen=True, slots=True)
class Rule:
    """How one request is checked: exact payload size (None: its decoder checks), fds,
    reply, and the protocol feature that must have been negotiated."""

    size: int | None
    fds: Fds
    reply: Reply
    requires: ProtocolFeature = _NO_FEATURE


_R = FrontendRequest
_STATE = VhostVringState.STRUCT.size
RULES: dict[FrontendRequest, Rule] = {
    _R.GET_FEATURES: Rule(0, Fds.NONE, Reply.U64),
    _R.SET_FEATURES: Rule(8, Fds.NONE, Reply.ACK),
    _R.SET_OWNER: Rule(0, Fds.NONE, Reply.ACK),
    _R.RESET_OWNER: Rule(0, Fds.NONE, Reply.ACK),
    _R.SET_MEM_TABLE: Rule(None, Fds.REGIONS, Reply.ACK),
    _R.SET_VRING_NUM: Rule(_STATE, Fds.NONE, Reply.ACK),
    _R.SET_VRING_ADDR: Rule(VhostVringAddr.STRUCT.size, Fds.NONE, Reply.ACK),
    _R.SET_VRING_BASE: Rule(_STATE, Fds.NONE, Reply.ACK),
    _R.GET_VRING_BASE: Rule(_STATE, Fds.NONE, Reply.STATE),
    _R.SET_VRING_KICK: Rule(8, Fds.VRING, Reply.ACK),
    _R.SET_VRING_CALL: Rule(8, Fds.VRING, Reply.ACK),
    _R.SET_VRING_ERR: Rule(8, Fds.VRING, Reply.ACK),
    _R.GET_PROTOCOL_FEATURES: Rule(0, Fds.NONE, Reply.U64),
    _R.SET_PROTOCOL_FEATURES: Rule(8, Fds.NONE, Reply.ACK),
    _R.GET_QUEUE_NUM: Rule(0, Fds.NONE, Reply.U64, ProtocolFeature.MQ),
    _R.SET_VRING_ENABLE: Rule(_STATE, Fds.NONE, Reply.ACK),
    _R.GET_CONFIG: Rule(None, Fds.NONE, Reply.CONFIG, ProtocolFeature.CONFIG),
    _R.SET_CONFIG: Rule(None, Fds.NONE, Reply.ACK, ProtocolFeature.CONFIG),
    _R.GET_INFLIGHT_FD: Rule(None, Fds.NONE, Reply.INFLIGHT, ProtocolFeature.INFLIGHT_SHMFD),
    _R.SET_INFLIGHT_FD: Rule(None, Fds.ONE, Reply.ACK, ProtocolFeature.INFLIGHT_SHMFD),
    _R.RESET_DEVICE: Rule(0, Fds.NONE, Reply.ACK, ProtocolFeature.RESET_DEVICE),
    _R.GET_MAX_MEM_SLOTS: Rule(0, Fds.NONE, Reply.U64, ProtocolFeature.CONFIGURE_MEM_SLOTS),
    _R.ADD_MEM_REG: Rule(
        VhostUserMemRegMsg.STRUCT.size, Fds.ONE, Reply.ACK, ProtocolFeature.CONFIGURE_MEM_SLOTS
    ),
    _R.REM_MEM_REG: Rule(
        VhostUserMemRegMsg.STRUCT.size, Fds.OPTIONAL, Reply.ACK, ProtocolFeature.CONFIGURE_MEM_SLOTS
    ),
    _R.SET_STATUS: Rule(8, Fds.NONE, Reply.ACK, ProtocolFeature.STATUS),
    _R.GET_STATUS: Rule(0, Fds.NONE, Reply.U64, ProtocolFeature.STATUS),
}


@dataclass(slots=True)
class RingConfig:
    """What the front-end told us about one ring, and the ``Vring`` while it is started."""

    index: int
    size: int = 0
    addr: VhostVringAddr | None = None
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    vring: Vring | None = None
    live: bool = False
    inflight_recovered: bool = False
    # Mapped areas this ring's tracker may still point into (kept until it stops).
    areas: list[InflightArea] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return self.vring is not None


def _noop_fd_closing(fd: int) -> None:
    return None


class BackendConnection:
    """Protocol state of one front-end connection (see the module docstring)."""

    def __init__(
        self,
        backend: VhostUserBackend,
        *,
        fd_closing: Callable[[int], None] = _noop_fd_closing,
    ) -> None:
        """``fd_closing(fd)`` is called before an fd handed out in an event is closed (the
        trio layer passes ``trio.lowlevel.notify_closing``)."""
        self.backend = backend
        self._fd_closing = fd_closing
        self._framer = MessageFramer()
        self.num_queues = int(backend.num_queues)
        self.offered_features = int(backend.features()) | _PROTOCOL_FEATURES_BIT
        self.offered_protocol_features = BASE_PROTOCOL_FEATURES | (
            ProtocolFeature(int(backend.protocol_features())) & DEVICE_PROTOCOL_FEATURES
        )
        self.acked_features = 0
        self.acked_protocol_features = ProtocolFeature(0)
        self.owned = False
        self.status = 0
        self.memory = GuestMemory()
        self.rings = [RingConfig(i) for i in range(self.num_queues)]
        self.inflight: InflightArea | None = None
        self._events: list[Event] = []
        self.closed = False
        self._handlers: dict[FrontendRequest, Callable[[Message], bytes | SendMessage | None]] = {
            request: getattr(self, "_on_" + request.name.lower()) for request in RULES
        }

    # -- the sans-IO interface ------------------------------------------------------------
    def bytes_needed(self) -> int:
        """How many bytes to read next (the rest of a header, or of a payload)."""
        return self._framer.bytes_needed()

    def receive_data(
        self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()
    ) -> list[Event]:
        """Take bytes and fds from the socket; return the events they cause, in order.

        The connection owns the fds from here on. Raises ``ProtocolError`` when the connection
        must be closed (send ``exc.reply`` first if set); call ``close()`` then.
        """
        fds = list(fds)
        if self.closed:
            close_fds(fds)
            raise ProtocolError("connection already closed")
        events: list[Event] = []
        for message in self._framer.feed(data, fds):
            events.extend(self.handle_message(message))
        return events

    def handle_message(self, msg: Message) -> list[Event]:
        """Validate and carry out one framed request."""
        self._events = []
        header = msg.header
        try:
            if header.version != VHOST_USER_VERSION or header.is_reply:
                raise ProtocolError(
                    f"request {header.request} with flags {header.flags:#x}: "
                    "not a version 1 front-end request"
                )
            name = _request_name(header.request)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s flags=%#x payload=%s fds=%d",
                    name,
                    header.flags,
                    bytes(msg.payload[:40]).hex(),
                    len(msg.fds),
                )
            reply_bytes = self._dispatch(msg, name)
        finally:
            close_fds(msg.fds)  # whatever a handler did not take
            msg.fds = []
        events, self._events = self._events, []
        if reply_bytes is not None:
            events.append(reply_bytes)
        return events

    def close(self) -> None:
        """Stop every ring, close every fd, unmap memory (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for ring in self.rings:
            with contextlib.suppress(RequestError):
                self._stop_ring(ring)
            self._close_ring_fds(ring)
            for area in ring.areas:
                area.close()
            ring.areas.clear()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.memory.close()
        self._framer.close()

    # -- dispatch -------------------------------------------------------------------------
    def _dispatch(self, msg: Message, name: str) -> SendMessage | None:
        header = msg.header
        try:
            request = FrontendRequest(header.request)
        except ValueError:
            request = FrontendRequest.NONE
        rule = RULES.get(request)
        wants_ack = header.need_reply and bool(
            self.acked_protocol_features & ProtocolFeature.REPLY_ACK
        )
        reply_kind = rule.reply if rule is not None else Reply.ACK
        try:
            if rule is None:
                raise RequestError("unsupported request")
            if rule.requires and not self.acked_protocol_features & rule.requires:
                raise RequestError(f"needs protocol feature {rule.requires.name}")
            if rule.size is not None and len(msg.payload) != rule.size:
                raise RequestError(f"payload of {len(msg.payload)} bytes, expected {rule.size}")
            _check_fds(rule.fds, msg)
            result = self._handlers[request](msg)
        except RequestError as exc:
            log.warning("vhost-user %s refused: %s", name, str(exc))
            if reply_kind is Reply.CONFIG:
                # vhost-user.rst GET_CONFIG: a zero-length payload tells the front-end it failed.
                return SendMessage(encode_message(header.request, b"", flags=_REPLY_FLAGS))
            if reply_kind is not Reply.ACK:
                raise ProtocolError(f"{name} failed and needs a reply: {exc}") from None
            if wants_ack:
                return SendMessage(encode_message(header.request, _ACK_ERROR, flags=_REPLY_FLAGS))
            return None
        except ProtocolError as exc:
            if wants_ack and reply_kind is Reply.ACK and exc.reply is None:
                exc.reply = encode_message(header.request, _ACK_ERROR, flags=_REPLY_FLAGS)
            raise
        if isinstance(result, SendMessage):
            return result
        if result is not None:
            return SendMessage(encode_message(header.request, result, flags=_REPLY_FLAGS))
        if wants_ack:
            return SendMessage(encode_message(header.request, _ACK_OK, flags=_REPLY_FLAGS))
        return None

    # -- helpers --------------------------------------------------------------------------
    def _ring(self, index: int) -> RingConfig:
        if not 0 <= index < self.num_queues:
            raise RequestError(f"vring index {index} out of range (device has {self.num_queues})")
        return self.rings[index]

    def _close_fd(self, fd: int) -> None:
        if fd >= 0:
            self._fd_closing(fd)
            close_fds((fd,))

    def _close_ring_fds(self, ring: RingConfig) -> None:
        self._close_fd(ring.kick_fd)
        self._close_fd(ring.call_fd)
        self._close_fd(ring.err_fd)
        ring.kick_fd = ring.call_fd = ring.err_fd = -1

    def _call_device(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RequestError:
            raise
        except Exception as exc:
            log.error("device %s failed: %s", what, repr(exc))
            raise RequestError(f"device {what} failed: {exc!r}") from exc

    @property
    def protocol_features_acked(self) -> bool:
        """Whether VHOST_USER_F_PROTOCOL_FEATURES was acknowledged in SET_FEATURES."""
        return bool(self.acked_features & _PROTOCOL_FEATURES_BIT)

    def _update_live(self, ring: RingConfig) -> None:
        vring = ring.vring
        want = vring is not None and ring.enabled
        if want and not ring.live:
            assert vring is not None
            self._call_device("queue_started", self.backend.queue_started, ring.index, vring)
            ring.live = True
            self._events.append(QueueStarted(vring, ring.kick_fd))
        elif not want and ring.live:
            ring.live = False
            assert vring is not None or ring.vring is None
            if vring is not None:
                self._events.append(QueueStopped(vring))
                self._call_device("queue_stopped", self.backend.queue_stopped, ring.index, vring)

    def _stop_ring(self, ring: RingConfig) -> None:
        """Started -> stopped: remember where popping got to, drop the Vring."""
        vring = ring.vring
        if vring is None:
            return
        ring.base = vring.queue.next_avail
        try:
            if ring.live:
                ring.live = False
                self._events.append(QueueStopped(vring))
                self._call_device("queue_stopped", self.backend.queue_stopped, ring.index, vring)
        finally:
            ring.vring = None
            # Trackers of replaced inflight areas are done with once their ring stops.
            for area in ring.areas:
                if area is not self.inflight:
                    area.close()
            ring.areas.clear()

    def _build_queue(
        self, ring: RingConfig, next_avail: int, next_used: int | None = None
    ) -> SplitQueue:
        if ring.size == 0:
            raise RequestError(f"vring {ring.index}: no SET_VRING_NUM yet")
        if ring.addr is None:
            raise RequestError(f"vring {ring.index}: no SET_VRING_ADDR yet")
        addr = ring.addr
        try:
            return SplitQueue(
                self.memory,
                ring.size,
                self.memory.user_to_guest(addr.desc_user_addr),
                self.memory.user_to_guest(addr.avail_user_addr),
                self.memory.user_to_guest(addr.used_user_addr),
                event_idx=bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC)),
                next_avail=next_avail,
                next_used=next_used,
            )
        except VirtioQueueError as exc:
            raise RequestError(f"vring {ring.index}: {exc}") from None

    def _start_ring(self, ring: RingConfig) -> None:
        queue = self._build_queue(ring, ring.base)
        tracker = None
        resubmit: list[int] = []
        area = self.inflight
        if area is not None:
            tracker = area.queue(ring.index, ring.size)
            if tracker is None:
                log.warning(
                    "vring %d (size %d) is not covered by the inflight area (%d queues of %d)",
                    ring.index,
                    ring.size,
                    area.num_queues,
                    area.queue_size,
                )
            elif tracker.version == 0:
                tracker.initialise(queue.next_used)
            elif not ring.inflight_recovered:
                # vhost-user.rst "When reconnecting": repair the last batch, resubmit what is
                # in flight oldest first, and resume popping after the chains taken so far.
                resubmit = tracker.recover(queue.next_used)
                resume = (queue.next_used + len(resubmit)) & 0xFFFF
                if resume != queue.next_avail:
                    log.info(
                        "vring %d: resuming at avail %d (used %d + %d in flight), not %d",
                        ring.index,
                        resume,
                        queue.next_used,
                        len(resubmit),
                        queue.next_avail,
                    )
                    queue.next_avail = resume
                if resubmit:
                    log.info(
                        "vring %d: resubmitting %d in-flight chains", ring.index, len(resubmit)
                    )
            if tracker is not None:
                ring.inflight_recovered = True
                ring.areas.append(area)
        ring.vring = Vring(
            ring.index, queue, call_fd=ring.call_fd, inflight=tracker, resubmit=resubmit
        )
        if not self.protocol_features_acked:
            # vhost-user.rst "Ring states": without F_PROTOCOL_FEATURES a ring starts enabled.
            ring.enabled = True
        self._update_live(ring)

    def _rebuild_started_rings(self) -> None:
        """Memory was remapped: rebuild every started ring's queue over the new mappings."""
        for ring in self.rings:
            vring = ring.vring
            if vring is None:
                continue
            old = vring.queue
            try:
                vring.replace_queue(self._build_queue(ring, old.next_avail, old.next_used))
            except RequestError as exc:
                log.warning(
                    "vring %d stopped: rings not in the new memory table: %s", ring.index, exc
                )
                self._stop_ring(ring)

    def _map_region(self, region: VhostUserMemoryRegion, fd: int) -> MemoryRegion:
        try:
            return MemoryRegion.from_fd(
                fd,
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
                region.mmap_offset,
            )
        except GuestMemoryError as exc:
            raise RequestError(str(exc)) from None

    # -- handlers: features and ownership ---------------------------------------------------
    def _on_get_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        extra = features & ~self.offered_features
        if extra:
            raise ProtocolError(f"front-end acked features {extra:#x} that were not offered")
        self._call_device("set_features", self.backend.set_features, features)
        self.acked_features = features
        if not features & _PROTOCOL_FEATURES_BIT:
            for ring in self.rings:
                ring.enabled = True
                self._update_live(ring)

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(int(self.offered_protocol_features))

    def _on_set_protocol_features(self, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        extra = features & ~int(self.offered_protocol_features)
        if extra:
            raise ProtocolError(f"front-end acked protocol features {extra:#x} not offered")
        self.acked_protocol_features = ProtocolFeature(features)

    def _on_set_owner(self, msg: Message) -> None:
        if self.owned:
            raise RequestError("already owned by this front-end")
        self.owned = True

    def _on_reset_owner(self, msg: Message) -> None:
        # Deprecated; vhost-user.rst recommends ignoring it or disabling all rings.
        for ring in self.rings:
            ring.enabled = False
            self._update_live(ring)

    def _on_get_queue_num(self, msg: Message) -> bytes:
        return U64.pack(self.num_queues)

    def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        return U64.pack(MAX_MEM_SLOTS)

    # -- handlers: memory -------------------------------------------------------------------
    def _on_set_mem_table(self, msg: Message) -> None:
        try:
            table = VhostUserMemory.unpack(msg.payload)
        except struct.error as exc:
            raise RequestError(str(exc)) from None
        if len(msg.fds) != len(table.regions):
            raise RequestError(f"{len(table.regions)} regions but {len(msg.fds)} fds")
        staged = GuestMemory()
        try:
            for wanted, fd in zip(table.regions, msg.fds, strict=True):
                mapped = self._map_region(wanted, fd)
                try:
                    _check_user_overlap(staged, mapped)
                    staged.add_region(mapped)
                except (GuestMemoryError, RequestError) as exc:
                    mapped.close()
                    raise RequestError(f"overlapping regions: {exc}") from None
        except RequestError:
            staged.close()
            raise
        old = list(self.memory.regions)
        for region in old:
            self.memory.remove_region(region.guest_phys_addr)
        for region in staged.regions:
            self.memory.add_region(region)
        self._rebuild_started_rings()
        for region in old:
            region.close()

    def _on_add_mem_reg(self, msg: Message) -> None:
        region = VhostUserMemRegMsg.unpack(msg.payload).region
        if len(self.memory.regions) >= MAX_MEM_SLOTS:
            raise RequestError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        mapped = self._map_region(region, msg.fds[0])
        try:
            _check_user_overlap(self.memory, mapped)
            self.memory.add_region(mapped)
        except (GuestMemoryError, RequestError) as exc:
            mapped.close()
            raise RequestError(f"overlapping region: {exc}") from None

    def _on_rem_mem_reg(self, msg: Message) -> None:
        # vhost-user.rst: identified by guest address, user address and size; mmap offset and
        # any fd sent along are ignored (the fd is closed unused).
        want = VhostUserMemRegMsg.unpack(msg.payload)
        for region in self.memory.regions:
            if (
                region.guest_phys_addr == want.guest_phys_addr
                and region.size == want.memory_size
                and region.user_addr == want.userspace_addr
            ):
                self.memory.remove_region(region.guest_phys_addr)
                self._rebuild_started_rings()
                region.close()
                return
        raise RequestError(
            f"no region at {want.guest_phys_addr:#x}+{want.memory_size:#x} "
            f"(user {want.userspace_addr:#x})"
        )

    # -- handlers: vrings -------------------------------------------------------------------
    def _on_set_vring_num(self, msg: Message) -> None:
        state = VhostVringState.unpack(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise RequestError(f"vring {state.index} is started")
        if not is_valid_queue_size(state.num) or state.num > self.backend.max_queue_size:
            raise RequestError(
                f"vring {state.index}: size {state.num} is not a power of two "
                f"up to {self.backend.max_queue_size}"
            )
        ring.size = state.num

    def _on_set_vring_addr(self, msg: Message) -> None:
        addr = VhostVringAddr.unpack(msg.payload)
        ring = self._ring(addr.index)
        if ring.started:
            old = ring.addr
            assert old is not None
            if (old.desc_user_addr, old.avail_user_addr, old.used_user_addr) != (
                addr.desc_user_addr,
                addr.avail_user_addr,
                addr.used_user_addr,
            ):
                raise RequestError(f"vring {addr.index} is started: cannot move its rings")
        elif self.memory.regions:
            try:
                for user_addr in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
                    self.memory.user_to_guest(user_addr)
            except GuestMemoryError as exc:
                raise RequestError(f"vring {addr.index}: {exc}") from None
        # The VHOST_VRING_F_LOG flag is moot: LOG_SHMFD (dirty logging) is not offered.
        ring.addr = addr

    def _on_set_vring_base(self, msg: Message) -> None:
        state = VhostVringState.unpack(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise RequestError(f"vring {state.index} is started")
        if state.num > 0xFFFF:
            raise RequestError(f"vring {state.index}: base {state.num} is not a split-ring index")
        ring.base = state.num

    def _on_get_vring_base(self, msg: Message) -> bytes:
        state = VhostVringState.unpack(msg.payload)
        ring = self._ring(state.index)
        # vhost-user.rst "Ring states": GET_VRING_BASE stops the ring; the front-end sends
        # KICK and CALL again before it restarts it.
        self._stop_ring(ring)
        self._close_ring_fds(ring)
        return VhostVringState(state.index, ring.base).pack()

    def _vring_fd_request(self, msg: Message) -> tuple[RingConfig, int]:
        (value,) = U64.unpack(msg.payload)
        if value & ~(VHOST_USER_VRING_INDEX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise RequestError(f"reserved bits set in {value:#x}")
        ring = self._ring(value & VHOST_USER_VRING_INDEX_MASK)
        fd = -1 if value & VHOST_USER_VRING_NOFD_MASK else msg.fds.pop()
        return ring, fd

    def _on_set_vring_kick(self, msg: Message) -> None:
        ring, fd = self._vring_fd_request(msg)
        if fd < 0:
            raise RequestError(f"vring {ring.index}: polling (no kick fd) is not supported")
        # A new kick fd replaces the old one: the I/O layer must stop waiting on it first.
        self._stop_ring(ring)
        self._close_fd(ring.kick_fd)
        ring.kick_fd = fd
        # Drained after wait_readable; non-blocking so a spurious wake-up can never stall the
        # event loop (QEMU creates its eventfds non-blocking anyway).
        os.set_blocking(fd, False)
        self._start_ring(ring)

    def _on_set_vring_call(self, msg: Message) -> None:
        ring, fd = self._vring_fd_request(msg)
        old, ring.call_fd = ring.call_fd, fd
        if ring.vring is not None:
            ring.vring.call_fd = fd  # QEMU swaps call fds on live rings (guest notifier masking)
        self._close_fd(old)
        if fd >= 0:
            # QEMU sends SET_VRING_CALL without asking for a reply and checks the old (masked)
            # notifier at once, while our queue tasks may still be signalling the old fd for
            # requests the guest kicked meanwhile: that interrupt would be lost and the guest
            # wait for a timeout. Signal the new fd once; a spurious interrupt only makes the
            # driver look at a used ring with nothing new (libvhost-user does the same).
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.warning("vring %d: cannot signal the new call fd: %s", ring.index, exc)

    def _on_set_vring_err(self, msg: Message) -> None:
        ring, fd = self._vring_fd_request(msg)
        old, ring.err_fd = ring.err_fd, fd
        self._close_fd(old)

    def _on_set_vring_enable(self, msg: Message) -> None:
        state = VhostVringState.unpack(msg.payload)
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise RequestError(f"vring {state.index}: enable value {state.num} is not 0 or 1")
        ring.enabled = bool(state.num)
        self._update_live(ring)

    # -- handlers: config, inflight, status, reset -------------------------------------------
    def _on_get_config(self, msg: Message) -> bytes:
        try:
            config = VhostUserConfig.unpack(msg.payload)
        except struct.error as exc:
            raise RequestError(str(exc)) from None
        data = self._call_device("get_config", self.backend.get_config, config.offset, config.size)
        if not isinstance(data, bytes | bytearray) or len(data) != config.size:
            raise RequestError(f"device returned no {config.size} config bytes at {config.offset}")
        return VhostUserConfig(config.offset, config.size, config.flags, bytes(data)).pack()

    def _on_set_config(self, msg: Message) -> None:
        try:
            config = VhostUserConfig.unpack(msg.payload)
        except struct.error as exc:
            raise RequestError(str(exc)) from None
        self._call_device("set_config", self.backend.set_config, config.offset, config.payload)

    def _decode_inflight(self, msg: Message) -> VhostUserInflight:
        try:
            inflight = VhostUserInflight.unpack(msg.payload)
        except struct.error as exc:
            raise RequestError(str(exc)) from None
        if not 1 <= inflight.num_queues <= _MAX_INFLIGHT_QUEUES:
            raise RequestError(f"inflight area for {inflight.num_queues} queues")
        if not is_valid_queue_size(inflight.queue_size):
            raise RequestError(f"inflight queue size {inflight.queue_size} is not a power of two")
        return inflight

    def _install_inflight(self, area: InflightArea) -> None:
        old, self.inflight = self.inflight, area
        for ring in self.rings:
            ring.inflight_recovered = False
        if old is not None and not any(old in ring.areas for ring in self.rings):
            old.close()

    def _on_get_inflight_fd(self, msg: Message) -> SendMessage:
        request = self._decode_inflight(msg)
        try:
            fd, size = allocate_inflight_fd(request.num_queues, request.queue_size)
        except OSError as exc:
            raise RequestError(f"cannot allocate the inflight area: {exc}") from None
        try:
            area = InflightArea(fd, size, 0, request.num_queues, request.queue_size)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise RequestError(f"cannot map the inflight area: {exc}") from None
        self._install_inflight(area)
        reply = VhostUserInflight(size, 0, request.num_queues, request.queue_size).pack()
        return SendMessage(encode_message(msg.header.request, reply, flags=_REPLY_FLAGS), (fd,))

    def _on_set_inflight_fd(self, msg: Message) -> None:
        request = self._decode_inflight(msg)
        try:
            area = InflightArea(
                msg.fds[0],
                request.mmap_size,
                request.mmap_offset,
                request.num_queues,
                request.queue_size,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise RequestError(f"cannot map the inflight area: {exc}") from None
        self._install_inflight(area)

    def _on_set_status(self, msg: Message) -> None:
        (self.status,) = U64.unpack(msg.payload)

    def _on_get_status(self, msg: Message) -> bytes:
        return U64.pack(self.status)

    def _on_reset_device(self, msg: Message) -> None:
        # vhost-user.rst RESET_DEVICE: disable all rings and return to the initial state;
        # ownership, memory and protocol features belong to the connection and stay.
        for ring in self.rings:
            self._stop_ring(ring)
            self._close_ring_fds(ring)
        self.rings = [RingConfig(i) for i in range(self.num_queues)]
        self.acked_features = 0
        self.status = 0
        self._call_device("reset", self.backend.reset)


def _request_name(code: int) -> str:
    try:
        return FrontendRequest(code).name
    except ValueError:
        return f"request {code}"


def _check_fds(rule: Fds, msg: Message) -> None:
    count = len(msg.fds)
    if rule is Fds.NONE:
        expected = 0
    elif rule is Fds.ONE:
        expected = 1
    elif rule is Fds.VRING:
        (value,) = U64.unpack(msg.payload)
        expected = 0 if value & VHOST_USER_VRING_NOFD_MASK else 1
    elif rule is Fds.OPTIONAL:
        if count > 1:
            raise RequestError(f"{count} file descriptors, expected at most one")
        return
    else:  # Fds.REGIONS: the handler matches them against the table
        return
    if count != expected:
        raise RequestError(f"{count} file descriptors, expected {expected}")


def _check_user_overlap(memory: GuestMemory, new: MemoryRegion) -> None:
    """Front-end addresses must map to one region only, or ring addresses are ambiguous."""
    for region in memory.regions:
        if (
            new.user_addr < region.user_addr + region.size
            and region.user_addr < new.user_addr + new.size
        ):
            raise RequestError(f"{new!r} overlaps {region!r} in the front-end's address space")
