"""`BlockDevice`: an SBC direct-access logical unit over a `StorageBackend`.

Holds the LU's state (capacity, mode pages, unit attentions, RESERVE(6) holder, PREVENT
state, medium presence), the per-command admission checks (unit attention, reservation
conflict, no medium: SAM-5 5.14, SPC-2 5.5.1), the dispatch table, and the hot path: READ and
WRITE (6/10/12/16) moving data straight between the back-end and the request's buffers. The
other SPC and SBC commands live in `spc_commands` and `sbc_commands`. Knows nothing about
transports.

Hot path cost: one set membership test (is this nexus free of unit attentions and
reservation conflicts?), one list index for dispatch, one precompiled ``struct`` unpack, a
bounds check, ``buffers()``/``preadv``/``advance``, and a shared GOOD response.

An asynchronous back-end (NBD, RBD: ``backend.asynchronous``) gets its READs, WRITEs, WRITE
AND VERIFYs and SYNCHRONIZE CACHEs through ``submit_*`` instead: `execute` returns None and
the back-end's completion calls ``complete`` (a `_Submission` decides which of the two
happens when the back-end completes before ``submit_*`` returns). Which path a device takes is
chosen once, when it is built: the local path pays nothing for it. The device counts what is
in flight: COMPARE AND WRITE and ORWRITE (read-modify-write, atomic: SBC-4 5.3, 5.8) and the
task management functions that abort or reset wait until it has all completed.

Long work (a large WRITE SAME with a non-zero pattern, UNMAP written as zeros, a large
EXTENDED COPY, SANITIZE) runs on a thread of its own through `run_in_background`, after every
check that can refuse the command: it counts as in flight too, so the same waits cover it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
import threading
from collections.abc import Callable, Hashable, Iterable

from scsi_core.cdb import decode_block_cdb
from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_core.target import Completion, Request, Response, TaskManagementFunction, TmfResponse

from scsi_emulation.backend import BackendError, FileBackend, StorageBackend
from scsi_emulation.command_table import CommandInfo, supported_commands
from scsi_emulation.errors import GOOD, CommandError, check_condition, invalid_field_in_cdb
from scsi_emulation.extended_copy import register_device
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.logical_unit import LogicalUnit, LunLister
from scsi_emulation.mode_pages import ModePages
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.persistent_reservation import PersistentReservations
from scsi_emulation.sanitize import (
    SANITIZE_PERMITTED,
    SANITIZE_WORKER_COMMANDS,
    SanitizeProgress,
    in_progress_error,
    request_sense_while_sanitizing,
)
from scsi_emulation.unit_attention import UnitAttentions

__all__ = ["BlockDevice"]

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Completion], "Response | None"]
CommandFunction = Callable[["BlockDevice", Request], Response]

_CDB6 = struct.Struct(">xBHBx")  # LBA 20..16, LBA 15..0, TRANSFER LENGTH
_CDB10 = struct.Struct(">xBIxH")  # flags, LBA, TRANSFER LENGTH
_CDB12 = struct.Struct(">xBII")
_CDB16 = struct.Struct(">xBQI")


ReadCall = Callable[[Request, Completion, int, int], "Response | None"]
WriteCall = Callable[[Request, int, int, bool], Response]
SubmitWriteCall = Callable[[Request, Completion, int, int, bool], "Response | None"]


def _rw_handlers(
    read: ReadCall,
    *,
    write: WriteCall | None = None,
    submit_write: SubmitWriteCall | None = None,
) -> dict[int, Handler]:
    """The hot path's READ/WRITE(6/10/12/16) handlers: one unpack per CDB, then ``read`` and
    ``write`` (local storage) or ``submit_write`` (an asynchronous back-end; ``read`` is then
    its submit_read). Closures, so that a command costs no attribute look-up beyond them.

    READ(6)/WRITE(6): a transfer length of 0 means 256 blocks, no FUA (SBC-4 5.16, 5.48);
    the others refuse RDPROTECT/WRPROTECT, protection information is not offered (4.22).
    """

    def read6(request: Request, complete: Completion) -> Response | None:
        hi, lo, n = _CDB6.unpack_from(request.cdb)
        return read(request, complete, ((hi & 0x1F) << 16) | lo, n or 256)

    def reader(layout: struct.Struct) -> Handler:
        unpack = layout.unpack_from

        def read_n(request: Request, complete: Completion) -> Response | None:
            flags, lba, n = unpack(request.cdb)
            if flags & 0xE0:
                raise _PROTECT_FIELD
            return read(request, complete, lba, n)

        return read_n

    def writer(layout: struct.Struct) -> Handler:
        unpack = layout.unpack_from
        if submit_write is not None:

            def submit_n(request: Request, complete: Completion) -> Response | None:
                flags, lba, n = unpack(request.cdb)
                if flags & 0xE0:
                    raise _PROTECT_FIELD
                return submit_write(request, complete, lba, n, bool(flags & 0x08))

            return submit_n
        assert write is not None

        def write_n(request: Request, complete: Completion) -> Response | None:
            flags, lba, n = unpack(request.cdb)
            if flags & 0xE0:
                raise _PROTECT_FIELD
            return write(request, lba, n, bool(flags & 0x08))

        return write_n

    def write6(request: Request, complete: Completion) -> Response | None:
        hi, lo, n = _CDB6.unpack_from(request.cdb)
        lba = ((hi & 0x1F) << 16) | lo
        if submit_write is not None:
            return submit_write(request, complete, lba, n or 256, False)
        assert write is not None
        return write(request, lba, n or 256, False)

    return {
        Opcode.READ_6: read6,
        Opcode.READ_10: reader(_CDB10),
        Opcode.READ_12: reader(_CDB12),
        Opcode.READ_16: reader(_CDB16),
        Opcode.WRITE_6: write6,
        Opcode.WRITE_10: writer(_CDB10),
        Opcode.WRITE_12: writer(_CDB12),
        Opcode.WRITE_16: writer(_CDB16),
    }


_RESERVATION_CONFLICT = Response(Status.RESERVATION_CONFLICT)

# Commands a unit attention does not interrupt (SAM-5 5.14): they run and leave it pending.
_UA_EXEMPT = frozenset((Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE))
# Commands allowed from other nexuses while RESERVE(6) is held (SPC-2 5.5.1 table 10).
_RESERVATION_EXEMPT = frozenset(
    (
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.RELEASE_6,
        Opcode.RELEASE_10,
        Opcode.MAINTENANCE_IN,
        Opcode.LOG_SENSE,
        Opcode.READ_CAPACITY_10,
        Opcode.SERVICE_ACTION_IN_16,
    )
)
# Commands that work with no medium loaded.
_NO_MEDIUM_OK = frozenset(
    (
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10,
        Opcode.MODE_SELECT_6,
        Opcode.MODE_SELECT_10,
        Opcode.START_STOP_UNIT,
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL,
        Opcode.MAINTENANCE_IN,
        Opcode.RESERVE_6,
        Opcode.RELEASE_6,
    )
)

_INVALID_OPCODE = CommandError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
_LBA_OUT_OF_RANGE = CommandError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
_WRITE_PROTECTED = CommandError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
_SHORT_DATA_OUT = CommandError(
    SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
)
_PROTECT_FIELD = invalid_field_in_cdb(1, 7)  # RDPROTECT/WRPROTECT without protection info
_INTERNAL_FAILURE = CommandError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
#: Read-modify-write commands: atomic, so no submitted write may land in the middle.
_WAIT_FOR_IN_FLIGHT = frozenset((Opcode.COMPARE_AND_WRITE, Opcode.ORWRITE_16))
#: How long an abort, a reset or an atomic command waits for submitted requests (the NBD
#: client's own bound on a request, retries included, is shorter).
IN_FLIGHT_TIMEOUT = 60.0


_WAITING_TMFS = frozenset(
    (
        TaskManagementFunction.ABORT_TASK,
        TaskManagementFunction.ABORT_TASK_SET,
        TaskManagementFunction.CLEAR_TASK_SET,
        TaskManagementFunction.LOGICAL_UNIT_RESET,
        TaskManagementFunction.I_T_NEXUS_RESET,
        TaskManagementFunction.TARGET_WARM_RESET,
        TaskManagementFunction.TARGET_COLD_RESET,
    )
)


def check_cdb(cdb: bytes | memoryview, usage: bytes) -> None:
    """Reject bits the command does not use (SPC-5 4.2.5.1, reserved fields) and NACA=1.

    Raises INVALID FIELD IN CDB pointing at the first offending bit.
    """
    last = len(usage) - 1
    if len(cdb) < len(usage):
        raise invalid_field_in_cdb(len(cdb))
    for i in range(1, last):
        bad = cdb[i] & ~usage[i] & 0xFF
        if bad:
            raise invalid_field_in_cdb(i, bad.bit_length() - 1)
    if cdb[last] & 0x04:  # NACA: NORMACA is 0 in our INQUIRY data (SAM-5 5.11)
        raise invalid_field_in_cdb(last, 2)


def backend_error(e: BackendError, writing: bool) -> CommandError:
    """The sense for a failed back-end call (SBC-4 4.x; thin provisioning 4.7.3.7)."""
    # A back-end closed under in-flight commands (the LU is going away) is not news.
    level = logging.DEBUG if e.errno == errno.ESHUTDOWN else logging.WARNING
    logger.log(level, "back-end %s error: %s", "write" if writing else "read", e)
    if writing and e.errno == 28:  # ENOSPC
        return CommandError(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if writing:
        return CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
    return CommandError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)


class _BackgroundJob:
    """The completion side of a command whose work runs on a thread of its own.

    The same one-shot claim as `_Submission`: the work may end before the handler has
    returned None (then the handler returns the response inline), and ``complete`` is called
    only when it returned None first, so exactly one of the two delivers the response.
    """

    __slots__ = ("_claim", "complete", "response")

    def __init__(self, complete: Completion) -> None:
        self.complete = complete
        self.response: Response = GOOD
        self._claim = threading.Lock()

    def started(self) -> Response | None:
        """Called once the thread was started: the response when the work already ended."""
        if self._claim.acquire(False):
            return None
        return self.response

    def finish(self, response: Response) -> None:
        """Called once by the worker with the command's response."""
        self.response = response
        if not self._claim.acquire(False):  # `started` already returned None
            self.complete(response)


