"""The front-end (QEMU's side) of vhost-user, on trio: for tests, benchmarks and tools.

``VhostUserFrontend`` sends each request and checks its reply; on top of the raw requests it
does what QEMU does to bring a device up (negotiate, share memfd memory, set up each vring with
a ``DriverQueue`` and kick/call eventfds, enable it) and to bring it back after the back-end
restarts (``reconnect``: replay features, the inflight area, the memory table and the vrings on
a new connection, as QEMU does with ``reconnect=1``).

Knows nothing about any device type; the back-end implementation is not imported.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

# trio 0.22 (installed here) ships no type information; newer trio does.
import trio
from virtio_queue import (
    VIRTIO_RING_F_EVENT_IDX,
    DriverQueue,
    GuestMemory,
    MemoryRegion,
    QueueLayout,
    VirtqUsedElem,
)

from .errors import VhostUserError
from .framing import Message, MessageFramer, close_fds
from .messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_FLAG_NEED_REPLY,
    VHOST_USER_VERSION,
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

__all__ = ["FrontendError", "FrontendQueue", "SharedMemory", "VhostUserFrontend"]

_R = FrontendRequest
_ANCILLARY_SIZE = socket.CMSG_SPACE(8 * array.array("i").itemsize)


class FrontendError(VhostUserError):
    """The back-end refused a request, replied wrongly, or went away."""


class SharedMemory:
    """Guest RAM for a test front-end: a memfd mapped here and shared with the back-end.

    ``user_addr`` plays the front-end's virtual address of the region (ring addresses are sent
    in that space, as QEMU does).
    """

    def __init__(
        self, size: int, *, guest_phys_addr: int = 0, user_addr: int = 0x7F00_0000_0000
    ) -> None:
        self.fd = os.memfd_create("vhost-user-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.region = MemoryRegion.from_fd(self.fd, guest_phys_addr, size, user_addr, 0)
        self.memory = GuestMemory([self.region])

    @property
    def table_entry(self) -> VhostUserMemoryRegion:
        r = self.region
        return VhostUserMemoryRegion(r.guest_phys_addr, r.size, r.user_addr, r.mmap_offset)

    def to_user(self, gpa: int) -> int:
        """The front-end virtual address of guest physical address ``gpa``."""
        return gpa - self.region.guest_phys_addr + self.region.user_addr

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


@dataclass(slots=True)
class FrontendQueue:
    """One vring from the driver's side: its ``DriverQueue`` and both eventfds."""

    index: int
    driver: DriverQueue
    kick_fd: int
    call_fd: int
    used: list[VirtqUsedElem] = field(default_factory=list)

    def submit(self) -> None:
        """Publish the chains added to ``driver`` and kick if the device wants it."""
        if self.driver.publish():
            os.eventfd_write(self.kick_fd, 1)

    def kick(self) -> None:
        """Kick unconditionally (as after a reconnection)."""
        os.eventfd_write(self.kick_fd, 1)

    async def wait_used(self, count: int) -> list[VirtqUsedElem]:
        """Collect used elements until ``count`` have come (wrap in ``trio.fail_after``)."""
        while True:
            self.used.extend(self.driver.get_used())
            if len(self.used) >= count:
                done, self.used = self.used[:count], self.used[count:]
                return done
            await trio.lowlevel.wait_readable(self.call_fd)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)

    def close(self) -> None:
        close_fds((self.kick_fd, self.call_fd))


@dataclass(slots=True)
class _InflightState:
    fd: int
    description: VhostUserInflight


