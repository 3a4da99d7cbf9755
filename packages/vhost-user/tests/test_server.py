"""The trio server and the front-end over a real unix socket, memfd memory and eventfds."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from vhost_user import (
    BASE_PROTOCOL_FEATURES,
    FrontendError,
    ProtocolFeature,
    SharedMemory,
    VhostUserBackend,
    VhostUserFrontend,
    Vring,
    serve,
)
from vhost_user.messages import HEADER, U64, FrontendRequest
from virtio_queue import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, InvalidChain

RAM = 1 << 20


class PatternBackend(VhostUserBackend):
    """Fills each writable buffer with the queue index + 1; has a 8-byte config space."""

    num_queues = 2
    instances: list[PatternBackend] = []

    def __init__(self) -> None:
        self.kicks = 0
        self.resets = 0
        self.ran = False
        PatternBackend.instances.append(self)

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG)

    def get_config(self, offset: int, size: int) -> bytes:
        return b"CONFIG!!"[offset : offset + size]

    def handle_kick(self, index: int, vring: Vring) -> None:
        self.kicks += 1
        while True:
            try:
                chain = vring.pop()
            except InvalidChain as exc:
                vring.add_used(exc.head, 0)
                continue
            if chain is None:
                return
            writer = chain.writer()
            n = writer.write(bytes([index + 1]) * writer.remaining())
            vring.add_used(chain.head, n)

    def reset(self) -> None:
        self.resets += 1

    async def run(self) -> None:
        self.ran = True
        await trio.sleep_forever()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    path = str(tmp_path / "vu.sock")
    PatternBackend.instances.clear()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(PatternBackend, socket_path=path, task_status=task_status)
        )
        yield path
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


async def bring_up(path: str, memory: SharedMemory) -> VhostUserFrontend:
    frontend = await VhostUserFrontend.connect(path)
    _offered, offered_protocol = await frontend.negotiate()
    assert offered_protocol == BASE_PROTOCOL_FEATURES | ProtocolFeature.CONFIG
    assert await frontend.get_queue_num() == 2
    await frontend.setup_inflight(2, 16)
    frontend.add_queue(0, memory, 0x1000, 16)
    frontend.add_queue(1, memory, 0x3000, 16)
    await frontend.start([memory])
    return frontend


async def test_frontend_drives_backend_over_a_socket(server: str) -> None:
    memory = SharedMemory(RAM)
    frontend = await bring_up(server, memory)
    try:
        with trio.fail_after(5):
            assert await frontend.get_config(2, 4) == b"NFIG"
            for index, queue in frontend.queues.items():
                heads = [
                    queue.driver.add_chain([(0x10000 + index * 0x1000 + i * 64, 64, True)])
                    for i in range(10)
                ]
                queue.submit()
                used = await queue.wait_used(10)
                assert sorted(u.id for u in used) == sorted(heads)
                assert all(u.len == 64 for u in used)
                data = bytes(memory.memory.slice(0x10000 + index * 0x1000, 640))
                assert data == bytes([index + 1]) * 640
            # A second batch on a warm queue, many chains per kick.
            queue = frontend.queues[0]
            for i in range(16):
                queue.driver.add_chain([(0x20000 + i * 16, 16, True)])
            queue.submit()
            assert len(await queue.wait_used(16)) == 16
            assert await frontend.get_vring_base(0) == 26
            assert await frontend.get_status() == 0
            backend = PatternBackend.instances[-1]
            assert backend.ran
    finally:
        await frontend.aclose()
        frontend.close_resources()
        memory.close()


async def test_next_frontend_is_served_after_one_goes(server: str) -> None:
    memory = SharedMemory(RAM)
    try:
        for round_ in range(2):
            frontend = await bring_up(server, memory)
            with trio.fail_after(5):
                queue = frontend.queues[1]
                queue.driver.add_chain([(0x10000, 8, True)])
                queue.submit()
                assert [u.len for u in await queue.wait_used(1)] == [8]
            await frontend.aclose()
            frontend.close_resources()
            await trio.sleep(0.05)
            assert PatternBackend.instances[round_].resets == 1  # reset after the disconnect
    finally:
        memory.close()


async def raw_connect(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return sock


async def read_all(sock: trio.socket.SocketType) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await sock.recv(4096):
            data += chunk
    return data


async def test_oversized_message_closes_connection_but_not_server(server: str) -> None:
    sock = await raw_connect(server)
    await sock.send(HEADER.pack(FrontendRequest.SET_MEM_TABLE, 1, 1 << 20))
    assert await read_all(sock) == b""  # closed, no reply
    sock.close()
    frontend = await VhostUserFrontend.connect(server)
    assert await frontend.get_features() & (1 << VIRTIO_F_VERSION_1)
    await frontend.aclose()


async def test_fatal_error_sends_the_error_ack_first(server: str) -> None:
    sock = await raw_connect(server)
    await sock.send(
        HEADER.pack(FrontendRequest.SET_PROTOCOL_FEATURES, 1, 8)
        + U64.pack(int(ProtocolFeature.REPLY_ACK))
    )
    await sock.send(HEADER.pack(FrontendRequest.SET_FEATURES, 1 | 8, 8) + U64.pack(1 << 7))
    data = await read_all(sock)
    assert data == HEADER.pack(FrontendRequest.SET_FEATURES, 5, 8) + U64.pack(1)
    sock.close()


async def test_refused_request_keeps_the_connection(server: str) -> None:
    frontend = await VhostUserFrontend.connect(server)
    await frontend.negotiate()
    with pytest.raises(FrontendError, match="refused SET_VRING_NUM"):
        await frontend.set_vring_num(5, 8)
    with pytest.raises(FrontendError, match="GET_CONFIG failed"):
        await frontend.get_config(4, 8)  # past the end of the 8-byte config space
    assert await frontend.get_max_mem_slots() == 32
    await frontend.aclose()


async def test_too_many_fds_close_the_connection(server: str) -> None:
    sock = await raw_connect(server)
    fds = [os.eventfd(0) for _ in range(20)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        await sock.sendmsg([HEADER.pack(FrontendRequest.SET_OWNER, 1, 0)], anc)
        assert await read_all(sock) == b""
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


async def test_listen_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.detach()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(PatternBackend, listen_fd=fd, task_status=task_status)
        )
        frontend = await VhostUserFrontend.connect(path)
        assert await frontend.get_features() & (1 << VIRTIO_F_VERSION_1)
        await frontend.aclose()
        nursery.cancel_scope.cancel()


async def test_socket_path_and_listen_fd_are_exclusive() -> None:
    with pytest.raises(ValueError):
        await serve(PatternBackend)


class BrokenBackend(PatternBackend):
    """A device with bugs: its first instance cannot even say its features."""

    def features(self) -> int:
        if len(PatternBackend.instances) == 1:
            raise RuntimeError("device bug in features()")
        return super().features()

    def handle_kick(self, index: int, vring: Vring) -> None:
        raise RuntimeError("device bug in handle_kick()")


async def test_device_bugs_do_not_take_the_server_down(tmp_path: Path) -> None:
    path = str(tmp_path / "broken.sock")
    PatternBackend.instances.clear()
    memory = SharedMemory(RAM)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(BrokenBackend, socket_path=path, task_status=task_status)
        )
        with trio.fail_after(5):
            sock = await raw_connect(path)
            assert await read_all(sock) == b""  # the connection failed, not the server
            sock.close()
            frontend = await VhostUserFrontend.connect(path)
            await frontend.negotiate()
            queue = frontend.add_queue(0, memory, 0x1000, 8)
            await frontend.start([memory])
            queue.driver.add_chain([(0x10000, 8, True)])
            queue.submit()
            await trio.sleep(0.05)
            # The queue stopped; the connection still answers.
            assert await frontend.get_vring_base(0) == 0
            assert await frontend.get_features()
            await frontend.aclose()
        frontend.close_resources()
        memory.close()
        nursery.cancel_scope.cancel()