class _Submission:
    """One command handed to an asynchronous back-end; it is the back-end's ``done`` callback.

    The back-end may call it before ``submit_*`` returns (on the caller's thread, or on its
    own thread racing with the return), or any time later. Exactly one of two things must
    happen: `execute` returns the response, or ``complete`` is called with it. Both sides
    claim a one-shot lock without blocking after their part is done (``done``: after storing
    the response); whoever claims it first lets the other one deliver.
    """

    __slots__ = (
        "_claim",
        "complete",
        "device",
        "length",
        "request",
        "residual",
        "response",
        "writing",
    )

    def __init__(
        self,
        device: BlockDevice,
        request: Request,
        complete: Completion,
        length: int,
        residual: int,
        writing: bool,
    ) -> None:
        self.device = device
        self.request = request
        self.complete = complete
        self.length = length  # bytes moved: the reader/writer advances by this much on success
        self.residual = residual
        self.writing = writing
        self.response: Response = GOOD
        self._claim = threading.Lock()

    def submitted(self) -> Response | None:
        """Called once ``submit_*`` returned: the response when ``done`` already ran (then
        it will not call ``complete``), else None (``done`` calls ``complete`` later)."""
        if self._claim.acquire(False):
            return None
        return self.response

    def __call__(self, error: BackendError | None) -> None:
        device = self.device
        try:
            try:
                if error is None and self.length and not self.residual:
                    # The common outcome, inline (paid per request): all moved, GOOD.
                    request = self.request
                    stream = request.data_out if self.writing else request.data_in
                    assert stream is not None
                    stream.advance(self.length)
                    response = GOOD
                else:
                    response = self._outcome(error)
            except Exception:  # never let the back-end's thread see an exception
                logger.exception("completing a back-end request failed")
                response = device.error_response(_INTERNAL_FAILURE, self.request)
            self.response = response
            if not self._claim.acquire(False):  # `submitted` already returned None
                self.complete(response)
        finally:
            # `request_finished`, inline.
            with device._idle_lock:
                device._in_flight -= 1
                if not device._in_flight and device._idle_waiters:
                    device._idle.notify_all()

    def _outcome(self, error: BackendError | None) -> Response:
        request = self.request
        if error is not None:
            return self.device.error_response(backend_error(error, self.writing), request)
        if self.length:
            stream = request.data_out if self.writing else request.data_in
            assert stream is not None
            stream.advance(self.length)
        residual = self.residual
        return Response(Status.GOOD, b"", residual) if residual else GOOD


