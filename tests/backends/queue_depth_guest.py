"""A virtio-scsi "guest" that keeps a fixed number of READ(10) or WRITE(10) commands in flight
on one request queue of a vhost-user daemon, through the project's own front-end
(``vhost_user.VhostUserFrontend``), the way a guest driver at a given queue depth does.

Knows the virtio-scsi request layout (virtio 1.2 section 5.6.6) and the vhost-user front-end;
knows nothing about how the daemon was started or what storage is behind its LUNs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio
from vhost_device_scsi import virtio_scsi as vs
from vhost_user import FrontendQueue, SharedMemory, VhostUserFrontend

__all__ = ["LoadResult", "QueueDepthGuest"]

READ_10 = 0x28
WRITE_10 = 0x2A
TEST_UNIT_READY = 0x00
GOOD = 0x00
#: READ(10)/WRITE(10): opcode, flags, LBA, group, transfer length, control (SBC-3 5.11, 5.32).
RW10 = struct.Struct(">BBIBHB")
#: The device-writable part of a command: response header plus the default sense size.
RESP_SIZE = vs.CMD_RESP_HEADER.size + vs.SENSE_DEFAULT_SIZE
#: The device-readable header: lun, tag, task_attr, prio, crn, then the CDB.
REQ_SIZE = vs.CMD_REQ_HEADER.size + vs.CDB_DEFAULT_SIZE

_REQUEST_QUEUE = 2  # 0 is the control queue, 1 the event queue (5.6.2)
_RING_STRIDE = 0x10000  # room for one split ring of up to 1024 entries (2.7)
_SLOTS_START = 1 << 20


@dataclass(frozen=True)
class LoadResult:
    """What one ``keep_in_flight`` run achieved."""

    depth: int
    completed: int
    #: Commands whose virtio response was not OK or whose SCSI status was not GOOD.
    failed: int
    seconds: float

    @property
    def iops(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


class QueueDepthGuest:
    """A connected front-end with one request queue; ``keep_in_flight`` is the load."""

    MEM = 16 << 20

    def __init__(self, frontend: VhostUserFrontend, memory: SharedMemory) -> None:
        self.frontend = frontend
        self.memory = memory
        self.queue: FrontendQueue = frontend.queues[_REQUEST_QUEUE]
        #: The LUN commands go to (target 0).
        self.lun = 0

    @classmethod
    async def connect(cls, socket_path: str, *, queue_size: int = 256) -> QueueDepthGuest:
        """Connect, negotiate and start the control, event and first request queue."""
        frontend = await VhostUserFrontend.connect(socket_path)
        memory = SharedMemory(cls.MEM)
        try:
            await frontend.negotiate()
            for index in range(_REQUEST_QUEUE + 1):
                frontend.add_queue(index, memory, index * _RING_STRIDE, queue_size)
            await frontend.start([memory])
        except BaseException:
            await frontend.aclose()
            frontend.close_resources()
            memory.close()
            raise
        return cls(frontend, memory)

    async def aclose(self) -> None:
        await self.frontend.aclose()
        self.frontend.close_resources()
        self.memory.close()

    # -- one slot per command in flight --------------------------------------------------------

    def _slot(self, index: int, data_size: int) -> tuple[int, int, int]:
        """Guest addresses of slot ``index``'s request header, response and data buffer."""
        stride = 4096 + ((data_size + 4095) & ~4095)
        base = _SLOTS_START + index * stride
        if base + stride > self.MEM:
            raise ValueError(f"slot {index} of {data_size} bytes does not fit in guest memory")
        return base, base + REQ_SIZE, base + 4096

    def _put_request(self, index: int, cdb: bytes, data_size: int, write: bool, tag: int) -> int:
        """Write slot ``index``'s header, make its chain available (unpublished); the head."""
        req, resp, data = self._slot(index, data_size)
        mem = self.memory.memory
        header = mem.slice(req, REQ_SIZE)
        vs.CMD_REQ_HEADER.pack_into(header, 0, vs.encode_virtio_lun(0, self.lun), tag, 0, 0, 0)
        header[vs.CMD_REQ_HEADER.size :] = cdb.ljust(vs.CDB_DEFAULT_SIZE, b"\0")
        mem.slice(resp, RESP_SIZE)[: vs.CMD_RESP_HEADER.size] = bytes(vs.CMD_RESP_HEADER.size)
        if data_size == 0:
            segments = [(req, REQ_SIZE, False), (resp, RESP_SIZE, True)]
        elif write:  # device-readable before device-writable (5.6.6)
            segments = [(req, REQ_SIZE, False), (data, data_size, False), (resp, RESP_SIZE, True)]
        else:
            segments = [(req, REQ_SIZE, False), (resp, RESP_SIZE, True), (data, data_size, True)]
        return self.queue.driver.add_chain(segments)

    def _succeeded(self, index: int, data_size: int) -> bool:
        _, resp, _ = self._slot(index, data_size)
        header = self.memory.memory.slice(resp, vs.CMD_RESP_HEADER.size)
        fields: tuple[int, int, int, int, int] = vs.CMD_RESP_HEADER.unpack(header)
        _sense_len, _residual, _qualifier, status, response = fields
        return response == vs.VirtioScsiResponse.OK and status == GOOD

    async def clear_unit_attention(self, attempts: int = 5) -> None:
        """TEST UNIT READY until GOOD: a fresh target reports its power-on UNIT ATTENTION once."""
        for tag in range(attempts):
            self._put_request(0, bytes([TEST_UNIT_READY]), 0, False, tag)
            self.queue.submit()
            with trio.fail_after(10):
                await self.queue.wait_used(1)
            if self._succeeded(0, 0):
                return
        raise AssertionError(f"TEST UNIT READY did not return GOOD in {attempts} attempts")

    async def keep_in_flight(
        self,
        depth: int,
        seconds: float,
        *,
        write: bool = False,
        block_size: int = 512,
        blocks: int = 8,
        span_blocks: int = 1 << 17,
    ) -> LoadResult:
        """Keep ``depth`` commands of ``blocks`` blocks made available for ``seconds``.

        Each completed command is replaced at once by the next (sequential LBAs wrapping at
        ``span_blocks``), as a guest's block layer does at that queue depth; after the time is
        up the last ones are waited for. The result counts every command that completed.
        """
        data_size = blocks * block_size
        opcode = WRITE_10 if write else READ_10
        heads: dict[int, int] = {}  # descriptor head -> slot
        issued = 0

        def issue(slot: int) -> None:
            nonlocal issued
            lba = (issued * blocks) % span_blocks
            cdb = RW10.pack(opcode, 0, lba, 0, blocks, 0)
            heads[self._put_request(slot, cdb, data_size, write, issued)] = slot
            issued += 1

        completed = failed = 0
        start = trio.current_time()
        deadline = start + seconds
        with trio.fail_after(seconds + 30):
            for slot in range(depth):
                issue(slot)
            self.queue.submit()
            while heads:
                (elem,) = await self.queue.wait_used(1)
                slot = heads.pop(elem.id)
                completed += 1
                if not self._succeeded(slot, data_size):
                    failed += 1
                if trio.current_time() < deadline:
                    issue(slot)
                    self.queue.submit()
        return LoadResult(depth, completed, failed, trio.current_time() - start)
