"""INFLIGHT_SHMFD bookkeeping: the area's layout, crash recovery and resubmission order."""

from __future__ import annotations

import mmap
import os

from hypothesis import given
from hypothesis import strategies as st
from vhost_user import BackendConnection, QueueStarted, VhostUserBackend, Vring
from vhost_user.inflight import (
    DESC_STATE_SPLIT,
    QUEUE_REGION_SPLIT,
    InflightArea,
    InflightQueue,
    allocate_inflight_fd,
    queue_region_size,
)
from vhost_user.messages import (
    HEADER,
    U64,
    FrontendRequest,
    ProtocolFeature,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostVringAddr,
    VhostVringState,
)
from virtio_queue import VIRTIO_F_VERSION_1, DriverQueue, GuestMemory, MemoryRegion, QueueLayout

R = FrontendRequest


def test_layout_sizes() -> None:
    assert QUEUE_REGION_SPLIT.size == 16
    assert DESC_STATE_SPLIT.size == 16
    # libvhost-user's stride: align_up(16 * size + 2, 64)
    assert queue_region_size(128) == 2112
    assert queue_region_size(1) == 64
    for size in (1, 2, 4, 256, 1024):
        assert queue_region_size(size) >= 16 + 16 * size


def make_tracker(size: int = 8) -> InflightQueue:
    return InflightQueue(memoryview(bytearray(queue_region_size(size))), size)


def test_begin_and_complete_update_the_shared_fields() -> None:
    t = make_tracker()
    t.initialise(used_idx=5)
    assert t.header.version == 1 and t.header.desc_num == 8 and t.header.used_idx == 5
    t.begin(3)
    t.begin(6)
    assert t.desc_state(3).inflight == 1 and t.desc_state(6).counter == 1
    t.before_used(6)
    t.after_used(6, 6)
    assert t.desc_state(6).inflight == 0
    assert t.header.last_batch_head == 6 and t.header.used_idx == 6
    assert t.recover(6) == [3]


def test_recover_repairs_a_batch_published_but_not_cleared() -> None:
    t = make_tracker()
    t.initialise(0)
    for head in (4, 1, 2):
        t.begin(head)
    # Crash after the used idx moved for heads 4 and 1 but before they were cleared.
    t.before_used(4)
    t.before_used(1)
    assert t.recover(2) == [2]
    assert t.header.used_idx == 2
    assert t.counter == 3  # new pops are ordered after the resubmitted ones


def test_recover_keeps_fetch_order() -> None:
    t = make_tracker()
    t.initialise(0)
    for head in (7, 0, 5, 3):
        t.begin(head)
    t.before_used(0)
    t.after_used(0, 1)
    assert t.recover(1) == [7, 5, 3]


ops = st.lists(st.tuples(st.sampled_from(["pop", "done", "crash"]), st.integers(0, 7)), max_size=40)


@given(ops)
def test_recover_matches_a_model(operations: list[tuple[str, int]]) -> None:
    """Whatever happened before the crash, recovery yields exactly the heads still in flight,
    in the order they were taken."""
    t = make_tracker()
    t.initialise(0)
    free = list(range(8))
    in_flight: list[int] = []
    used_idx = 0
    for op, pick in operations:
        if op == "pop" and free:
            head = free.pop(pick % len(free))
            t.begin(head)
            in_flight.append(head)
        elif op in ("done", "crash") and in_flight:
            head = in_flight.pop(pick % len(in_flight))
            t.before_used(head)
            used_idx = (used_idx + 1) & 0xFFFF  # the used ring's idx moved
            if op == "crash":
                break  # died before clearing the entry
            t.after_used(head, used_idx)
            free.append(head)
    assert t.recover(used_idx) == in_flight


def test_allocated_area_maps_and_serves_queues() -> None:
    fd, size = allocate_inflight_fd(2, 16)
    try:
        assert os.fstat(fd).st_size == size == 2 * queue_region_size(16)
        area = InflightArea(fd, size, 0, 2, 16)
        q0 = area.queue(0, 16)
        q1 = area.queue(1, 8)
        assert q0 is not None and q1 is not None
        assert area.queue(2, 16) is None and area.queue(0, 32) is None
        q1.initialise(0)
        q1.begin(7)
        raw = mmap.mmap(fd, size)
        base = queue_region_size(16)
        assert raw[base + 8] == 1  # version, little end of the u16
        assert raw[base + 16 + 16 * 7] == 1  # desc[7].inflight
        raw.close()
        area.close()
    finally:
        os.close(fd)


