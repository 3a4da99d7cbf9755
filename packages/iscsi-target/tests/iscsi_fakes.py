"""A RAM-disk SCSI target for tests: just enough SBC to move data, and a record of TMFs.

It lets the iSCSI tests run without scsi-emulation, and in `pending` mode it leaves commands
pending so tests can complete them later (the asynchronous completion path).
"""

from __future__ import annotations

import struct
from collections.abc import Hashable

from scsi_core.sense import Asc, SenseKey, build_sense
from scsi_core.status import Status
from scsi_core.target import (
    Completion,
    Request,
    Response,
    Target,
    TaskManagementFunction,
    TmfResponse,
)

BLOCK_SIZE = 512
GOOD = Response(Status.GOOD)


class RamDiskTarget(Target):
    """LUN 0: a RAM disk of `blocks` 512-byte blocks (TUR, INQUIRY, READ/WRITE 10 and 16)."""

    def __init__(self, blocks: int = 2048, *, pending: bool = False) -> None:
        self.data = bytearray(blocks * BLOCK_SIZE)
        self.blocks = blocks
        self.pending = pending
        self.waiting: list[tuple[Request, Completion]] = []
        self.tmfs: list[tuple[TaskManagementFunction, int, int, Hashable]] = []
        self.requests: list[Request] = []

    def luns(self) -> list[int]:
        return [0]

    def task_management(
        self, function: TaskManagementFunction, lun: int, tag: int = 0, nexus: Hashable = 0
    ) -> TmfResponse:
        self.tmfs.append((function, lun, tag, nexus))
        return TmfResponse.FUNCTION_COMPLETE

    def execute(self, request: Request, complete: Completion) -> Response | None:
        self.requests.append(request)
        if self.pending:
            self.waiting.append((request, complete))
            return None
        return self.run(request)

    def finish_all(self) -> None:
        """Complete every pending command (as a worker thread would)."""
        waiting, self.waiting = self.waiting, []
        for request, complete in waiting:
            complete(self.run(request))

    def run(self, request: Request) -> Response:
        cdb = bytes(request.cdb)
        if request.lun != 0:
            return _check(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
        opcode = cdb[0]
        if opcode == 0x00:
            return GOOD
        if opcode == 0x12:
            inquiry = bytes((0, 0, 6, 2, 31, 0, 0, 2)) + b"TEST    RAMDISK         0001"
            length = min(len(inquiry), int.from_bytes(cdb[3:5], "big"))
            written = request.data_in.write(inquiry[:length]) if request.data_in else 0
            return Response(Status.GOOD, residual=max(0, length - written))
        if opcode in (0x28, 0x2A):
            lba, blocks = struct.unpack_from(">xxIxH", cdb)
        elif opcode in (0x88, 0x8A):
            lba, blocks = struct.unpack_from(">xxQI", cdb)
        else:
            return _check(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
        if lba + blocks > self.blocks:
            return _check(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
        start, length = lba * BLOCK_SIZE, blocks * BLOCK_SIZE
        if opcode in (0x28, 0x88):
            if request.data_in is None:
                return GOOD
            request.data_in.write(self.data[start : start + length])
            return Response(Status.GOOD, residual=request.data_in.remaining())
        if request.data_out is None or request.data_out.remaining() < length:
            return _check(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
        self.data[start : start + length] = request.data_out.read(length)
        return Response(Status.GOOD, residual=request.data_out.remaining())


def _check(key: SenseKey, code: Asc) -> Response:
    return Response(Status.CHECK_CONDITION, build_sense(key, code))
