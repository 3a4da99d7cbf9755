"""How command handlers report failure: `CommandError`, and the prebuilt responses.

Holds the exception a handler raises on an error path (it carries the sense key, ASC/ASCQ and
field pointer SPC/SBC prescribe) and the shared `Response` objects for GOOD and the common
CHECK CONDITIONs. Knows nothing about which command failed or about any transport. Raising is
only used off the hot path: the READ/WRITE handlers return prebuilt responses instead.
"""

from __future__ import annotations

import functools

from scsi_core.sense import Asc, FieldPointer, SenseData, SenseKey, build_sense
from scsi_core.status import Status
from scsi_core.target import Response

__all__ = [
    "GOOD",
    "CommandError",
    "check_condition",
    "invalid_field_in_cdb",
    "invalid_field_in_parameter_list",
]

#: The shared GOOD response with no residual (responses are read-only by contract).
GOOD = Response(Status.GOOD)


class CommandError(Exception):
    """A command ends in CHECK CONDITION with this sense; raised by handlers, caught by the LU."""

    def __init__(
        self,
        key: SenseKey,
        code: Asc,
        field_pointer: FieldPointer | None = None,
        information: int | None = None,
    ) -> None:
        super().__init__(f"{key.name} {code.name}")
        self.key = key
        self.code = code
        self.field_pointer = field_pointer
        self.information = information

    def response(self, descriptor: bool = False, residual: int = 0) -> Response:
        """The CHECK CONDITION response (fixed or descriptor format sense)."""
        if self.information is None:
            sense = build_sense(self.key, self.code, self.field_pointer, descriptor)
        else:
            sense = SenseData.of(
                self.key, self.code, field_pointer=self.field_pointer, information=self.information
            ).to_bytes(descriptor)
        return Response(Status.CHECK_CONDITION, sense, residual)


@functools.lru_cache(maxsize=256)
def check_condition(
    key: SenseKey, code: Asc, field_pointer: FieldPointer | None = None, descriptor: bool = False
) -> Response:
    """A cached CHECK CONDITION response with residual 0."""
    return Response(Status.CHECK_CONDITION, build_sense(key, code, field_pointer, descriptor))


def invalid_field_in_cdb(byte: int, bit: int | None = None) -> CommandError:
    """ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at CDB ``byte`` (and ``bit``)."""
    return CommandError(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, FieldPointer(byte, bit, in_cdb=True)
    )


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> CommandError:
    """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the parameter data."""
    return CommandError(
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        FieldPointer(byte, bit, in_cdb=False),
    )
