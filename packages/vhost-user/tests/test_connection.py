"""Every request through the sans-IO core, good and malformed (no sockets)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import pytest
from vhost_user import (
    BASE_PROTOCOL_FEATURES,
    BackendConnection,
    Event,
    ProtocolError,
    ProtocolFeature,
    QueueStarted,
    QueueStopped,
    RequestError,
    SendMessage,
    VhostUserBackend,
    Vring,
)
from vhost_user.connection import MAX_MEM_SLOTS, RULES
from vhost_user.messages import (
    HEADER,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    Header,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostVringAddr,
    VhostVringState,
)
from virtio_queue import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    DriverQueue,
    GuestMemory,
    MemoryRegion,
    QueueLayout,
)

R = FrontendRequest
PF = 1 << VHOST_USER_F_PROTOCOL_FEATURES
DEVICE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
ALL_PROTOCOL = BASE_PROTOCOL_FEATURES | ProtocolFeature.CONFIG
RAM_SIZE = 1 << 20
USER_BASE = 0x7F00_0000_0000
QUEUE_GPA = 0x1000
QUEUE_SIZE = 8


class RecordingBackend(VhostUserBackend):
    """Two queues; fills writable buffers with 0x5A; records what the core told it."""

    num_queues = 2
    max_queue_size = 256

    def __init__(self) -> None:
        self.config = bytearray(range(16))
        self.calls: list[tuple[str, int]] = []
        self.acked = -1

    def features(self) -> int:
        return DEVICE_FEATURES

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG | ProtocolFeature.LOG_SHMFD)  # LOG_SHMFD is dropped

    def set_features(self, features: int) -> None:
        self.acked = features

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise RequestError("outside config space")
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.config):
            raise ValueError("a device bug")
        self.config[offset : offset + len(data)] = data

    def queue_started(self, index: int, vring: Vring) -> None:
        self.calls.append(("started", index))

    def queue_stopped(self, index: int, vring: Vring) -> None:
        self.calls.append(("stopped", index))

    def handle_kick(self, index: int, vring: Vring) -> None:
        while (chain := vring.pop()) is not None:
            writer = chain.writer()
            n = writer.write(b"\x5a" * writer.remaining())
            vring.add_used(chain.head, n)

    def reset(self) -> None:
        self.calls.append(("reset", -1))


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


class Peer:
    """Plays the front-end against a BackendConnection, in memory."""

    def __init__(self) -> None:
        self.backend = RecordingBackend()
        self.conn = BackendConnection(self.backend)
        self.ram_fd = os.memfd_create("ram")
        os.ftruncate(self.ram_fd, RAM_SIZE)
        region = MemoryRegion.from_fd(self.ram_fd, 0, RAM_SIZE, USER_BASE, 0)
        self.memory = GuestMemory([region])
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def close(self) -> None:
        self.conn.close()
        self.memory.close()
        for fd in (self.ram_fd, self.kick, self.call):
            os.close(fd)

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> list[Event]:
        if flags is None:
            flags = 1 | (8 if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        return self.conn.receive_data(data, [os.dup(fd) for fd in fds])

    def reply(self, events: list[Event], request: int) -> SendMessage:
        replies = [e for e in events if isinstance(e, SendMessage)]
        assert len(replies) == 1, events
        header = Header.unpack(replies[0].data)
        assert header.request == request and header.flags == 1 | 4
        assert header.size == len(replies[0].data) - 12
        return replies[0]

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with need_reply and return the u64 status."""
        events = self.send(request, payload, fds, need_reply=True)
        value: int = U64.unpack(self.reply(events, request).data[12:])[0]
        return value

    def u64(self, request: int) -> int:
        value: int = U64.unpack(self.reply(self.send(request), request).data[12:])[0]
        return value

    def negotiate(
        self, protocol: int = int(ALL_PROTOCOL), features: int = DEVICE_FEATURES | PF
    ) -> None:
        assert self.send(R.SET_PROTOCOL_FEATURES, U64.pack(protocol)) == []
        assert self.send(R.SET_FEATURES, U64.pack(features)) == []

    def table(self) -> bytes:
        return VhostUserMemory((VhostUserMemoryRegion(0, RAM_SIZE, USER_BASE, 0),)).pack()

    def addr(self, index: int = 0, layout: QueueLayout | None = None) -> bytes:
        layout = layout or QueueLayout.at(QUEUE_GPA, QUEUE_SIZE)
        return VhostVringAddr(
            index,
            0,
            USER_BASE + layout.desc_addr,
            USER_BASE + layout.used_addr,
            USER_BASE + layout.avail_addr,
            0,
        ).pack()

    def setup_ring(self, index: int = 0) -> tuple[DriverQueue, list[Event]]:
        """Memory, NUM, BASE, ADDR, CALL, KICK: returns the driver and KICK's events."""
        layout = QueueLayout.at(QUEUE_GPA + index * 0x1000, QUEUE_SIZE)
        driver = DriverQueue(self.memory, layout)
        if not self.conn.memory.regions:
            assert self.ack(R.SET_MEM_TABLE, self.table(), [self.ram_fd]) == 0
        assert self.ack(R.SET_VRING_NUM, VhostVringState(index, QUEUE_SIZE).pack()) == 0
        assert self.ack(R.SET_VRING_BASE, VhostVringState(index, 0).pack()) == 0
        assert self.ack(R.SET_VRING_ADDR, self.addr(index, layout)) == 0
        assert self.ack(R.SET_VRING_CALL, U64.pack(index), [self.call]) == 0
        # A new call fd is signalled once on arrival (a notification racing the swap is
        # never lost); take that signal so the tests below count only their own.
        assert os.eventfd_read(self.call) == 1
        events = self.send(R.SET_VRING_KICK, U64.pack(index), [self.kick], need_reply=True)
        assert U64.unpack(self.reply(events, R.SET_VRING_KICK).data[12:]) == (0,)
        return driver, events


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def error_ack(peer: Peer, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
    assert peer.ack(request, payload, fds) == 1


# -- the rule table -------------------------------------------------------------------------
def test_every_request_the_issue_lists_has_a_rule() -> None:
    listed = (
        "GET_FEATURES SET_FEATURES GET_PROTOCOL_FEATURES SET_PROTOCOL_FEATURES SET_OWNER "
        "RESET_OWNER SET_MEM_TABLE GET_MAX_MEM_SLOTS ADD_MEM_REG REM_MEM_REG SET_VRING_NUM "
        "SET_VRING_ADDR SET_VRING_BASE GET_VRING_BASE SET_VRING_KICK SET_VRING_CALL "
        "SET_VRING_ERR SET_VRING_ENABLE GET_QUEUE_NUM GET_CONFIG SET_CONFIG GET_INFLIGHT_FD "
        "SET_INFLIGHT_FD SET_STATUS GET_STATUS RESET_DEVICE"
    )
    assert {FrontendRequest[name] for name in listed.split(" ")} == set(RULES)


# -- features and ownership -------------------------------------------------------------------
def test_get_features_offers_device_bits_and_protocol_features(peer: Peer) -> None:
    assert peer.u64(R.GET_FEATURES) == DEVICE_FEATURES | PF


def test_get_protocol_features_offers_only_what_works(peer: Peer) -> None:
    offered = peer.u64(R.GET_PROTOCOL_FEATURES)
    assert offered == int(ALL_PROTOCOL)
    assert not offered & ProtocolFeature.LOG_SHMFD


def test_set_features_passes_them_to_the_device(peer: Peer) -> None:
    peer.negotiate()
    assert peer.backend.acked == DEVICE_FEATURES | PF
    assert peer.ack(R.SET_FEATURES, U64.pack(DEVICE_FEATURES)) == 0
    assert peer.backend.acked == DEVICE_FEATURES


def test_set_features_not_offered_closes_with_an_error_ack(peer: Peer) -> None:
    peer.negotiate()
    with pytest.raises(ProtocolError) as info:
        peer.send(R.SET_FEATURES, U64.pack(1 << 5), need_reply=True)
    assert info.value.reply is not None
    assert Header.unpack(info.value.reply).flags == 5
    assert U64.unpack(info.value.reply[12:]) == (1,)


def test_set_protocol_features_not_offered_closes(peer: Peer) -> None:
    with pytest.raises(ProtocolError):
        peer.send(R.SET_PROTOCOL_FEATURES, U64.pack(int(ProtocolFeature.LOG_SHMFD)))


def test_set_features_bad_size_is_refused(peer: Peer) -> None:
    peer.negotiate()
    error_ack(peer, R.SET_FEATURES, b"\0" * 4)
    assert peer.backend.acked == DEVICE_FEATURES | PF


def test_get_features_with_a_payload_closes(peer: Peer) -> None:
    with pytest.raises(ProtocolError):
        peer.send(R.GET_FEATURES, b"\0" * 8)


def test_set_owner_once(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_OWNER) == 0
    error_ack(peer, R.SET_OWNER)
    # Without need_reply a refusal is silent.
    assert peer.send(R.SET_OWNER) == []


def test_no_ack_without_reply_ack_negotiated(peer: Peer) -> None:
    peer.negotiate(protocol=int(ProtocolFeature.MQ))
    assert peer.send(R.SET_OWNER, need_reply=True) == []


def test_get_queue_num_and_max_mem_slots(peer: Peer) -> None:
    peer.negotiate()
    assert peer.u64(R.GET_QUEUE_NUM) == 2
    assert peer.u64(R.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS


def test_gated_requests_need_their_protocol_feature(peer: Peer) -> None:
    peer.negotiate(protocol=int(ProtocolFeature.REPLY_ACK))
    with pytest.raises(ProtocolError):
        peer.send(R.GET_QUEUE_NUM)
    error_ack(peer, R.SET_STATUS, U64.pack(1))
    error_ack(peer, R.RESET_DEVICE)
    # GET_CONFIG's error form is a reply with no payload.
    events = peer.send(R.GET_CONFIG, VhostUserConfig(0, 4, 0, bytes(4)).pack())
    assert peer.reply(events, R.GET_CONFIG).data[12:] == b""


def test_reply_header_version_and_reply_bits_are_checked(peer: Peer) -> None:
    with pytest.raises(ProtocolError):
        peer.send(R.GET_FEATURES, flags=2)
    with pytest.raises(ProtocolError):
        peer.send(R.GET_FEATURES, flags=1 | 4)


def test_unknown_and_unsupported_requests(peer: Peer) -> None:
    peer.negotiate()
    error_ack(peer, 99)
    error_ack(peer, R.SET_LOG_BASE, U64.pack(0))
    assert peer.send(99, b"junk") == []
    # Still usable afterwards.
    assert peer.u64(R.GET_QUEUE_NUM) == 2


def test_unexpected_fds_are_refused_and_closed(peer: Peer) -> None:
    peer.negotiate()
    r, w = os.pipe()
    events = peer.conn.receive_data(HEADER.pack(R.SET_OWNER, 9, 0), [r])
    assert U64.unpack(peer.reply(events, R.SET_OWNER).data[12:]) == (1,)
    assert is_closed(r)
    os.close(w)


# -- memory -----------------------------------------------------------------------------------
def test_set_mem_table_maps_shared_memory(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_MEM_TABLE, peer.table(), [peer.ram_fd]) == 0
    peer.memory.slice(0x100, 4)[:] = b"ping"
    assert bytes(peer.conn.memory.slice(0x100, 4)) == b"ping"
    assert peer.conn.memory.user_to_guest(USER_BASE + 0x100) == 0x100


def test_set_mem_table_replaces_the_old_table(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_MEM_TABLE, peer.table(), [peer.ram_fd]) == 0
    half = VhostUserMemory((VhostUserMemoryRegion(0x10_0000, RAM_SIZE // 2, USER_BASE, 0),))
    assert peer.ack(R.SET_MEM_TABLE, half.pack(), [peer.ram_fd]) == 0
    assert [r.guest_phys_addr for r in peer.conn.memory.regions] == [0x10_0000]


@pytest.mark.parametrize(
    ("regions", "nfds"),
    [
        ([(0, RAM_SIZE, USER_BASE, 0)], 0),  # missing fd
        ([(0, RAM_SIZE, USER_BASE, 0)], 2),  # one fd too many
        ([(0, RAM_SIZE, USER_BASE, 0), (0x8_0000, 0x1000, USER_BASE + RAM_SIZE, 0)], 2),  # GPA
        ([(0, 0x1000, USER_BASE, 0), (0x10_0000, 0x1000, USER_BASE, 0)], 2),  # user overlap
        ([(0, RAM_SIZE * 4, USER_BASE, RAM_SIZE * 8)], 1),  # beyond the fd: still maps, but
    ],
)
def test_set_mem_table_refusals(
    peer: Peer, regions: list[tuple[int, int, int, int]], nfds: int
) -> None:
    peer.negotiate()
    table = VhostUserMemory(tuple(VhostUserMemoryRegion(*r) for r in regions)).pack()
    error_ack(peer, R.SET_MEM_TABLE, table, [peer.ram_fd] * nfds)
    assert peer.conn.memory.regions == ()


def test_set_mem_table_unmappable_fd(peer: Peer) -> None:
    peer.negotiate()
    r, w = os.pipe()
    try:
        error_ack(peer, R.SET_MEM_TABLE, peer.table(), [r])
    finally:
        os.close(r)
        os.close(w)


def test_set_mem_table_malformed_payload(peer: Peer) -> None:
    peer.negotiate()
    error_ack(peer, R.SET_MEM_TABLE, struct.pack("=II", 0, 0), [])
    error_ack(peer, R.SET_MEM_TABLE, b"\1", [])


def test_add_and_remove_memory_regions(peer: Peer) -> None:
    peer.negotiate()
    low = VhostUserMemRegMsg.of(VhostUserMemoryRegion(0, 0x8_0000, USER_BASE, 0)).pack()
    high = VhostUserMemRegMsg.of(
        VhostUserMemoryRegion(0x8_0000, 0x8_0000, USER_BASE + 0x8_0000, 0x8_0000)
    ).pack()
    assert peer.ack(R.ADD_MEM_REG, low, [peer.ram_fd]) == 0
    assert peer.ack(R.ADD_MEM_REG, high, [peer.ram_fd]) == 0
    error_ack(peer, R.ADD_MEM_REG, low, [peer.ram_fd])  # overlaps
    error_ack(peer, R.ADD_MEM_REG, low, [])  # no fd
    peer.memory.slice(0x8_0010, 2)[:] = b"hi"
    assert bytes(peer.conn.memory.slice(0x8_0010, 2)) == b"hi"
    assert peer.ack(R.REM_MEM_REG, low, [peer.ram_fd]) == 0  # an fd is tolerated
    error_ack(peer, R.REM_MEM_REG, low)  # already gone
    assert [r.guest_phys_addr for r in peer.conn.memory.regions] == [0x8_0000]
    error_ack(peer, R.ADD_MEM_REG, low[:-1], [peer.ram_fd])  # bad size


def test_add_mem_reg_slots_run_out(peer: Peer) -> None:
    peer.negotiate()
    for i in range(MAX_MEM_SLOTS):
        reg = VhostUserMemoryRegion(i * 0x1000, 0x1000, USER_BASE + i * 0x1000, i * 0x1000)
        assert peer.ack(R.ADD_MEM_REG, VhostUserMemRegMsg.of(reg).pack(), [peer.ram_fd]) == 0
    reg = VhostUserMemoryRegion(0x10_0000, 0x1000, USER_BASE + 0x10_0000, 0)
    error_ack(peer, R.ADD_MEM_REG, VhostUserMemRegMsg.of(reg).pack(), [peer.ram_fd])


# -- vrings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num", [0, 3, 512, 1 << 20])
def test_set_vring_num_refuses_bad_sizes(peer: Peer, num: int) -> None:
    peer.negotiate()
    error_ack(peer, R.SET_VRING_NUM, VhostVringState(0, num).pack())


@pytest.mark.parametrize(
    "request_code", [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ENABLE, R.SET_VRING_ADDR]
)
def test_vring_index_out_of_range(peer: Peer, request_code: R) -> None:
    peer.negotiate()
    payload = (
        peer.addr(index=2) if request_code is R.SET_VRING_ADDR else VhostVringState(2, 1).pack()
    )
    error_ack(peer, request_code, payload)


def test_vring_fd_requests_check_index_and_reserved_bits(peer: Peer) -> None:
    peer.negotiate()
    error_ack(peer, R.SET_VRING_CALL, U64.pack(2), [peer.call])
    error_ack(peer, R.SET_VRING_CALL, U64.pack(1 << 9), [peer.call])
    error_ack(peer, R.SET_VRING_KICK, U64.pack(0))  # fd missing
    error_ack(peer, R.SET_VRING_KICK, U64.pack(0x100))  # polling: not supported
    error_ack(peer, R.SET_VRING_CALL, U64.pack(0x100), [peer.call])  # no-fd bit but an fd


def test_get_vring_base_out_of_range_closes(peer: Peer) -> None:
    peer.negotiate()
    with pytest.raises(ProtocolError):
        peer.send(R.GET_VRING_BASE, VhostVringState(7, 0).pack())


def test_set_vring_addr_must_be_in_memory(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_MEM_TABLE, peer.table(), [peer.ram_fd]) == 0
    bad = VhostVringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0).pack()
    error_ack(peer, R.SET_VRING_ADDR, bad)


def test_set_vring_base_range(peer: Peer) -> None:
    peer.negotiate()
    error_ack(peer, R.SET_VRING_BASE, VhostVringState(0, 0x1_0000).pack())
    assert peer.ack(R.SET_VRING_BASE, VhostVringState(0, 0xFFFF).pack()) == 0


def test_kick_starts_ring_disabled_until_enabled(peer: Peer) -> None:
    peer.negotiate()
    _driver, events = peer.setup_ring()
    assert not any(isinstance(e, QueueStarted) for e in events)
    assert peer.backend.calls == []
    events = peer.send(R.SET_VRING_ENABLE, VhostVringState(0, 1).pack())
    (started,) = events
    assert isinstance(started, QueueStarted) and started.vring.index == 0
    assert peer.backend.calls == [("started", 0)]
    error_ack(peer, R.SET_VRING_ENABLE, VhostVringState(0, 2).pack())
    events = peer.send(R.SET_VRING_ENABLE, VhostVringState(0, 0).pack())
    assert [type(e) for e in events] == [QueueStopped]
    assert peer.backend.calls[-1] == ("stopped", 0)


def test_ring_starts_enabled_without_protocol_features(peer: Peer) -> None:
    peer.negotiate(features=DEVICE_FEATURES)
    _driver, events = peer.setup_ring()
    assert [type(e) for e in events] == [QueueStarted, SendMessage]


def test_kick_before_memory_is_refused(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_VRING_NUM, VhostVringState(0, 8).pack()) == 0
    error_ack(peer, R.SET_VRING_KICK, U64.pack(0), [peer.kick])


def test_started_ring_refuses_num_base_and_moving(peer: Peer) -> None:
    peer.negotiate()
    peer.setup_ring()
    error_ack(peer, R.SET_VRING_NUM, VhostVringState(0, 8).pack())
    error_ack(peer, R.SET_VRING_BASE, VhostVringState(0, 0).pack())
    moved = QueueLayout.at(0x8000, QUEUE_SIZE)
    error_ack(peer, R.SET_VRING_ADDR, peer.addr(0, moved))
    assert peer.ack(R.SET_VRING_ADDR, peer.addr(0)) == 0  # same rings: fine


def test_data_path_and_get_vring_base(peer: Peer) -> None:
    peer.negotiate()
    driver, _ = peer.setup_ring()
    (started,) = peer.send(R.SET_VRING_ENABLE, VhostVringState(0, 1).pack())
    assert isinstance(started, QueueStarted)
    vring = started.vring
    for _ in range(3):
        driver.add_chain([(0x8000, 16, True)])
    driver.publish()
    peer.backend.handle_kick(0, vring)
    vring.notify()
    assert os.eventfd_read(peer.call) == 1
    used = driver.get_used()
    assert [(u.len) for u in used] == [16, 16, 16]
    assert bytes(peer.memory.slice(0x8000, 16)) == b"\x5a" * 16
    events = peer.send(R.GET_VRING_BASE, VhostVringState(0, 0).pack())
    assert isinstance(events[0], QueueStopped)
    assert VhostVringState.unpack(peer.reply(events, R.GET_VRING_BASE).data[12:]) == (
        VhostVringState(0, 3)
    )
    # Stopped: kick and call fds were dropped; NUM and BASE are allowed again.
    assert peer.conn.rings[0].kick_fd == -1 and peer.conn.rings[0].call_fd == -1
    assert peer.ack(R.SET_VRING_BASE, VhostVringState(0, 3).pack()) == 0


def test_set_vring_call_swaps_the_fd_of_a_live_ring(peer: Peer) -> None:
    peer.negotiate()
    peer.setup_ring()
    (started,) = peer.send(R.SET_VRING_ENABLE, VhostVringState(0, 1).pack())
    assert isinstance(started, QueueStarted)
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert peer.ack(R.SET_VRING_CALL, U64.pack(0), [other]) == 0
        assert os.eventfd_read(other) == 1  # signalled once on arrival
        started.vring.notify()
        assert os.eventfd_read(other) == 1
        assert peer.ack(R.SET_VRING_CALL, U64.pack(0x100)) == 0
        assert started.vring.call_fd == -1
        started.vring.notify()  # polling front-end: nothing to signal, no error
    finally:
        os.close(other)


def test_set_vring_err_with_and_without_fd(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_VRING_ERR, U64.pack(1), [peer.call]) == 0
    assert peer.conn.rings[1].err_fd >= 0
    assert peer.ack(R.SET_VRING_ERR, U64.pack(1 | 0x100)) == 0
    assert peer.conn.rings[1].err_fd == -1


def test_new_kick_fd_restarts_a_live_ring(peer: Peer) -> None:
    peer.negotiate(features=DEVICE_FEATURES)
    peer.setup_ring()
    events = peer.send(R.SET_VRING_KICK, U64.pack(0), [peer.kick])
    assert [type(e) for e in events] == [QueueStopped, QueueStarted]


def test_reset_owner_disables_rings(peer: Peer) -> None:
    peer.negotiate(features=DEVICE_FEATURES)
    peer.setup_ring()
    events = peer.send(R.RESET_OWNER)
    assert [type(e) for e in events] == [QueueStopped]


def test_memory_remap_rebuilds_live_rings(peer: Peer) -> None:
    peer.negotiate(features=DEVICE_FEATURES)
    driver, events = peer.setup_ring()
    vring = next(e.vring for e in events if isinstance(e, QueueStarted))
    old_queue = vring.queue
    assert peer.ack(R.SET_MEM_TABLE, peer.table(), [peer.ram_fd]) == 0
    assert vring.queue is not old_queue
    driver.add_chain([(0x8000, 4, True)])
    driver.publish()
    peer.backend.handle_kick(0, vring)
    assert [u.len for u in driver.get_used()] == [4]
    # A table without the rings stops the ring.
    far = VhostUserMemory((VhostUserMemoryRegion(0x100_0000, 0x1000, USER_BASE + RAM_SIZE, 0),))
    events = peer.send(R.SET_MEM_TABLE, far.pack(), [peer.ram_fd])
    assert [type(e) for e in events] == [QueueStopped]


# -- config, inflight, status, reset ------------------------------------------------------------
def test_get_config(peer: Peer) -> None:
    peer.negotiate()
    events = peer.send(R.GET_CONFIG, VhostUserConfig(4, 4, 0, bytes(4)).pack())
    reply = VhostUserConfig.unpack(peer.reply(events, R.GET_CONFIG).data[12:])
    assert reply == VhostUserConfig(4, 4, 0, bytes([4, 5, 6, 7]))


@pytest.mark.parametrize(
    "payload",
    [
        VhostUserConfig(12, 8, 0, bytes(8)).pack(),  # device refuses
        VhostUserConfig(0, 4, 0, bytes(4)).pack()[:-1],  # size mismatch
        b"\0" * 4,  # no header
    ],
)
def test_get_config_failures_reply_empty(peer: Peer, payload: bytes) -> None:
    peer.negotiate()
    events = peer.send(R.GET_CONFIG, payload)
    assert peer.reply(events, R.GET_CONFIG).data[12:] == b""


def test_set_config(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_CONFIG, VhostUserConfig(0, 2, 0, b"ab").pack()) == 0
    assert peer.backend.config[:2] == b"ab"
    # A device that raises something unexpected gets an error reply, not a crash.
    error_ack(peer, R.SET_CONFIG, VhostUserConfig(15, 2, 0, b"ab").pack())
    error_ack(peer, R.SET_CONFIG, b"\0" * 3)


def test_get_inflight_fd_returns_a_zeroed_shared_area(peer: Peer) -> None:
    peer.negotiate()
    events = peer.send(R.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 2, 8).pack())
    reply = peer.reply(events, R.GET_INFLIGHT_FD)
    description = VhostUserInflight.unpack(reply.data[12:])
    assert (description.num_queues, description.queue_size, description.mmap_offset) == (2, 8, 0)
    (fd,) = reply.fds
    try:
        assert os.fstat(fd).st_size == description.mmap_size >= 2 * (16 + 8 * 16)
        assert os.pread(fd, description.mmap_size, 0) == bytes(description.mmap_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("nq_qs", [(0, 8), (2, 3), (2, 0)])
def test_get_inflight_fd_bad_description_closes(peer: Peer, nq_qs: tuple[int, int]) -> None:
    peer.negotiate()
    with pytest.raises(ProtocolError):
        peer.send(R.GET_INFLIGHT_FD, VhostUserInflight(0, 0, *nq_qs).pack())


def test_set_inflight_fd_checks_fd_and_size(peer: Peer) -> None:
    peer.negotiate()
    fd = os.memfd_create("inflight")
    try:
        os.ftruncate(fd, 4096)
        good = VhostUserInflight(4096, 0, 2, 8).pack()
        assert peer.ack(R.SET_INFLIGHT_FD, good, [fd]) == 0
        assert peer.conn.inflight is not None
        error_ack(peer, R.SET_INFLIGHT_FD, good)  # no fd
        error_ack(peer, R.SET_INFLIGHT_FD, VhostUserInflight(64, 0, 2, 8).pack(), [fd])
        error_ack(peer, R.SET_INFLIGHT_FD, good[:10], [fd])
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        error_ack(peer, R.SET_INFLIGHT_FD, VhostUserInflight(4096, 0, 2, 8).pack(), [r])
    finally:
        os.close(r)
        os.close(w)


def test_status(peer: Peer) -> None:
    peer.negotiate()
    assert peer.ack(R.SET_STATUS, U64.pack(0x0F)) == 0
    assert peer.u64(R.GET_STATUS) == 0x0F
    error_ack(peer, R.SET_STATUS, b"")


def test_reset_device(peer: Peer) -> None:
    peer.negotiate()
    peer.setup_ring()
    peer.send(R.SET_VRING_ENABLE, VhostVringState(0, 1).pack())
    events = peer.send(R.RESET_DEVICE, need_reply=True)
    assert [type(e) for e in events] == [QueueStopped, SendMessage]
    assert peer.backend.calls[-2:] == [("stopped", 0), ("reset", -1)]
    assert peer.conn.acked_features == 0
    assert peer.conn.rings[0].size == 0 and peer.conn.rings[0].kick_fd == -1
    assert peer.conn.memory.regions  # memory belongs to the connection and stays


def test_close_releases_everything(peer: Peer) -> None:
    peer.negotiate(features=DEVICE_FEATURES)
    peer.setup_ring()
    kick = peer.conn.rings[0].kick_fd
    peer.conn.close()
    assert is_closed(kick)
    assert peer.conn.memory.regions == ()
    assert peer.backend.calls[-1] == ("stopped", 0)
    with pytest.raises(ProtocolError):
        peer.send(R.GET_FEATURES)
