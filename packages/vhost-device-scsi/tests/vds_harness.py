"""Test helpers: a fake SCSI target; a virtio-scsi driver over DriverQueue in anonymous memory."""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from scsi_core.status import Status
from scsi_core.target import (
    Completion,
    Request,
    Response,
    Target,
    TaskManagementFunction,
    TmfResponse,
)
from vhost_device_scsi import virtio_scsi as vs
from vhost_user import SharedMemory, VhostUserFrontend
from virtio_queue import DescriptorChain, DriverQueue, GuestMemory, MemoryRegion, SplitQueue
from virtio_queue.layout import QueueLayout

READ_10 = 0x28
WRITE_10 = 0x2A
PENDING_OP = 0xC0  # vendor-specific opcode the fake target leaves pending
SENSE_OP = 0xC1  # returns CHECK CONDITION with sense


@dataclass
class FakeTarget(Target):
    """Records requests; READ fills data-in with a pattern, WRITE swallows data-out."""

    present: set[int] = field(default_factory=lambda: {0, 1, 300})
    requests: list[Request] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    pending: list[tuple[Request, Completion]] = field(default_factory=list)
    tmfs: list[tuple[TaskManagementFunction, int, int, Hashable]] = field(default_factory=list)
    tmf_answer: TmfResponse = TmfResponse.FUNCTION_COMPLETE

    def execute(self, request: Request, complete: Completion) -> Response | None:
        self.requests.append(request)
        op = request.cdb[0]
        if request.lun not in self.present:
            return Response(Status.CHECK_CONDITION, b"\x70\x00\x05" + bytes(15), 0)
        if op == READ_10 and request.data_in is not None:
            w = request.data_in
            n = w.remaining()
            pattern = bytes((request.lun + i) & 0xFF for i in range(n))
            w.write(pattern)
            return Response(Status.GOOD)
        if op == WRITE_10 and request.data_out is not None:
            self.written.append(request.data_out.read(request.data_out.remaining()))
            return Response(Status.GOOD)
        if op == PENDING_OP:
            self.pending.append((request, complete))
            return None
        if op == SENSE_OP:
            return Response(Status.CHECK_CONDITION, bytes(range(200)), 7)
        return Response(Status.GOOD)

    def task_management(
        self,
        function: TaskManagementFunction,
        lun: int,
        tag: int = 0,
        nexus: Hashable = 0,
    ) -> TmfResponse:
        self.tmfs.append((function, lun, tag, nexus))
        if function in (TaskManagementFunction.ABORT_TASK, TaskManagementFunction.ABORT_TASK_SET):
            for req, complete in list(self.pending):
                if function == TaskManagementFunction.ABORT_TASK_SET or req.tag == tag:
                    self.pending.remove((req, complete))
                    complete(Response(Status.TASK_ABORTED))
        return self.tmf_answer

    def luns(self) -> list[int]:
        return sorted(self.present)

    def complete_pending_in_thread(self) -> None:
        """Finish every pending command from another thread (as a worker pool would)."""
        items = list(self.pending)
        self.pending.clear()

        def run() -> None:
            for req, complete in items:
                if req.data_in is not None:
                    req.data_in.write(b"\xab" * req.data_in.remaining())
                complete(Response(Status.GOOD, b"", 0))

        t = threading.Thread(target=run)
        t.start()
        t.join()


class TestVring:
    """The Vring surface the device uses, over a SplitQueue, counting notifications."""

    def __init__(self, index: int, queue: SplitQueue) -> None:
        self.index = index
        self.queue = queue
        self.notifies = 0

    def pop(self) -> DescriptorChain | None:
        return self.queue.pop()

    def add_used(self, head: int, length: int) -> None:
        self.queue.add_used(head, length)

    def notify(self) -> None:
        self.notifies += 1


class Driver:
    """A virtio-scsi driver for one queue: allocates buffers and builds chains."""

    MEM = 4 << 20

    def __init__(self, index: int = 2, size: int = 64, *, event_idx: bool = False) -> None:
        self.region = MemoryRegion.anonymous(0, self.MEM)
        self.memory = GuestMemory([self.region])
        self.dq = DriverQueue(self.memory, QueueLayout.at(0, size), event_idx=event_idx)
        self.vring = TestVring(index, self.dq.device_queue())
        self._next = 0x10000

    def alloc(self, n: int) -> int:
        addr = self._next
        self._next += (n + 15) & ~15
        if self._next > self.MEM:
            self._next = 0x10000
            addr = self._next
            self._next += (n + 15) & ~15
        return addr

    def put(self, data: bytes) -> tuple[int, int, bool]:
        addr = self.alloc(len(data))
        self.memory.slice(addr, len(data))[:] = data
        return (addr, len(data), False)

    def space(self, n: int) -> tuple[int, int, bool]:
        return (self.alloc(n), n, True)

    def read(self, seg: tuple[int, int, bool], n: int | None = None) -> bytes:
        return bytes(self.memory.slice(seg[0], seg[1] if n is None else n))

    def submit(self, segments: Sequence[tuple[int, int, bool]]) -> int:
        head = self.dq.add_chain(segments)
        self.dq.publish()
        return head

    def command(
        self,
        cdb: bytes,
        *,
        lun: bytes = vs.encode_virtio_lun(0, 0),
        tag: int = 1,
        data_out: bytes = b"",
        data_in: int = 0,
        resp_len: int = 108,
        split_resp: bool = False,
    ) -> tuple[int, tuple[int, int, bool], tuple[int, int, bool] | None]:
        """Queue one command; returns (head, response segment, data-in segment)."""
        req = vs.CmdReq(lun, tag, 0, 0, 0, cdb.ljust(32, b"\0")).pack()
        segs = [self.put(req)]
        if data_out:
            segs.append(self.put(data_out))
        resp = self.space(resp_len)
        if split_resp:
            segs += [(resp[0], 10, True), (resp[0] + 10, resp_len - 10, True)]
        else:
            segs.append(resp)
        din = None
        if data_in:
            din = self.space(data_in)
            segs.append(din)
        return self.submit(segs), resp, din

    def used(self) -> dict[int, int]:
        return {e.id: e.len for e in self.dq.get_used()}

    def response(self, seg: tuple[int, int, bool]) -> vs.CmdResp:
        return vs.CmdResp.unpack(self.read(seg))

    def close(self) -> None:
        self.memory.close()


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# -- a virtio-scsi "guest" over a real vhost-user connection --------------------------------------


