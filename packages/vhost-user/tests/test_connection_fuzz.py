"""Random message streams into the sans-IO core: it only replies or raises ProtocolError."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhost_user import (
    BASE_PROTOCOL_FEATURES,
    BackendConnection,
    Event,
    ProtocolError,
    ProtocolFeature,
    QueueStarted,
    SendMessage,
    VhostUserBackend,
    Vring,
)
from vhost_user.messages import (
    HEADER,
    U64,
    FrontendRequest,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostVringAddr,
    VhostVringState,
)
from virtio_queue import VIRTIO_F_VERSION_1, VirtioQueueError

USER_BASE = 0x7F00_0000_0000
RAM = 0x2_0000


class FuzzBackend(VhostUserBackend):
    num_queues = 2

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG)

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def handle_kick(self, index: int, vring: Vring) -> None:
        while (chain := vring.pop()) is not None:
            vring.add_used(chain.head, 0)


small = st.integers(0, 3)
addrs = st.sampled_from([USER_BASE, USER_BASE + 0x1000, USER_BASE + 0x1800, 0, 1 << 63])
regions = st.builds(
    VhostUserMemoryRegion,
    st.sampled_from([0, 0x1_0000, 1 << 40]),
    st.sampled_from([0x1000, 0x1_0000, 0, 1 << 62]),
    st.sampled_from([USER_BASE, USER_BASE + 0x1_0000]),
    st.sampled_from([0, 0x1000, 0x123]),
)
payloads = st.one_of(
    st.binary(max_size=48),
    st.integers(0, 0x3FF).map(U64.pack),
    st.integers(0, (1 << 64) - 1).map(U64.pack),
    st.builds(VhostVringState, small, st.sampled_from([0, 1, 2, 3, 8, 0xFFFF, 1 << 20])).map(
        lambda s: s.pack()
    ),
    st.builds(VhostVringAddr, small, small, addrs, addrs, addrs, addrs).map(lambda a: a.pack()),
    st.lists(regions, min_size=1, max_size=3).map(lambda r: VhostUserMemory(tuple(r)).pack()),
    regions.map(lambda r: VhostUserMemRegMsg.of(r).pack()),
    st.builds(VhostUserConfig, small, st.just(4), small, st.just(bytes(4))).map(lambda c: c.pack()),
    st.builds(
        VhostUserInflight,
        st.sampled_from([0, 4096, 1 << 40]),
        st.sampled_from([0, 17]),
        st.integers(0, 3),
        st.sampled_from([0, 3, 8, 256]),
    ).map(lambda i: i.pack()),
)
codes = st.one_of(st.sampled_from(list(FrontendRequest)), st.integers(0, 64))
flags = st.sampled_from([1, 1 | 8, 0, 1 | 4, 0xFFFF_FFFF])
fd_kinds = st.lists(st.sampled_from(["mem", "event", "pipe"]), max_size=3)


@dataclass
class Step:
    code: int
    flags: int
    payload: bytes
    fds: list[str]


steps = st.builds(Step, codes, flags, payloads, fd_kinds)
# Negotiated, memory shared, ring 0 sized and placed: random streams then reach the ring
# states (a KICK with an eventfd starts it) instead of stopping at the first gate.
prelude = [
    Step(
        FrontendRequest.SET_PROTOCOL_FEATURES,
        1,
        U64.pack(int(BASE_PROTOCOL_FEATURES | ProtocolFeature.CONFIG)),
        [],
    ),
    Step(
        FrontendRequest.SET_MEM_TABLE,
        1,
        VhostUserMemory((VhostUserMemoryRegion(0, RAM, USER_BASE, 0),)).pack(),
        ["mem"],
    ),
    Step(FrontendRequest.SET_VRING_NUM, 1, VhostVringState(0, 8).pack(), []),
    Step(
        FrontendRequest.SET_VRING_ADDR,
        1,
        VhostVringAddr(0, 0, USER_BASE + 0x1000, USER_BASE + 0x1800, USER_BASE + 0x1400, 0).pack(),
        [],
    ),
]
kick_ring0 = Step(FrontendRequest.SET_VRING_KICK, 1, U64.pack(0), ["event"])
steps = st.one_of(steps, st.just(kick_ring0))


def still_open(created: list[tuple[int, int, int]]) -> list[int]:
    """The fds we handed to the core that are still open on the same file.

    Counting every fd of the process would be flaky: other tests' threads (NBD readers, I/O
    pools) open and close fds while this one runs.
    """
    leaked = []
    for fd, dev, ino in created:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            leaked.append(fd)
    return leaked


def make_fd(kind: str, mem_fd: int) -> int:
    if kind == "mem":
        return os.dup(mem_fd)
    if kind == "event":
        return os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    os.close(w)
    return r


def check_events(events: list[Event], request: bytes, backend: FuzzBackend) -> None:
    for event in events:
        if isinstance(event, SendMessage):
            assert event.data[:4] == request[:4]  # a reply to this request
            assert HEADER.unpack_from(event.data)[1] == 5
            for fd in event.fds:
                os.close(fd)
        elif isinstance(event, QueueStarted):
            # A garbage ring is the device's error (the server catches it), not the core's.
            with contextlib.suppress(VirtioQueueError):
                backend.handle_kick(event.vring.index, event.vring)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(steps, max_size=25))
def test_random_streams_only_reply_or_raise_protocol_error(
    negotiate: bool, stream: list[Step]
) -> None:
    mem_fd = os.memfd_create("fuzz-ram")
    os.ftruncate(mem_fd, RAM)
    created: list[tuple[int, int, int]] = []
    backend = FuzzBackend()
    conn = BackendConnection(backend)
    try:
        for step in (prelude if negotiate else []) + stream:
            data = HEADER.pack(step.code, step.flags, len(step.payload)) + step.payload
            fds = [make_fd(kind, mem_fd) for kind in step.fds]
            for fd in fds:
                st = os.fstat(fd)
                created.append((fd, st.st_dev, st.st_ino))
            try:
                events = conn.receive_data(data, fds)
            except ProtocolError:
                break
            check_events(events, data, backend)
            del events
    finally:
        conn.close()
        # Mappings still viewed by a dropped Vring are unmapped (and their fds closed) when the
        # views go: collect them before counting.
        del conn, backend
        gc.collect()
        leaked = still_open(created)
        os.close(mem_fd)
    assert not leaked, f"file descriptors leaked: {leaked}"
