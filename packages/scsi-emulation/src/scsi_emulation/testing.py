"""Driving a `Target` with plain bytes: a helper for tests and tools.

Holds `run_command`, which wraps a CDB and payload in a `Request` with `BytesReader` and
`BytesWriter`, waits for a pending completion, and decodes the outcome into a `CommandResult`;
and, for storage back-ends in polled mode, `poll_until` (the caller's event loop in a few
lines) and `CompletionTally` (``done`` callbacks that record what they saw). Knows nothing
about any transport.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from scsi_core.sense import SenseData, parse_sense
from scsi_core.target import BytesReader, BytesWriter, Request, Response, Target

from scsi_emulation.backend import BackendError, StorageBackend

__all__ = ["CommandResult", "CompletionTally", "poll_until", "run_command"]


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


def poll_until(backend: StorageBackend, finished: Callable[[], bool], timeout: float) -> None:
    """A polled back-end's caller, on this thread: wait for its poll descriptor (or its
    poll_interval), `service`, until ``finished()``; AssertionError after ``timeout`` s, so
    that a hang fails a test instead of stalling it."""
    deadline = time.monotonic() + timeout
    while not finished():
        assert time.monotonic() < deadline, "polled back-end made no progress"
        fd = backend.poll_fileno()
        if fd is not None:
            select.select([fd], [], [], backend.poll_interval)
        else:
            time.sleep(backend.poll_interval)
        backend.service()


class CompletionTally:
    """``done`` callbacks that count, remember errors and the threads they ran on."""

    def __init__(self) -> None:
        self.errors: list[BackendError | None] = []
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, error: BackendError | None) -> None:
        with self.lock:
            self.errors.append(error)
            self.threads.add(threading.get_ident())

    def count(self) -> int:
        """How many completions ran."""
        return len(self.errors)

    def reached(self, n: int) -> Callable[[], bool]:
        """A `poll_until` condition: ``n`` completions seen."""
        return lambda: len(self.errors) >= n