def nowait_reads_work(backend: StorageBackend) -> bool:
    """Whether ``backend.read_nowait`` can say "not cached" rather than just block.

    A file system without ``RWF_NOWAIT`` (tmpfs: EOPNOTSUPP) makes `FileBackend.read_nowait`
    raise, catch and fall back to a blocking read on every call, which costs more than the
    read itself; such a device reads inline instead, which is what the fallback did anyway.
    A back-end may say so itself with a ``nowait_supported`` attribute; a `FileBackend` is
    probed with a one-byte read.
    """
    declared = getattr(backend, "nowait_supported", None)
    if isinstance(declared, bool):
        return declared
    if not isinstance(backend, FileBackend):
        return True
    try:
        os.preadv(backend.fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    except OSError as e:
        return e.errno != errno.EOPNOTSUPP
    return True


class BlockDevice(LogicalUnit):
    """A direct-access block device (peripheral type 00h) backed by ``backend``.

    ``io_pool``: when given, reads go through ``backend.read_nowait`` first and whatever it
    could not serve without blocking is finished on a pool thread (``execute`` then returns
    None and calls ``complete`` later). Without it every command completes inline.

    Attributes without a leading underscore are the state the command modules read and
    update; they are not meant for other callers.
    """

    def __init__(
        self,
        backend: StorageBackend,
        options: BlockDeviceOptions | None = None,
        *,
        io_pool: IoWorkerPool | None = None,
    ) -> None:
        self.backend = backend
        self.options = options = options or BlockDeviceOptions()
        self.block_size = options.block_size
        self.shift = self.block_size.bit_length() - 1
        self.nblocks = backend.size >> self.shift
        self.read_only = options.read_only or backend.read_only
        self.mode = ModePages(options.write_cache, options.descriptor_sense)
        self.durable = not options.write_cache
        self.ua = UnitAttentions()
        self.reservation: Hashable | None = None
        self.prevent: set[Hashable] = set()
        self.medium_present = True
        self.pr = PersistentReservations()  # persistent reservations (SPC-4 5.12)
        #: Set while a SANITIZE runs on its worker thread (SBC-4 4.11; see `sanitizing`).
        self.sanitize_progress: SanitizeProgress | None = None
        self.lun = 0
        self.lister: LunLister = lambda: [self.lun]
        #: Whether READ/WRITE/SYNCHRONIZE CACHE go through ``submit_*`` (remote storage).
        self.asynchronous = backend.asynchronous
        #: An asynchronous back-end may send a batch's requests together (`begin_batch`).
        self.batches = self.asynchronous
        self._in_flight = 0  # submitted requests whose completion has not finished
        # The hot path takes the lock itself (a Condition's own `with` is two Python-level
        # calls per use); only waiting and notifying go through the Condition.
        self._idle_lock = threading.Lock()
        self._idle = threading.Condition(self._idle_lock)
        self._idle_waiters = 0  # threads in `wait_idle`: only then is there anyone to notify
        # Reads try the page cache without blocking only where that can work; the pool then
        # finishes the misses. An asynchronous back-end needs no pool: it has many requests
        # in flight by itself.
        self._pool = (
            io_pool
            if io_pool is not None and not self.asynchronous and nowait_reads_work(backend)
            else None
        )
        # Nexuses that may take the hot path: no unit attention pending, no conflict.
        self._fast: set[Hashable] = set()
        self.commands = self._supported_commands()
        self._handlers: list[Handler] = self._build_handlers()
        register_device(self)  # EXTENDED COPY finds the target's other LUs through this

    def begin_batch(self) -> None:
        """Let the back-end hold this batch's submissions back (`StorageBackend.plug`)."""
        self.backend.plug()

    def end_batch(self) -> None:
        """Send what the back-end held back during the batch."""
        self.backend.unplug()

    @property
    def sanitizing(self) -> bool:
        """Whether a SANITIZE is in progress (IMMED or not): the LU is NOT READY."""
        return self.sanitize_progress is not None

    # -- configuration -------------------------------------------------------------------

    def _supported_commands(self) -> tuple[CommandInfo, ...]:
        return supported_commands(self.options)

    def _build_handlers(self) -> list[Handler]:
        from scsi_emulation.extended_copy import COPY_WORKER_COMMANDS
        from scsi_emulation.sbc_commands import SBC_COMMANDS, SBC_WORKER_COMMANDS
        from scsi_emulation.spc_commands import SPC_COMMANDS

        functions: dict[tuple[int, int | None], CommandFunction] = {**SPC_COMMANDS, **SBC_COMMANDS}
        workers = {**SANITIZE_WORKER_COMMANDS, **SBC_WORKER_COMMANDS, **COPY_WORKER_COMMANDS}
        handlers: list[Handler] = [self._invalid_opcode] * 256
        by_opcode: dict[int, dict[int, Handler]] = {}
        for info in self.commands:
            key = (info.opcode, info.service_action)
            handler: Handler
            worker = workers.get(key)
            if worker is not None:  # they may run on a thread of their own and complete later
                handler = functools.partial(self._checked_submission, worker, info.usage)
            else:
                fn = functions.get(key)
                if fn is None:
                    continue
                if key == (Opcode.REQUEST_SENSE, None):
                    handler = functools.partial(self._request_sense, fn, info.usage)
                else:
                    handler = functools.partial(self._checked, fn, info.usage)
            if info.service_action is None:
                handlers[info.opcode] = handler
            else:
                by_opcode.setdefault(info.opcode, {})[info.service_action] = handler
        for opcode, actions in by_opcode.items():
            handlers[opcode] = functools.partial(self._by_service_action, actions)
        # READ/WRITE: local storage reads and writes inline; an asynchronous back-end is
        # submitted to (chosen here, once, so that neither path pays for the other).
        if self.asynchronous:
            hot = _rw_handlers(self.submit_read, submit_write=self.submit_write)
        else:
            hot = _rw_handlers(self.read, write=self.write)
        for opcode, handler in hot.items():
            handlers[opcode] = handler
        if self.asynchronous:
            # The commands whose only I/O is one write or one flush submit it too; the other
            # commands (VERIFY with BYTCHK, COMPARE AND WRITE, UNMAP...) keep the blocking
            # calls, which an asynchronous back-end also provides.
            submitting: dict[int, Callable[[BlockDevice, Request, Completion], Response | None]] = {
                Opcode.SYNCHRONIZE_CACHE_10: BlockDevice._synchronize_cache,
                Opcode.SYNCHRONIZE_CACHE_16: BlockDevice._synchronize_cache,
                Opcode.WRITE_AND_VERIFY_10: BlockDevice._write_and_verify,
                Opcode.WRITE_AND_VERIFY_12: BlockDevice._write_and_verify,
                Opcode.WRITE_AND_VERIFY_16: BlockDevice._write_and_verify,
            }
            for info in self.commands:
                method = submitting.get(info.opcode)
                if method is not None and info.service_action is None:
                    handlers[info.opcode] = functools.partial(
                        self._checked_submission, method, info.usage
                    )
        # Every device: long work (`run_in_background`) is in flight on local files too.
        for opcode in _WAIT_FOR_IN_FLIGHT:
            handlers[opcode] = functools.partial(self._after_in_flight, handlers[opcode])
        return handlers

    def _after_in_flight(
        self, handler: Handler, request: Request, complete: Completion
    ) -> Response | None:
        """Run a read-modify-write command once nothing else writes to the LU (it is atomic:
        SBC-4 5.3, 5.8); bounded, so a stuck back-end ends it in an error, not a hang."""
        if self._in_flight and not self.wait_idle(IN_FLIGHT_TIMEOUT):
            logger.error("LUN %d: submitted requests did not complete in time", self.lun)
            raise _INTERNAL_FAILURE
        return handler(request, complete)

    def _checked(
        self, fn: CommandFunction, usage: bytes, request: Request, complete: Completion
    ) -> Response:
        check_cdb(request.cdb, usage)
        return fn(self, request)

    def _request_sense(
        self, fn: CommandFunction, usage: bytes, request: Request, complete: Completion
    ) -> Response:
        """REQUEST SENSE: during a sanitize (no unit attention pending) its progress."""
        check_cdb(request.cdb, usage)
        progress = self.sanitize_progress
        if progress is not None and self.ua.peek(request.nexus) is None:
            return request_sense_while_sanitizing(self, request, progress)
        return fn(self, request)

    def _checked_submission(
        self,
        method: Callable[[BlockDevice, Request, Completion], Response | None],
        usage: bytes,
        request: Request,
        complete: Completion,
    ) -> Response | None:
        check_cdb(request.cdb, usage)
        return method(self, request, complete)

    def _by_service_action(
        self, actions: dict[int, Handler], request: Request, complete: Completion
    ) -> Response | None:
        handler = actions.get(request.cdb[1] & 0x1F)
        if handler is None:
            raise invalid_field_in_cdb(1, 4)  # SPC-5 4.2.5.1: unsupported service action
        return handler(request, complete)

    def _invalid_opcode(self, request: Request, complete: Completion) -> Response:
        raise _INVALID_OPCODE

    def attach(self, lun: int, lister: LunLister) -> None:
        self.lun = lun
        self.lister = lister

    # -- execution -----------------------------------------------------------------------

    def execute(self, request: Request, complete: Completion) -> Response | None:
        try:
            if request.nexus not in self._fast:
                refused = self._admit(request)
                if refused is not None:
                    return refused
            return self._handlers[request.cdb[0]](request, complete)
        except CommandError as e:
            try:
                return self.error_response(e, request)
            finally:
                # Some errors are shared module-level instances; a re-raised instance keeps
                # prepending the new frames to the traceback it holds, which would pin every
                # failed command's Request and data buffers (guest memory) forever.
                e.__traceback__ = None

    def error_response(self, error: CommandError, request: Request) -> Response:
        """CHECK CONDITION for ``error``, in the sense format D_SENSE selects, with residual."""
        writer, reader = request.data_in, request.data_out
        residual = writer.remaining() if writer else reader.remaining() if reader else 0
        return error.response(self.mode.d_sense, residual)

    def _admit(self, request: Request) -> Response | None:
        """The checks that come before a command runs, for a nexus not on the fast list."""
        nexus = request.nexus
        cdb = request.cdb
        if not cdb:
            raise _INVALID_OPCODE
        op = cdb[0]
        code = self.ua.peek(nexus)
        if code is not None and op not in _UA_EXEMPT:
            self.ua.pop(nexus)
            return check_condition(SenseKey.UNIT_ATTENTION, code, None, self.mode.d_sense)
        held = self.reservation
        if (
            held is not None
            and held != nexus
            and op not in _RESERVATION_EXEMPT
            # PREVENT ALLOW with PREVENT=0 is allowed (SPC-2 5.5.1)
            and not (op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL and len(cdb) > 4 and not cdb[4] & 3)
        ):
            return _RESERVATION_CONFLICT
        pr = self.pr
        if pr.reservation is not None and pr.conflicts(nexus, cdb):
            return _RESERVATION_CONFLICT
        sanitize = self.sanitize_progress
        if sanitize is not None and op not in SANITIZE_PERMITTED:
            raise in_progress_error(sanitize)
        if not self.medium_present and op not in _NO_MEDIUM_OK:
            raise CommandError(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
        if (
            code is None
            and (held is None or held == nexus)
            and self.medium_present
            and pr.has_access(nexus)
            and sanitize is None
        ):
            self._fast.add(nexus)
        return None

    def invalidate_fast_path(self) -> None:
        """Make every nexus go through the admission checks again (state changed)."""
        self._fast.clear()

    # -- hot path: READ / WRITE --------------------------------------------------------

    def read(self, request: Request, complete: Completion, lba: int, n: int) -> Response | None:
        """Read ``n`` blocks at ``lba`` into the data-in buffer (SBC-4 5.15).

        A data-in buffer shorter than the transfer gets what fits (FCP-4 9.4.2 a); the
        residual is the unfilled part of the buffer.
        """
        nblocks = self.nblocks
        if lba + n > nblocks or lba >= nblocks:
            raise _LBA_OUT_OF_RANGE
        writer = request.data_in
        if writer is None:
            return GOOD
        capacity = writer.remaining()
        want = n << self.shift
        if want > capacity:
            want = capacity
        if want:
            offset = lba << self.shift
            try:
                if self._pool is None:
                    self.backend.read(offset, writer.buffers(want), want)
                else:
                    got = self.backend.read_nowait(offset, writer.buffers(want), want)
                    if got < want:
                        writer.advance(got)
                        self._read_later(request, complete, offset + got, want - got)
                        return None
            except BackendError as e:
                raise backend_error(e, writing=False) from e
            writer.advance(want)
        if want == capacity:
            return GOOD
        return Response(Status.GOOD, b"", capacity - want)

    def _read_later(self, request: Request, complete: Completion, offset: int, length: int) -> None:
        pool = self._pool
        assert pool is not None

        def job() -> None:
            writer = request.data_in
            assert writer is not None
            try:
                self.backend.read(offset, writer.buffers(length), length)
                writer.advance(length)
                left = writer.remaining()
                response = Response(Status.GOOD, b"", left) if left else GOOD
            except BackendError as e:
                response = self.error_response(backend_error(e, writing=False), request)
            except Exception:
                logger.exception("read job failed")
                response = self.error_response(
                    CommandError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE), request
                )
            complete(response)

        pool.submit(job)

    def write(self, request: Request, lba: int, n: int, fua: bool) -> Response:
        """Write ``n`` blocks at ``lba`` from the data-out buffer (SBC-4 5.40), blocking.

        Durable before GOOD when FUA is set or the write cache is off (WCE=0). A data-out
        buffer shorter than the transfer writes nothing (FCP-4 9.4.2 b).
        """
        if self.read_only:
            raise _WRITE_PROTECTED
        nblocks = self.nblocks
        if lba + n > nblocks or lba >= nblocks:
            raise _LBA_OUT_OF_RANGE
        reader = request.data_out
        if reader is None:
            if n:
                raise _SHORT_DATA_OUT
            return GOOD
        capacity = reader.remaining()
        want = n << self.shift
        if capacity < want:
            raise _SHORT_DATA_OUT
        if want:
            try:
                self.backend.write(
                    lba << self.shift, reader.buffers(want), want, fua or self.durable
                )
            except BackendError as e:
                raise backend_error(e, writing=True) from e
            reader.advance(want)
        left = capacity - want
        return Response(Status.GOOD, b"", left) if left else GOOD

    # -- asynchronous back-ends: submit, complete later ---------------------------------

    def _request_started(self) -> None:
        with self._idle_lock:
            self._in_flight += 1

    def request_finished(self) -> None:
        """A submitted request has delivered its response (called by its completion)."""
        with self._idle_lock:
            self._in_flight -= 1
            if not self._in_flight and self._idle_waiters:
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        """How many submitted requests have not completed yet."""
        return self._in_flight

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted request has completed; False on timeout."""
        with self._idle:
            self._idle_waiters += 1
            try:
                return self._idle.wait_for(lambda: not self._in_flight, timeout)
            finally:
                self._idle_waiters -= 1

    def run_in_background(
        self,
        request: Request,
        complete: Completion,
        work: Callable[[], None],
        good: Response,
        *,
        name: str,
        also_busy: Iterable[BlockDevice] = (),
    ) -> Response | None:
        """Run ``work``, a command's long I/O, on a thread of its own so that the caller's
        thread (an event loop serving every other command) does not wait for it.

        Call it after every check that can refuse the command. ``work`` raises `CommandError`
        for the sense the command ends with and must not touch the request's buffers: the
        residual is the one of ``good``, the response when it returns. Returns None (then
        ``complete`` is called once, from the worker) or, when the work ended first, the
        response. Until it ends, this LU and the ``also_busy`` ones count it in flight, so
        COMPARE AND WRITE, ORWRITE, SANITIZE and the aborting TMFs wait for it.
        """
        residual, d_sense = good.residual, self.mode.d_sense
        devices = [self]
        for other in also_busy:
            if all(other is not d for d in devices):
                devices.append(other)
        job = _BackgroundJob(complete)

        def worker() -> None:
            try:
                work()
                response = good
            except CommandError as e:
                response = e.response(d_sense, residual)
                e.__traceback__ = None  # shared instances must not pin this request
            except Exception:
                logger.exception("LUN %d: %s failed", self.lun, name)
                response = _INTERNAL_FAILURE.response(d_sense, residual)
            finally:
                # Idle again before the initiator hears the answer, so its next COMPARE AND
                # WRITE does not wait for this thread's last steps.
                for device in devices:
                    device.request_finished()
            try:
                job.finish(response)
            except Exception:
                logger.exception("LUN %d: completing %s failed", self.lun, name)

        for device in devices:
            device._request_started()
        try:
            threading.Thread(target=worker, name=f"{name}-lun{self.lun}", daemon=True).start()
        except RuntimeError as e:  # no thread could be started: nothing was done
            for device in devices:
                device.request_finished()
            logger.error("LUN %d: cannot start a %s worker: %s", self.lun, name, e)
            raise _INTERNAL_FAILURE from e
        return job.started()

    def submit_read(
        self, request: Request, complete: Completion, lba: int, n: int
    ) -> Response | None:
        """`read` through ``backend.submit_read``: None while it is in flight."""
        nblocks = self.nblocks
        if lba + n > nblocks or lba >= nblocks:
            raise _LBA_OUT_OF_RANGE
        writer = request.data_in
        if writer is None:
            return GOOD
        capacity = writer.remaining()
        want = n << self.shift
        if want > capacity:
            want = capacity
        if not want:
            return Response(Status.GOOD, b"", capacity) if capacity else GOOD
        op = _Submission(self, request, complete, want, capacity - want, False)
        with self._idle_lock:  # `_request_started`, inline
            self._in_flight += 1
        self.backend.submit_read(lba << self.shift, writer.buffers(want), want, op)
        # `op.submitted()`, inline: None unless ``done`` already ran.
        return None if op._claim.acquire(False) else op.response

    def submit_write(
        self, request: Request, complete: Completion, lba: int, n: int, fua: bool
    ) -> Response | None:
        """`write` through ``backend.submit_write``: None while it is in flight."""
        if self.read_only:
            raise _WRITE_PROTECTED
        nblocks = self.nblocks
        if lba + n > nblocks or lba >= nblocks:
            raise _LBA_OUT_OF_RANGE
        reader = request.data_out
        if reader is None:
            if n:
                raise _SHORT_DATA_OUT
            return GOOD
        capacity = reader.remaining()
        want = n << self.shift
        if capacity < want:
            raise _SHORT_DATA_OUT
        left = capacity - want
        if not want:
            return Response(Status.GOOD, b"", left) if left else GOOD
        op = _Submission(self, request, complete, want, left, True)
        with self._idle_lock:  # `_request_started`, inline
            self._in_flight += 1
        self.backend.submit_write(
            lba << self.shift, reader.buffers(want), want, fua or self.durable, op
        )
        return None if op._claim.acquire(False) else op.response  # `op.submitted()`

    def _write_and_verify(self, request: Request, complete: Completion) -> Response | None:
        """WRITE AND VERIFY(10/12/16) (SBC-4 5.43) as a durable submitted write: what the
        storage acknowledged durably is what the medium holds."""
        c = decode_block_cdb(request.cdb)
        if c.protect:  # no protection information on this LU (SBC-4 4.22)
            raise _PROTECT_FIELD
        if c.bytchk & 0b10:
            raise invalid_field_in_cdb(1, 2)
        return self.submit_write(request, complete, c.lba, c.length, True)

    def _synchronize_cache(self, request: Request, complete: Completion) -> Response | None:
        """SYNCHRONIZE CACHE(10/16) (SBC-4 5.28) as a submitted flush (the whole cache: the
        range only has to be valid)."""
        c = decode_block_cdb(request.cdb)
        self.check_range(c.lba, c.length)
        op = _Submission(self, request, complete, 0, 0, True)
        self._request_started()
        self.backend.submit_flush(op)
        return op.submitted()

    def check_range(self, lba: int, n: int) -> None:
        """LOGICAL BLOCK ADDRESS OUT OF RANGE unless ``lba``..``lba+n`` is on the medium."""
        if lba + n > self.nblocks or lba >= self.nblocks:
            raise _LBA_OUT_OF_RANGE

    def check_writable(self) -> None:
        """DATA PROTECT, WRITE PROTECTED on a read-only LU."""
        if self.read_only:
            raise _WRITE_PROTECTED

    def require_data_out(self, request: Request, length: int) -> None:
        """INVALID FIELD IN COMMAND INFORMATION UNIT unless ``length`` bytes of data-out exist."""
        reader = request.data_out
        if length and (reader is None or reader.remaining() < length):
            raise _SHORT_DATA_OUT

    # -- state changes -------------------------------------------------------------------

    def set_write_cache(self, enabled: bool) -> None:
        """WCE changed (MODE SELECT): with it off, every write is durable before GOOD."""
        self.durable = not enabled

    def resize(self) -> None:
        """Re-read the back-end size; tell every nexus CAPACITY DATA HAS CHANGED."""
        refresh = getattr(self.backend, "refresh_size", None)
        if callable(refresh):
            refresh()
        self.nblocks = self.backend.size >> self.shift
        self.establish_unit_attention(Asc.CAPACITY_DATA_HAS_CHANGED)

    def establish_unit_attention(self, code: Asc, nexus: Hashable | None = None) -> None:
        self.ua.establish(code, nexus)
        self._fast.clear()

    def set_medium(self, present: bool) -> None:
        """Load or eject the medium (removable LUs)."""
        self.medium_present = present
        self._fast.clear()
        if present:
            self.establish_unit_attention(Asc.NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED)

    def set_reservation(self, nexus: Hashable | None) -> None:
        """RESERVE(6) holder (None: released)."""
        self.reservation = nexus
        self._fast.clear()

    def task_management(
        self, function: TaskManagementFunction, tag: int = 0, nexus: Hashable = 0
    ) -> TmfResponse:
        f = TaskManagementFunction
        if function == f.LOGICAL_UNIT_RESET:
            self._reset(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        elif function in (f.TARGET_WARM_RESET, f.TARGET_COLD_RESET):
            self._reset(Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
        elif function == f.I_T_NEXUS_RESET:
            self.forget_nexus(nexus)
            self.establish_unit_attention(Asc.I_T_NEXUS_LOSS_OCCURRED, nexus)
        elif function == f.CLEAR_ACA:
            return TmfResponse.FUNCTION_REJECTED
        elif (
            function == f.QUERY_ASYNCHRONOUS_EVENT
            and self.ua.known(nexus)
            and self.ua.peek(nexus) is not None
        ):
            return TmfResponse.FUNCTION_SUCCEEDED
        # ABORT TASK / ABORT TASK SET / CLEAR TASK SET: every command here has completed by
        # the time a TMF can be processed, or is a pool read or a submitted request that will
        # complete on its own; a submitted one cannot be recalled from the storage, so an
        # abort waits until it has completed (as QEMU's does for its own requests), and so
        # do the resets above: nothing they ended may still reach the medium afterwards.
        if function in _WAITING_TMFS and self._in_flight and not self.wait_idle(IN_FLIGHT_TIMEOUT):
            logger.error("LUN %d: %s: submitted requests did not complete", self.lun, function.name)
            return TmfResponse.FUNCTION_REJECTED
        return TmfResponse.FUNCTION_COMPLETE

    def _reset(self, code: Asc) -> None:
        """LOGICAL UNIT RESET (SAM-5 7.7): release RESERVE(6), clear PREVENT, unit attention."""
        self.reservation = None
        self.prevent.clear()
        self.establish_unit_attention(code)

    def forget_nexus(self, nexus: Hashable) -> None:
        if self.reservation == nexus:
            self.reservation = None
        self.prevent.discard(nexus)
        self.ua.forget(nexus)
        self._fast.clear()

    def close(self) -> None:
        self.backend.close()
