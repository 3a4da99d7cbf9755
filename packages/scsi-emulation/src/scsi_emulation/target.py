"""`EmulatedTarget`: the SCSI target of emulated logical units, dispatched by LUN.

Holds the LUN map (up to 16384 LUs, SAM-5 flat space), the REPORT LUNS well-known LU, the
`MissingLun` stand-in for absent LUNs, target-wide task management, and the last line of
defence that turns any exception into CHECK CONDITION so `execute` never raises. Knows
nothing about transports.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Hashable, Mapping

from scsi_core.lun import MAX_LUN, REPORT_LUNS_WLUN
from scsi_core.sense import Asc, SenseKey
from scsi_core.target import (
    Completion,
    Request,
    Response,
    Target,
    TaskManagementFunction,
    TmfResponse,
)

from scsi_emulation.errors import check_condition
from scsi_emulation.logical_unit import LogicalUnit, MissingLun, ReportLunsLogicalUnit

__all__ = ["EmulatedTarget"]

logger = logging.getLogger(__name__)

_TARGET_WIDE = frozenset(
    (
        TaskManagementFunction.TARGET_WARM_RESET,
        TaskManagementFunction.TARGET_COLD_RESET,
        TaskManagementFunction.I_T_NEXUS_RESET,
    )
)
_MALFORMED = check_condition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
_INTERNAL = check_condition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


class EmulatedTarget(Target):
    """A target whose logical units are emulated in this process."""

    def __init__(self, luns: Mapping[int, LogicalUnit] | None = None) -> None:
        self._luns: dict[int, LogicalUnit] = {}
        #: The LUs whose batch hooks do something, so that a batch costs nothing without them.
        self._batching: tuple[LogicalUnit, ...] = ()
        self._missing = MissingLun(self.luns)
        self._wlun = ReportLunsLogicalUnit(self.luns)
        for lun, lu in (luns or {}).items():
            self.attach(lun, lu, announce=False)

    def attach(self, lun: int, lu: LogicalUnit, *, announce: bool = True) -> None:
        """Put ``lu`` at ``lun`` (0..16383). ``announce`` queues REPORTED LUNS DATA HAS
        CHANGED on the other LUs (SPC-5 6.33)."""
        if not 0 <= lun <= MAX_LUN:
            raise ValueError(f"LUN {lun} is outside 0..{MAX_LUN}")
        if lun in self._luns:
            raise ValueError(f"LUN {lun} is already attached")
        self._luns[lun] = lu
        lu.attach(lun, self.luns)
        self._batching = tuple(x for x in self._luns.values() if x.batches)
        if announce:
            self._announce(exclude=lun)

    def detach(self, lun: int) -> LogicalUnit:
        """Remove the LU at ``lun`` and return it (the caller closes it)."""
        lu = self._luns.pop(lun)
        self._batching = tuple(x for x in self._luns.values() if x.batches)
        self._announce()
        return lu

    def _announce(self, exclude: int | None = None) -> None:
        for n, other in self._luns.items():
            if n != exclude:
                other.establish_unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED)

    def logical_unit(self, lun: int) -> LogicalUnit | None:
        """The LU at ``lun``, if any."""
        return self._luns.get(lun)

    def luns(self) -> list[int]:
        return sorted(self._luns)

    def begin_batch(self) -> None:
        for lu in self._batching:
            lu.begin_batch()

    def end_batch(self) -> None:
        for lu in self._batching:
            try:
                lu.end_batch()
            except Exception:  # one LU's failure must not keep the others' I/O held back
                logger.exception("ending a batch failed")

    def execute(self, request: Request, complete: Completion) -> Response | None:
        lu: LogicalUnit | None = self._luns.get(request.lun)
        if lu is None:
            lu = self._wlun if request.lun == REPORT_LUNS_WLUN else self._missing
        try:
            return lu.execute(request, complete)
        except (IndexError, struct.error, ValueError, TypeError):
            # A CDB shorter than its opcode's layout, or otherwise not decodable.
            logger.info("malformed CDB %s for LUN %s", bytes(request.cdb[:32]).hex(), request.lun)
            return _MALFORMED
        except Exception:
            logger.exception(
                "command %s on LUN %s failed", bytes(request.cdb[:1]).hex(), request.lun
            )
            return _INTERNAL

    def task_management(
        self,
        function: TaskManagementFunction,
        lun: int,
        tag: int = 0,
        nexus: Hashable = 0,
    ) -> TmfResponse:
        try:
            if function in _TARGET_WIDE:
                for lu in self._luns.values():
                    lu.task_management(function, tag, nexus)
                return TmfResponse.FUNCTION_COMPLETE
            target_lu = self._luns.get(lun)
            if target_lu is None:
                return TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER
            return target_lu.task_management(function, tag, nexus)
        except Exception:
            logger.exception("task management %s on LUN %s failed", function.name, lun)
            return TmfResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE

    def forget_nexus(self, nexus: Hashable) -> None:
        """The transport lost an I_T nexus: drop its reservations, PREVENT and unit attentions."""
        for lu in self._luns.values():
            lu.forget_nexus(nexus)

    def close(self) -> None:
        """Close every LU."""
        for lu in self._luns.values():
            lu.close()
        self._luns.clear()
