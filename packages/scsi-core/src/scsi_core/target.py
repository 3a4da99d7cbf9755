"""The transport-independent SCSI target interface, and the data-movement protocol it uses.

Holds `Request`, `Response`, the `Target` ABC, task attributes, task management functions and
their responses, the `DataReader`/`DataWriter` protocols and their bytes-backed implementations.
Knows nothing about virtio, iSCSI, trio or any event loop: a transport builds a `Request`,
calls `Target.execute`, and turns the `Response` into its own wire format.

Completion path
---------------
``execute(request, complete)`` has two ways to finish, chosen by the target per command:

* **Inline** (a local file, every SPC command, every error): ``execute`` does the work and
  returns the `Response`. ``complete`` is *not* called. This costs nothing extra: no handle, no
  callback, no thread hop. Transports must treat a returned `Response` as read-only, because a
  target may return a shared instance (e.g. one GOOD response with residual 0).
* **Pending** (a network back-end such as NBD or Ceph RBD, or a file read that would block and
  is handed to a worker thread): ``execute`` returns None and later calls ``complete(response)``
  **exactly once**, possibly from another thread and possibly before ``execute`` has returned.
  The transport's ``complete`` must therefore be thread-safe and cheap: append to a
  `collections.deque` and write an eventfd (``os.eventfd_write``) that the transport's event
  loop waits on, then finish the request (used ring element, iSCSI SCSI Response...) on its own
  thread. Until ``complete`` runs, the request's ``data_in``/``data_out`` buffers stay owned by
  the target and must remain valid; after it runs the target never touches them again.

Task management keeps the same promise: a pending command that a TMF aborts is still completed
exactly once (with ``Status.TASK_ABORTED`` or whatever it finished with); the transport decides
whether the initiator still hears about it (SAM-5 5.6, 7.x).

Data movement
-------------
A `DataReader` (data-out, initiator to target) and a `DataWriter` (data-in, target to
initiator) expose the unconsumed part of their buffers as memoryview slices
(``buffers(length)``), so a target can ``os.preadv``/``os.pwritev`` straight into or out of
them and then ``advance(n)``; ``read``/``write`` copy, for small headers and parameter lists.
`BytesReader`/`BytesWriter` implement them over bytes for tests and simple transports.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BytesReader",
    "BytesWriter",
    "Completion",
    "DataReader",
    "DataWriter",
    "Request",
    "Response",
    "Target",
    "TaskAttribute",
    "TaskManagementFunction",
    "TmfResponse",
]


class DataReader(Protocol):
    """Data-out buffer space (initiator to target), consumed front to back."""

    def remaining(self) -> int:
        """Bytes not yet consumed."""
        ...

    def buffers(self, length: int) -> list[memoryview]:
        """The next up-to-``length`` unconsumed bytes as memoryview slices, not consumed."""
        ...

    def advance(self, n: int) -> None:
        """Mark ``n`` bytes consumed (after an ``os.pwritev`` from `buffers`)."""
        ...

    def read(self, n: int) -> bytes:
        """Copy out up to ``n`` bytes and consume them."""
        ...


class DataWriter(Protocol):
    """Data-in buffer space (target to initiator), filled front to back."""

    def remaining(self) -> int:
        """Bytes of buffer space not yet filled."""
        ...

    def buffers(self, length: int) -> list[memoryview]:
        """The next up-to-``length`` unfilled bytes as writable memoryviews, not consumed."""
        ...

    def advance(self, n: int) -> None:
        """Mark ``n`` bytes filled (after an ``os.preadv`` into `buffers`)."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy in ``min(len(data), remaining())`` bytes, consume them, return the count."""
        ...

    @property
    def written(self) -> int:
        """Total bytes filled so far."""
        ...


class TaskAttribute(enum.IntEnum):
    """SAM-5 task attributes (8.6). Values are virtio-scsi's (VIRTIO_SCSI_S_SIMPLE...)."""

    SIMPLE = 0
    ORDERED = 1
    HEAD_OF_QUEUE = 2
    ACA = 3


