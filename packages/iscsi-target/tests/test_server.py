"""The trio server over real TCP: log in, write, read back, log out; the connection cap."""

from __future__ import annotations

import os
import struct
import tempfile

import trio
from iscsi_fakes import BLOCK_SIZE, RamDiskTarget
from iscsi_initiator import Initiator
from iscsi_target.config import TargetConfig
from iscsi_target.server import IscsiServer
from scsi_core.status import Status
from scsi_core.target import Target
from scsi_emulation.backend import FileBackend
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.target import EmulatedTarget

IQN = "iqn.2024-01.org.example:tcp"


class StreamTransport:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> bytes:
        data: bytes = await self.stream.receive_some(1 << 18)
        if not data:
            raise EOFError("target closed the connection")
        return data


async def _start(nursery: trio.Nursery, target: Target, **kwargs: int) -> tuple[IscsiServer, int]:
    config = TargetConfig(iqn=IQN, block_sizes={0: BLOCK_SIZE})
    server = IscsiServer(target, config, **kwargs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await nursery.start(server.run, listeners)
    return server, port


async def _write_read_logout(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        initiator = Initiator(StreamTransport(stream))
        assert (await initiator.login(IQN)).status == 0
        # The first command may meet the POWER ON unit attention (SPC-5 5.14).
        if (await initiator.command(bytes(6))).status != Status.GOOD:
            assert (await initiator.command(bytes(6))).status == Status.GOOD
        payload = os.urandom(300 * BLOCK_SIZE)
        cdb = struct.pack(">BBIBHB", 0x2A, 0, 4, 0, 300, 0)
        assert (await initiator.command(cdb, data=payload)).status == Status.GOOD
        cdb = struct.pack(">BBIBHB", 0x28, 0, 4, 0, 300, 0)
        result = await initiator.command(cdb, read=len(payload))
        assert result.status == Status.GOOD
        assert result.data == payload
        assert (await initiator.logout()).response == 0
        assert await stream.receive_some(10) == b""  # the target closes after the logout
        return payload


async def test_login_write_read_logout_over_tcp_on_a_ram_disk() -> None:
    disk = RamDiskTarget()
    async with trio.open_nursery() as nursery:
        _, port = await _start(nursery, disk)
        payload = await _write_read_logout(port)
        nursery.cancel_scope.cancel()
    assert disk.data[4 * BLOCK_SIZE : 304 * BLOCK_SIZE] == payload


async def test_login_write_read_logout_over_tcp_on_an_emulated_disk() -> None:
    with tempfile.NamedTemporaryFile() as image:
        image.truncate(4 << 20)
        target = EmulatedTarget({0: BlockDevice(FileBackend(image.name))})
        try:
            async with trio.open_nursery() as nursery:
                _, port = await _start(nursery, target)
                payload = await _write_read_logout(port)
                nursery.cancel_scope.cancel()
        finally:
            target.close()
        with open(image.name, "rb") as file:
            file.seek(4 * BLOCK_SIZE)
            assert file.read(len(payload)) == payload


async def test_connection_cap_and_garbage() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, RamDiskTarget(), max_connections=1)
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(0.05)
        second = await trio.open_tcp_stream("127.0.0.1", port)
        assert await second.receive_some(10) == b""  # refused: over the cap
        # A stream of garbage during login drops that connection only.
        await first.send_all(b"\xff" * 48 + b"\0" * 200)
        assert await first.receive_some(10) == b""
        await trio.sleep(0.05)
        assert server.active == 0
        payload = await _write_read_logout(port)
        assert len(payload) == 300 * BLOCK_SIZE
        nursery.cancel_scope.cancel()