@dataclass
class Submitted:
    """A command made available on a request queue, waiting for its used element."""

    head: int
    resp: tuple[int, int, bool]
    data_in: tuple[int, int, bool] | None


class ScsiGuest:
    """Drives a vhost-user virtio-scsi back-end like a guest driver would, via VhostUserFrontend.

    Queues: 0 control, 1 event, 2.. request. Buffers are carved from one shared memfd.
    """

    MEM = 32 << 20
    DATA_START = 1 << 20

    def __init__(self, frontend: VhostUserFrontend, memory: SharedMemory) -> None:
        self.fe = frontend
        self.mem = memory
        self._next = self.DATA_START

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        request_queues: int = 1,
        queue_size: int = 128,
        inflight: bool = False,
    ) -> ScsiGuest:
        fe = await VhostUserFrontend.connect(path)
        await fe.negotiate()
        mem = SharedMemory(cls.MEM)
        total = 2 + request_queues
        if inflight:
            await fe.setup_inflight(total, queue_size)
        for i in range(total):
            fe.add_queue(i, mem, i * 0x10000, queue_size)
        await fe.start([mem])
        return cls(fe, mem)

    async def close(self) -> None:
        await self.fe.aclose()
        self.fe.close_resources()
        self.mem.close()

    # buffers
    def alloc(self, n: int) -> int:
        if self._next + n > self.MEM:
            self._next = self.DATA_START
        addr = self._next
        self._next += (n + 4095) & ~4095
        return addr

    def put(self, data: bytes) -> tuple[int, int, bool]:
        addr = self.alloc(len(data))
        self.mem.memory.slice(addr, len(data))[:] = data
        return (addr, len(data), False)

    def space(self, n: int) -> tuple[int, int, bool]:
        addr = self.alloc(n)
        self.mem.memory.slice(addr, n)[:] = bytes(n)
        return (addr, n, True)

    def read(self, seg: tuple[int, int, bool]) -> bytes:
        return bytes(self.mem.memory.slice(seg[0], seg[1]))

    # commands
    def submit(
        self,
        cdb: bytes,
        *,
        queue: int = 2,
        lun: int = 0,
        lun_field: bytes | None = None,
        tag: int = 1,
        data_out: bytes = b"",
        data_in: int = 0,
    ) -> Submitted:
        field = lun_field if lun_field is not None else vs.encode_virtio_lun(0, lun)
        req = vs.CmdReq(field, tag, 0, 0, 0, cdb.ljust(32, b"\0")).pack()
        segs = [self.put(req)]
        if data_out:
            segs.append(self.put(data_out))
        resp = self.space(108)
        segs.append(resp)
        din = self.space(data_in) if data_in else None
        if din is not None:
            segs.append(din)
        q = self.fe.queues[queue]
        head = q.driver.add_chain(segs)
        q.submit()
        return Submitted(head, resp, din)

    async def command(
        self,
        cdb: bytes,
        *,
        queue: int = 2,
        lun: int = 0,
        lun_field: bytes | None = None,
        tag: int = 1,
        data_out: bytes = b"",
        data_in: int = 0,
    ) -> tuple[vs.CmdResp, bytes, int]:
        """One command, waited for: (response, data-in bytes, used length)."""
        sub = self.submit(
            cdb,
            queue=queue,
            lun=lun,
            lun_field=lun_field,
            tag=tag,
            data_out=data_out,
            data_in=data_in,
        )
        used = await self.fe.queues[queue].wait_used(1)
        assert used[0].id == sub.head
        data = self.read(sub.data_in) if sub.data_in else b""
        return vs.CmdResp.unpack(self.read(sub.resp)), data, used[0].len

    async def control(self, request: bytes, resp_len: int) -> bytes:
        q = self.fe.queues[0]
        resp = self.space(resp_len)
        q.driver.add_chain([self.put(request), resp])
        q.submit()
        await q.wait_used(1)
        return self.read(resp)

    def post_event_buffers(self, n: int) -> list[tuple[int, int, bool]]:
        q = self.fe.queues[1]
        bufs = [self.space(16) for _ in range(n)]
        for b in bufs:
            q.driver.add_chain([b])
        q.submit()
        return bufs