class VhostUserFrontend:
    """A vhost-user front-end connection (see the module docstring)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._framer = MessageFramer()
        self.features = 0
        self.protocol_features = ProtocolFeature(0)
        self.memory: list[SharedMemory] = []
        self.queues: dict[int, FrontendQueue] = {}
        self.inflight: _InflightState | None = None
        self._socket_path: str | None = None

    @classmethod
    async def connect(cls, socket_path: str) -> VhostUserFrontend:
        """Connect to a back-end listening on ``socket_path``."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(socket_path)
        except OSError:
            sock.close()
            raise
        frontend = cls(sock)
        frontend._socket_path = socket_path
        return frontend

    async def aclose(self) -> None:
        """Close the connection (memory, queues and the inflight fd stay for a reconnect)."""
        self._sock.close()
        self._framer.close()

    def close_resources(self) -> None:
        """Release memory, eventfds and the inflight fd (after the last connection)."""
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        if self.inflight is not None:
            os.close(self.inflight.fd)
            self.inflight = None

    # -- raw requests ---------------------------------------------------------------------
    async def send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, flags: int = 0
    ) -> None:
        """Send one request as is (tests use it for malformed messages)."""
        data = encode_message(request, payload, flags=VHOST_USER_VERSION | flags)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            await self._sock.sendmsg([data], anc)
        except OSError as exc:
            raise FrontendError(f"back-end went away: {exc}") from exc

    async def receive(self) -> Message:
        """Read one message from the back-end."""
        while True:
            try:
                data, ancdata, _flags, _addr = await self._sock.recvmsg(
                    self._framer.bytes_needed(), _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except OSError as exc:
                raise FrontendError(f"back-end went away: {exc}") from exc
            fds: list[int] = []
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(raw[: len(raw) - len(raw) % received.itemsize])
                    fds.extend(received)
            if not data:
                close_fds(fds)
                raise FrontendError("back-end closed the connection")
            messages = self._framer.feed(data, fds)
            if messages:
                return messages[0]

    async def _reply(self, request: int) -> Message:
        message = await self.receive()
        if message.header.request != request or not message.header.is_reply:
            close_fds(message.fds)
            raise FrontendError(f"expected a reply to {request}, got {message.header}")
        return message

    async def request(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, reply: bool = False
    ) -> Message | None:
        """Send a request; return its reply if it has one; check the REPLY_ACK ack if not."""
        ack = not reply and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        await self.send(request, payload, fds, flags=VHOST_USER_FLAG_NEED_REPLY if ack else 0)
        if reply:
            return await self._reply(request)
        if ack:
            message = await self._reply(request)
            (status,) = U64.unpack(message.payload)
            if status:
                raise FrontendError(f"back-end refused {_R(request).name}")
        return None

    async def _u64(self, request: int) -> int:
        message = await self.request(request, reply=True)
        assert message is not None
        if len(message.payload) != U64.size:
            raise FrontendError(f"{_R(request).name} reply of {len(message.payload)} bytes")
        value: int = U64.unpack(message.payload)[0]
        return value

    # -- typed requests -------------------------------------------------------------------
    async def get_features(self) -> int:
        return await self._u64(_R.GET_FEATURES)

    async def set_features(self, features: int) -> None:
        await self.request(_R.SET_FEATURES, U64.pack(features))
        self.features = features

    async def get_protocol_features(self) -> ProtocolFeature:
        return ProtocolFeature(await self._u64(_R.GET_PROTOCOL_FEATURES))

    async def set_protocol_features(self, features: ProtocolFeature) -> None:
        # Sent without need_reply: REPLY_ACK is not in force until this has been accepted.
        await self.send(_R.SET_PROTOCOL_FEATURES, U64.pack(int(features)))
        self.protocol_features = features

    async def set_owner(self) -> None:
        await self.request(_R.SET_OWNER)

    async def get_queue_num(self) -> int:
        return await self._u64(_R.GET_QUEUE_NUM)

    async def get_max_mem_slots(self) -> int:
        return await self._u64(_R.GET_MAX_MEM_SLOTS)

    async def set_mem_table(self, memory: Sequence[SharedMemory]) -> None:
        table = VhostUserMemory(tuple(m.table_entry for m in memory))
        await self.request(_R.SET_MEM_TABLE, table.pack(), [m.fd for m in memory])
        self.memory = list(memory)

    async def add_mem_reg(self, memory: SharedMemory) -> None:
        await self.request(
            _R.ADD_MEM_REG, VhostUserMemRegMsg.of(memory.table_entry).pack(), [memory.fd]
        )
        self.memory.append(memory)

    async def rem_mem_reg(self, memory: SharedMemory) -> None:
        await self.request(_R.REM_MEM_REG, VhostUserMemRegMsg.of(memory.table_entry).pack())
        self.memory.remove(memory)

    async def set_vring_num(self, index: int, num: int) -> None:
        await self.request(_R.SET_VRING_NUM, VhostVringState(index, num).pack())

    async def set_vring_base(self, index: int, base: int) -> None:
        await self.request(_R.SET_VRING_BASE, VhostVringState(index, base).pack())

    async def get_vring_base(self, index: int) -> int:
        message = await self.request(
            _R.GET_VRING_BASE, VhostVringState(index, 0).pack(), reply=True
        )
        assert message is not None
        return VhostVringState.unpack(message.payload).num

    async def set_vring_addr(self, addr: VhostVringAddr) -> None:
        await self.request(_R.SET_VRING_ADDR, addr.pack())

    async def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        if fd is None:
            await self.request(request, U64.pack(index | VHOST_USER_VRING_NOFD_MASK))
        else:
            await self.request(request, U64.pack(index), [fd])

    async def set_vring_kick(self, index: int, fd: int | None) -> None:
        await self._vring_fd(_R.SET_VRING_KICK, index, fd)

    async def set_vring_call(self, index: int, fd: int | None) -> None:
        await self._vring_fd(_R.SET_VRING_CALL, index, fd)

    async def set_vring_err(self, index: int, fd: int | None) -> None:
        await self._vring_fd(_R.SET_VRING_ERR, index, fd)

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        await self.request(_R.SET_VRING_ENABLE, VhostVringState(index, int(enable)).pack())

    async def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """The config space bytes; FrontendError if the back-end signals failure."""
        payload = VhostUserConfig(offset, size, flags, bytes(size)).pack()
        message = await self.request(_R.GET_CONFIG, payload, reply=True)
        assert message is not None
        if len(message.payload) != VhostUserConfig.HEADER_SIZE + size:
            raise FrontendError(f"GET_CONFIG failed (reply of {len(message.payload)} bytes)")
        return VhostUserConfig.unpack(message.payload).payload

    async def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self.request(_R.SET_CONFIG, VhostUserConfig(offset, len(data), flags, data).pack())

    async def get_inflight_fd(
        self, num_queues: int, queue_size: int
    ) -> tuple[int, VhostUserInflight]:
        """Ask the back-end for an inflight area; returns its fd (ours to close) and size."""
        payload = VhostUserInflight(0, 0, num_queues, queue_size).pack()
        message = await self.request(_R.GET_INFLIGHT_FD, payload, reply=True)
        assert message is not None
        if len(message.fds) != 1:
            close_fds(message.fds)
            raise FrontendError(f"GET_INFLIGHT_FD reply with {len(message.fds)} fds")
        return message.fds[0], VhostUserInflight.unpack(message.payload)

    async def set_inflight_fd(self, fd: int, description: VhostUserInflight) -> None:
        await self.request(_R.SET_INFLIGHT_FD, description.pack(), [fd])

    async def set_status(self, status: int) -> None:
        await self.request(_R.SET_STATUS, U64.pack(status))

    async def get_status(self) -> int:
        return await self._u64(_R.GET_STATUS)

    async def reset_device(self) -> None:
        await self.request(_R.RESET_DEVICE)

    # -- what QEMU does -------------------------------------------------------------------
    async def negotiate(
        self,
        features: int | None = None,
        protocol_features: ProtocolFeature | None = None,
    ) -> tuple[int, ProtocolFeature]:
        """GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_FEATURES; returns what was offered.

        The virtio features are acknowledged later by ``start`` (SET_FEATURES), as QEMU
        does when the driver is ready. ``features`` / ``protocol_features`` default to all
        offered.
        """
        offered = await self.get_features()
        offered_protocol = ProtocolFeature(0)
        if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            offered_protocol = await self.get_protocol_features()
            wanted = offered_protocol if protocol_features is None else protocol_features
            await self.set_protocol_features(wanted & offered_protocol)
        await self.set_owner()
        self.features = offered if features is None else features & offered
        return offered, offered_protocol

    async def setup_inflight(self, num_queues: int, queue_size: int) -> None:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD, keeping the fd for reconnections (QEMU)."""
        fd, description = await self.get_inflight_fd(num_queues, queue_size)
        self.inflight = _InflightState(fd, description)
        await self.set_inflight_fd(fd, description)

    def add_queue(self, index: int, memory: SharedMemory, base: int, size: int) -> FrontendQueue:
        """Lay out queue ``index`` at guest address ``base`` and make its eventfds."""
        layout = QueueLayout.at(base, size)
        driver = DriverQueue(memory.memory, layout, event_idx=self._event_idx)
        queue = FrontendQueue(
            index,
            driver,
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
        )
        self.queues[index] = queue
        return queue

    @property
    def _event_idx(self) -> bool:
        return bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))

    async def start(self, memory: Sequence[SharedMemory]) -> None:
        """SET_FEATURES, SET_MEM_TABLE, then every added queue: NUM, BASE, ADDR, KICK, CALL,
        and SET_VRING_ENABLE when protocol features were negotiated."""
        await self.set_features(self.features)
        await self.set_mem_table(memory)
        for queue in self.queues.values():
            await self._start_queue(queue, queue.driver.used_idx())

    async def _start_queue(self, queue: FrontendQueue, base: int) -> None:
        layout = queue.driver.layout
        to_user = self.memory[0].to_user
        await self.set_vring_num(queue.index, layout.size)
        await self.set_vring_base(queue.index, base)
        await self.set_vring_addr(
            VhostVringAddr(
                queue.index,
                0,
                to_user(layout.desc_addr),
                to_user(layout.used_addr),
                to_user(layout.avail_addr),
                0,
            )
        )
        await self.set_vring_kick(queue.index, queue.kick_fd)
        await self.set_vring_call(queue.index, queue.call_fd)
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            await self.set_vring_enable(queue.index, True)

    async def reconnect(self, socket_path: str | None = None) -> None:
        """A new connection to a restarted back-end, replaying what the old one knew.

        Like QEMU after a back-end crash, the avail position cannot be asked for (the old
        back-end is gone), so each ring restarts from its used idx; with INFLIGHT_SHMFD the
        back-end then resubmits what was in flight and resumes after it. Every queue is kicked
        once so nothing waits for a kick that was swallowed by the dead back-end.
        """
        path = socket_path or self._socket_path
        if path is None:
            raise FrontendError("no socket path to reconnect to")
        self._sock.close()
        self._framer.close()
        self._framer = MessageFramer()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        features, protocol_features = self.features, self.protocol_features
        self.protocol_features = ProtocolFeature(0)
        await self.negotiate(features, protocol_features)
        self.features = features
        if self.inflight is not None:
            await self.set_inflight_fd(self.inflight.fd, self.inflight.description)
        await self.set_features(self.features)
        await self.set_mem_table(self.memory)
        for queue in self.queues.values():
            await self._start_queue(queue, queue.driver.used_idx())
            queue.kick()