class TaskManagementFunction(enum.IntEnum):
    """SAM-5 task management functions (clause 7). Values are not any transport's wire codes."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    #: SAM-5 TARGET RESET was removed; iSCSI keeps TARGET WARM RESET.
    TARGET_WARM_RESET = 6
    #: iSCSI TARGET COLD RESET: a warm reset plus, at the transport, closing every connection.
    TARGET_COLD_RESET = 7
    I_T_NEXUS_RESET = 8
    QUERY_TASK = 9
    QUERY_TASK_SET = 10
    QUERY_ASYNCHRONOUS_EVENT = 11


class TmfResponse(enum.IntEnum):
    """SAM-5 task management service responses (7.1)."""

    FUNCTION_COMPLETE = 0
    #: QUERY TASK / QUERY TASK SET: the task (or one in the set) exists.
    FUNCTION_SUCCEEDED = 1
    FUNCTION_REJECTED = 2
    INCORRECT_LOGICAL_UNIT_NUMBER = 3
    SERVICE_DELIVERY_OR_TARGET_FAILURE = 4


@dataclass(slots=True)
class Request:
    """One SCSI command as a transport hands it to a `Target`."""

    #: Decoded LUN (0..16383) or `scsi_core.lun.REPORT_LUNS_WLUN`.
    lun: int
    #: The CDB; may be longer than the command's CDB length (virtio pads to 32 bytes).
    cdb: bytes | memoryview
    data_out: DataReader | None = None
    data_in: DataWriter | None = None
    tag: int = 0
    task_attr: TaskAttribute = TaskAttribute.SIMPLE
    priority: int = 0
    crn: int = 0
    #: Identifies the I_T nexus (initiator port) for unit attentions and reservations.
    nexus: Hashable = 0


@dataclass(slots=True)
class Response:
    """How a command ended. Treat as read-only: targets may return shared instances."""

    #: A `scsi_core.status.Status` value.
    status: int
    #: Sense data (fixed format unless the LU's D_SENSE asks otherwise); empty when none.
    sense: bytes = b""
    #: Bytes of the data buffer (in or out) that were not transferred.
    residual: int = 0


#: Called exactly once with the final `Response` of a command that `Target.execute` left
#: pending. May be called from any thread.
Completion = Callable[[Response], None]


class Target(ABC):
    """A SCSI target device: a set of logical units and a task manager.

    See the module docstring for the completion contract.
    """

    @abstractmethod
    def execute(self, request: Request, complete: Completion) -> Response | None:
        """Run one command: return its `Response`, or None and call ``complete`` once later.

        Never raises, whatever the request holds.
        """

    @abstractmethod
    def task_management(
        self,
        function: TaskManagementFunction,
        lun: int,
        tag: int = 0,
        nexus: Hashable = 0,
    ) -> TmfResponse:
        """Perform a task management function on ``lun`` (``tag`` names the task to abort)."""

    @abstractmethod
    def luns(self) -> list[int]:
        """The LUNs present, ascending."""

    def begin_batch(self) -> None:  # noqa: B027 - optional hook
        """Several `execute` calls follow back to back (a transport drained its queue): a
        target may hold back the I/O they start until `end_batch`, to send it together."""

    def end_batch(self) -> None:  # noqa: B027 - optional hook
        """The batch `begin_batch` announced is over: start everything held back. A
        transport calls it once per `begin_batch`, even when a command of the batch failed."""


class BytesReader:
    """A `DataReader` over a bytes-like object (no copy of it is made)."""

    __slots__ = ("_pos", "_view")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def remaining(self) -> int:
        return len(self._view) - self._pos

    def buffers(self, length: int) -> list[memoryview]:
        end = min(len(self._view), self._pos + max(length, 0))
        return [self._view[self._pos : end]] if end > self._pos else []

    def advance(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise ValueError(f"advance({n}) with {self.remaining()} bytes remaining")
        self._pos += n

    def read(self, n: int) -> bytes:
        end = min(len(self._view), self._pos + max(n, 0))
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data


class BytesWriter:
    """A `DataWriter` over a new zero-filled buffer of ``capacity`` bytes."""

    __slots__ = ("_buf", "_pos", "_view")

    def __init__(self, capacity: int) -> None:
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._pos = 0

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def buffers(self, length: int) -> list[memoryview]:
        end = min(len(self._buf), self._pos + max(length, 0))
        return [self._view[self._pos : end]] if end > self._pos else []

    def advance(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise ValueError(f"advance({n}) with {self.remaining()} bytes remaining")
        self._pos += n

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), self.remaining())
        self._view[self._pos : self._pos + n] = memoryview(data).cast("B")[:n]
        self._pos += n
        return n

    @property
    def written(self) -> int:
        return self._pos

    def getvalue(self) -> bytes:
        """The bytes filled so far."""
        return bytes(self._view[: self._pos])
