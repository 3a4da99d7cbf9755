"""Moving small parameter data in and out of a command's buffers, with the residual rules.

Holds `send_data` (data-in, truncated to the ALLOCATION LENGTH and the buffer) and
`receive_parameters` (data-out, the PARAMETER LIST LENGTH bytes). Knows nothing about which
command is running. Bulk block data does not come through here: it goes straight between the
back-end and the buffers' memoryviews.
"""

from __future__ import annotations

from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_core.target import Request, Response

from scsi_emulation.errors import GOOD, CommandError

__all__ = ["data_out_residual", "receive_parameters", "send_data"]


def send_data(request: Request, data: bytes, allocation_length: int) -> Response:
    """Return ``data`` to the initiator, cut to ``allocation_length`` and to the buffer.

    SPC-5 4.2.5.6: the allocation length truncates without error. The residual is the part
    of the data-in buffer left unfilled.
    """
    writer = request.data_in
    if writer is None:
        return GOOD
    capacity = writer.remaining()
    n = min(len(data), allocation_length, capacity)
    if n:
        writer.write(memoryview(data)[:n])
    residual = capacity - n
    return Response(Status.GOOD, b"", residual) if residual else GOOD


def receive_parameters(request: Request, length: int) -> bytes:
    """Read the ``length``-byte parameter list from the data-out buffer.

    A buffer shorter than the CDB promises is an initiator/transport mismatch; as FCP-4 and
    iSCSI allow, the command transfers nothing and ends with ILLEGAL REQUEST, INVALID FIELD IN
    COMMAND INFORMATION UNIT.
    """
    reader = request.data_out
    if length == 0:
        return b""
    if reader is None or reader.remaining() < length:
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    return reader.read(length)


def data_out_residual(request: Request) -> Response:
    """GOOD, with the unconsumed part of the data-out buffer as the residual."""
    reader = request.data_out
    left = reader.remaining() if reader is not None else 0
    return Response(Status.GOOD, b"", left) if left else GOOD
