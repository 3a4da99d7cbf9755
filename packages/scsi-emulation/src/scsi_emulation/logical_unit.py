"""The logical unit interface of the emulated target, and the two LUs that hold no data.

Holds `LogicalUnit` (what `EmulatedTarget` dispatches to), `MissingLun` (answers for a LUN
with nothing behind it, SPC-5 6.7.2 / 6.39) and `ReportLunsLogicalUnit` (the REPORT LUNS
well-known LU, SPC-5 8.2). Knows nothing about storage or transports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable

from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, SenseData, SenseKey
from scsi_core.target import Completion, Request, Response, TaskManagementFunction, TmfResponse

from scsi_emulation.errors import GOOD, CommandError, check_condition, invalid_field_in_cdb
from scsi_emulation.report_luns import report_luns_data
from scsi_emulation.transfer import send_data
from scsi_emulation.vpd import PERIPHERAL_NONE, PERIPHERAL_WELL_KNOWN, standard_inquiry

__all__ = ["LogicalUnit", "LunLister", "MissingLun", "ReportLunsLogicalUnit", "report_luns"]

#: Returns the LUNs of the target, for REPORT LUNS.
LunLister = Callable[[], list[int]]


class LogicalUnit(ABC):
    """One logical unit of an `EmulatedTarget`."""

    #: Whether `begin_batch` / `end_batch` do anything (the target calls only those that do).
    batches: bool = False

    def attach(self, lun: int, lister: LunLister) -> None:  # noqa: B027 - optional hook
        """Called when the LU is placed at ``lun``; ``lister`` serves REPORT LUNS."""

    @abstractmethod
    def execute(self, request: Request, complete: Completion) -> Response | None:
        """As `scsi_core.target.Target.execute`; must not raise for bad input."""

    def task_management(
        self, function: TaskManagementFunction, tag: int = 0, nexus: Hashable = 0
    ) -> TmfResponse:
        """Task management scoped to this LU (every command here completes inline)."""
        if function == TaskManagementFunction.CLEAR_ACA:
            return TmfResponse.FUNCTION_REJECTED
        return TmfResponse.FUNCTION_COMPLETE

    def establish_unit_attention(self, code: Asc, nexus: Hashable | None = None) -> None:  # noqa: B027
        """Queue a unit attention for ``nexus`` (or every nexus); LUs without state ignore it."""

    def forget_nexus(self, nexus: Hashable) -> None:  # noqa: B027
        """The I_T nexus is gone: drop its state (reservations, PREVENT, unit attentions)."""

    def begin_batch(self) -> None:  # noqa: B027
        """As `scsi_core.target.Target.begin_batch`, for this LU (only when `batches`)."""

    def end_batch(self) -> None:  # noqa: B027
        """As `scsi_core.target.Target.end_batch`, for this LU (only when `batches`)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


def report_luns(request: Request, lister: LunLister) -> Response:
    """REPORT LUNS (SPC-5 6.33), for any LU including a missing one."""
    cdb = request.cdb
    allocation = int.from_bytes(cdb[6:10], "big")
    if allocation < 16:  # SPC-5 6.33: the minimum allocation length is 16
        raise invalid_field_in_cdb(6)
    data = report_luns_data(lister(), cdb[2])
    if data is None:
        raise invalid_field_in_cdb(2)
    return send_data(request, data, allocation)


def _run(
    request: Request, handler: Callable[[Request], Response], descriptor: bool = False
) -> Response:
    try:
        return handler(request)
    except CommandError as e:
        reader, writer = request.data_out, request.data_in
        residual = writer.remaining() if writer else reader.remaining() if reader else 0
        # Shared error instances must not accumulate tracebacks (see BlockDevice.execute).
        e.__traceback__ = None
        return e.response(descriptor, residual)


class MissingLun(LogicalUnit):
    """A LUN with no logical unit: INQUIRY says so, REPORT LUNS and REQUEST SENSE work."""

    _NOT_SUPPORTED = check_condition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)

    def __init__(self, lister: LunLister | None = None) -> None:
        self._lister: LunLister = lister or list

    def attach(self, lun: int, lister: LunLister) -> None:
        self._lister = lister

    def execute(self, request: Request, complete: Completion) -> Response | None:
        return _run(request, self._dispatch)

    def _dispatch(self, request: Request) -> Response:
        cdb = request.cdb
        op = cdb[0]
        if op == Opcode.INQUIRY:
            if cdb[1] & 0x03 or cdb[2]:
                raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            data = standard_inquiry(PERIPHERAL_NONE, "", "", "", command_queuing=False)
            return send_data(request, data, int.from_bytes(cdb[3:5], "big"))
        if op == Opcode.REPORT_LUNS:
            return report_luns(request, self._lister)
        if op == Opcode.REQUEST_SENSE:
            # SPC-5 6.39: GOOD status, sense data reporting the unsupported LU.
            sense = SenseData.of(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            return send_data(request, sense.to_bytes(bool(cdb[1] & 1)), cdb[4])
        return self._NOT_SUPPORTED


class ReportLunsLogicalUnit(LogicalUnit):
    """The REPORT LUNS well-known logical unit (W-LUN C101h)."""

    def __init__(self, lister: LunLister | None = None) -> None:
        self._lister: LunLister = lister or list

    def attach(self, lun: int, lister: LunLister) -> None:
        self._lister = lister

    def execute(self, request: Request, complete: Completion) -> Response | None:
        return _run(request, self._dispatch)

    def _dispatch(self, request: Request) -> Response:
        cdb = request.cdb
        op = cdb[0]
        if op == Opcode.REPORT_LUNS:
            return report_luns(request, self._lister)
        if op == Opcode.INQUIRY:
            if cdb[1] & 0x03 or cdb[2]:
                raise invalid_field_in_cdb(1 if cdb[1] & 0x03 else 2)
            data = standard_inquiry(PERIPHERAL_WELL_KNOWN, "", "REPORT LUNS WLUN", "")
            return send_data(request, data, int.from_bytes(cdb[3:5], "big"))
        if op == Opcode.REQUEST_SENSE:
            sense = SenseData.of(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE_INFORMATION)
            return send_data(request, sense.to_bytes(bool(cdb[1] & 1)), cdb[4])
        if op == Opcode.TEST_UNIT_READY:
            return GOOD
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
