"""Driving a `Target` with plain bytes: a helper for tests and tools.

Holds `run_command`, which wraps a CDB and payload in a `Request` with `BytesReader` and
`BytesWriter`, waits for a pending completion, and decodes the outcome into a `CommandResult`.
Knows nothing about any transport.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

from scsi_core.sense import SenseData, parse_sense
from scsi_core.target import BytesReader, BytesWriter, Request, Response, Target

__all__ = ["CommandResult", "run_command"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What came back: status, parsed sense (if any), data-in bytes and residual."""

    status: int
    sense: SenseData | None
    data: bytes
    residual: int
    raw_sense: bytes


def run_command(
    target: Target,
    cdb: bytes,
    *,
    data_out: bytes | None = None,
    data_in: int = 0,
    lun: int = 0,
    nexus: Hashable = 0,
    timeout: float = 10.0,
) -> CommandResult:
    """Execute ``cdb`` on ``target``; ``data_in`` is the data-in buffer size in bytes."""
    writer = BytesWriter(data_in) if data_in else None
    reader = BytesReader(data_out) if data_out is not None else None
    done = threading.Event()
    late: list[Response] = []

    def complete(response: Response) -> None:
        late.append(response)
        done.set()

    request = Request(lun=lun, cdb=cdb, data_out=reader, data_in=writer, nexus=nexus)
    response = target.execute(request, complete)
    if response is None:
        if not done.wait(timeout):
            raise TimeoutError(f"command {cdb.hex()} did not complete")
        response = late[0]
    sense = parse_sense(response.sense) if response.sense else None
    return CommandResult(
        status=response.status,
        sense=sense,
        data=writer.getvalue() if writer else b"",
        residual=response.residual,
        raw_sense=response.sense,
    )