class Holder(VhostUserBackend):
    num_queues = 1

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def handle_kick(self, index: int, vring: Vring) -> None:
        raise AssertionError("driven by hand")


RAM = 0x10_0000
USER = 0x7F00_0000_0000


def connect(
    ram_fd: int, inflight: tuple[int, VhostUserInflight] | None
) -> tuple[BackendConnection, Vring, int]:
    """Bring a queue up on a fresh connection; returns it, its vring and the inflight fd."""
    conn = BackendConnection(Holder())
    protocol = int(ProtocolFeature.INFLIGHT_SHMFD | ProtocolFeature.REPLY_ACK)

    def send(code: int, payload: bytes, fds: list[int] | None = None) -> list[object]:
        events = conn.receive_data(HEADER.pack(code, 1, len(payload)) + payload, fds or [])
        return list(events)

    send(R.SET_PROTOCOL_FEATURES, U64.pack(protocol))
    if inflight is None:
        (reply,) = send(R.GET_INFLIGHT_FD, VhostUserInflight(0, 0, 1, 8).pack())
        fd = reply.fds[0]  # type: ignore[attr-defined]
        description = VhostUserInflight.unpack(reply.data[12:])  # type: ignore[attr-defined]
    else:
        fd, description = inflight
    send(R.SET_INFLIGHT_FD, description.pack(), [os.dup(fd)])
    send(R.SET_FEATURES, U64.pack(1 << VIRTIO_F_VERSION_1))
    table = VhostUserMemory((VhostUserMemoryRegion(0, RAM, USER, 0),)).pack()
    send(R.SET_MEM_TABLE, table, [os.dup(ram_fd)])
    layout = QueueLayout.at(0x1000, 8)
    send(R.SET_VRING_NUM, VhostVringState(0, 8).pack())
    send(R.SET_VRING_BASE, VhostVringState(0, 0).pack())  # as QEMU after a crash: unknown
    addr = VhostVringAddr(
        0, 0, USER + layout.desc_addr, USER + layout.used_addr, USER + layout.avail_addr, 0
    )
    send(R.SET_VRING_ADDR, addr.pack())
    events = send(R.SET_VRING_KICK, U64.pack(0), [os.eventfd(0)])
    (started,) = [e for e in events if isinstance(e, QueueStarted)]
    return conn, started.vring, fd


def test_reconnection_resubmits_in_flight_chains_first() -> None:
    ram_fd = os.memfd_create("ram")
    os.ftruncate(ram_fd, RAM)
    memory = GuestMemory([MemoryRegion.from_fd(ram_fd, 0, RAM, USER, 0)])
    driver = DriverQueue(memory, QueueLayout.at(0x1000, 8))
    heads = [driver.add_chain([(0x8000 + i * 16, 16, True)]) for i in range(5)]
    driver.publish()

    conn, vring, inflight_fd = connect(ram_fd, None)
    popped = []
    while (chain := vring.pop()) is not None:
        popped.append(chain.head)
    assert popped == heads
    vring.add_used(heads[1], 16)
    vring.add_used(heads[3], 16)
    description = VhostUserInflight(queue_region_size(8), 0, 1, 8)
    del vring, chain
    conn.close()  # the back-end "dies"; the front-end keeps the inflight fd

    driver.add_chain([(0x9000, 16, True)])
    driver.publish()
    conn2, vring2, _ = connect(ram_fd, (inflight_fd, description))
    assert vring2.resubmit_pending == 3
    assert vring2.queue.next_avail == 5  # used idx 2 + 3 in flight, not the base of 0
    again = []
    while (chain := vring2.pop()) is not None:
        again.append(chain.head)
    assert again == [heads[0], heads[2], heads[4], 5]
    del vring2, chain
    conn2.close()
    memory.close()
    os.close(ram_fd)
    os.close(inflight_fd)
