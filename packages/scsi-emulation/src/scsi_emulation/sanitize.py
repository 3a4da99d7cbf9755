"""SANITIZE (SBC-4 5.30): OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE.

Holds the parameter checks, the work itself (an overwrite pass over every block, or a discard
of the whole LU, which reads back as zeros because LBPRZ is 1), its progress, and the rule for
the time it runs. OVERWRITE and BLOCK ERASE always run on a worker thread of their own (the
caller's thread is an event loop serving every other command), and while they run every
command but INQUIRY, REPORT LUNS and REQUEST SENSE ends NOT READY, SANITIZE IN PROGRESS with a
progress indication, whether IMMED is set or not (SBC-4 4.11, 5.30.1); REQUEST SENSE reports
that sense and the progress. With IMMED=1 the command ends GOOD at once; with IMMED=0
``execute`` returns None and the worker calls ``complete`` once, when the work has ended.
CRYPTOGRAPHIC ERASE is not offered: there is no encryption key to change. BLOCK ERASE is
offered only on thin-provisioned LUs (the command table filters it), because it leaves every
block deallocated. There is no sanitize failure mode: a failed sanitize ends in MEDIUM ERROR,
WRITE ERROR, and EXIT FAILURE MODE (no work) is accepted inline as a no-op.
Knows nothing about transports (and nothing of trio: stdlib threads only); it uses the
device's back-end directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode, SanitizeServiceAction
from scsi_core.sense import Asc, SenseData, SenseKey
from scsi_core.status import Status
from scsi_core.target import Completion, Request, Response

from scsi_emulation.backend import BackendError
from scsi_emulation.errors import (
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from scsi_emulation.transfer import data_out_residual, receive_parameters, send_data

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = [
    "SANITIZE_COMMANDS",
    "SANITIZE_IN_PROGRESS",
    "SANITIZE_PERMITTED",
    "SANITIZE_WORKER_COMMANDS",
    "SanitizeProgress",
    "in_progress_error",
    "request_sense_while_sanitizing",
]

logger = logging.getLogger(__name__)

#: Commands that still run while a sanitize is in progress (SBC-4 4.11: the rest get
#: NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS).
SANITIZE_PERMITTED = frozenset((Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE))
SANITIZE_IN_PROGRESS = CommandError(
    SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS
)

_IMMED = 0x80
_OVERWRITE_HEADER = 4
_CHUNK = 1 << 20  # bytes written per back-end call during an overwrite
_ERASE_CHUNK = 1 << 30  # bytes discarded per back-end call during a block erase (progress steps)
_SKSV = 0x800000  # SENSE KEY SPECIFIC VALID
_WRITE_ERROR = CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
_INTERNAL_FAILURE = CommandError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
#: How long a sanitize waits for requests submitted to an asynchronous back-end before it starts
#: (a write already on its way must not land on the medium after the overwrite).
_IN_FLIGHT_TIMEOUT = 60.0


class SanitizeProgress:
    """How far the running sanitize got: ``done`` of ``total`` bytes.

    Written by the worker thread, read by the caller's thread (single int stores: a reader
    sees either value, and progress is only an estimate).
    """

    __slots__ = ("done", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def indication(self) -> int:
        """PROGRESS INDICATION (SPC-5 4.4.2.4.4): the fraction done, in 65536ths."""
        if self.total <= 0:
            return 0
        return min(self.done * 0x10000 // self.total, 0xFFFF)

    def sense(self) -> SenseData:
        """NOT READY, SANITIZE IN PROGRESS, with the progress indication (SKSV=1)."""
        code = Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS
        return SenseData(
            key=SenseKey.NOT_READY,
            asc=code.asc,
            ascq=code.ascq,
            sks=_SKSV | self.indication(),
        )


class _InProgressError(CommandError):
    """SANITIZE_IN_PROGRESS carrying the progress indication (any command refused)."""

    def __init__(self, progress: SanitizeProgress) -> None:
        super().__init__(SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)
        self.progress = progress

    def response(self, descriptor: bool = False, residual: int = 0) -> Response:
        sense = self.progress.sense().to_bytes(descriptor)
        return Response(Status.CHECK_CONDITION, sense, residual)


def in_progress_error(progress: SanitizeProgress) -> CommandError:
    """The error a command other than INQUIRY / REPORT LUNS / REQUEST SENSE ends with."""
    return _InProgressError(progress)


def request_sense_while_sanitizing(
    dev: BlockDevice, request: Request, progress: SanitizeProgress
) -> Response:
    """REQUEST SENSE during a sanitize with no unit attention pending (SPC-5 6.39: the
    sense that describes the LU's state, with the progress indication)."""
    cdb = request.cdb
    sense = progress.sense().to_bytes(bool(cdb[1] & 0x01))
    return send_data(request, sense, cdb[4])


def _parameter_length(request: Request) -> int:
    return int.from_bytes(request.cdb[7:9], "big")


def _require_no_parameters(request: Request) -> None:
    if _parameter_length(request):
        # BLOCK ERASE / EXIT FAILURE MODE take no parameter list (SBC-4 5.30.1).
        raise invalid_field_in_cdb(7)


Work = Callable[[SanitizeProgress], None]


def _start(
    dev: BlockDevice, request: Request, complete: Completion, total: int, work: Work
) -> Response | None:
    """Run ``work`` on a worker thread while the LU reports SANITIZE IN PROGRESS.

    IMMED=1: GOOD now. IMMED=0: None now, ``complete`` called once when the work ended.
    The worker never touches the request's buffers: the residual is taken here.
    """
    immed = bool(request.cdb[1] & _IMMED)
    good = data_out_residual(request)
    residual, d_sense = good.residual, dev.mode.d_sense
    progress = SanitizeProgress(total)
    # One-shot claim (as for submitted requests): ``complete`` only after None was returned;
    # work that ended before that is answered inline instead.
    claim = threading.Lock()
    outcome: list[Response] = []

    def worker() -> None:
        response = good
        try:
            if dev.in_flight and not dev.wait_idle(_IN_FLIGHT_TIMEOUT):
                logger.error("LUN %d: sanitize: submitted requests did not complete", dev.lun)
                response = _INTERNAL_FAILURE.response(d_sense, residual)
            else:
                work(progress)
        except BackendError as e:
            logger.warning("LUN %d: sanitize failed: %s", dev.lun, e)
            response = _WRITE_ERROR.response(d_sense, residual)
        except Exception:
            logger.exception("LUN %d: sanitize failed", dev.lun)
            response = _INTERNAL_FAILURE.response(d_sense, residual)
        finally:
            # Ready again before the initiator hears GOOD, so its next command runs.
            dev.sanitize_progress = None
            dev.invalidate_fast_path()
        if immed:
            if response is not good:
                logger.warning("LUN %d: sanitize (IMMED) ended in error", dev.lun)
            return
        outcome.append(response)
        if claim.acquire(False):  # `_start` has not returned yet: it answers inline
            return
        try:
            complete(response)
        except Exception:
            logger.exception("LUN %d: completing a sanitize failed", dev.lun)

    dev.sanitize_progress = progress
    dev.invalidate_fast_path()
    try:
        threading.Thread(target=worker, name=f"sanitize-lun{dev.lun}", daemon=True).start()
    except RuntimeError as e:  # no thread could be started: nothing was done
        dev.sanitize_progress = None
        dev.invalidate_fast_path()
        logger.error("LUN %d: cannot start the sanitize worker: %s", dev.lun, e)
        raise _INTERNAL_FAILURE from e
    if immed:
        return good
    return None if claim.acquire(False) else outcome[0]


def _overwrite_block(params: bytes, block_size: int) -> bytes:
    """The block an overwrite leaves behind, from the OVERWRITE parameter list (5.30.2.2)."""
    flags = params[0]
    count = flags & 0x1F
    if count == 0:
        raise invalid_field_in_parameter_list(0, 4)
    if flags & 0x60:  # TEST: only 00b (normal operation) is supported
        raise invalid_field_in_parameter_list(0, 6)
    length = int.from_bytes(params[2:4], "big")
    if length == 0 or length > block_size or length > len(params) - _OVERWRITE_HEADER:
        raise invalid_field_in_parameter_list(2)
    pattern = params[_OVERWRITE_HEADER : _OVERWRITE_HEADER + length]
    block = (pattern * (block_size // length + 1))[:block_size]
    # With INVERT, passes alternate pattern / inverted pattern; only the last pass remains.
    if flags & 0x80 and count % 2 == 0:
        block = bytes(b ^ 0xFF for b in block)
    return block


def overwrite(dev: BlockDevice, request: Request, complete: Completion) -> Response | None:
    """SANITIZE, OVERWRITE: the parameter list is 5 .. block size + 4 bytes long."""
    length = _parameter_length(request)
    if not _OVERWRITE_HEADER < length <= dev.block_size + _OVERWRITE_HEADER:
        raise invalid_field_in_cdb(7)
    dev.check_writable()
    block = _overwrite_block(receive_parameters(request, length), dev.block_size)
    chunk = memoryview(block * max(_CHUNK // dev.block_size, 1))
    total = dev.nblocks << dev.shift
    durable = dev.durable

    def work(progress: SanitizeProgress) -> None:
        offset = 0
        while offset < total:
            n = min(len(chunk), total - offset)
            dev.backend.write(offset, [chunk[:n]], n, durable)
            offset += n
            progress.done = offset
        dev.backend.flush()

    return _start(dev, request, complete, total, work)


def block_erase(dev: BlockDevice, request: Request, complete: Completion) -> Response | None:
    """SANITIZE, BLOCK ERASE: every block deallocated (reads return zeros, WABEREQ=01b)."""
    _require_no_parameters(request)
    dev.check_writable()
    total = dev.nblocks << dev.shift

    def work(progress: SanitizeProgress) -> None:
        offset = 0
        while offset < total:
            n = min(_ERASE_CHUNK, total - offset)
            dev.backend.discard(offset, n)
            offset += n
            progress.done = offset
        dev.backend.flush()

    return _start(dev, request, complete, total, work)


def exit_failure_mode(dev: BlockDevice, request: Request) -> Response:
    """SANITIZE, EXIT FAILURE MODE: there is no failure mode to leave; GOOD (inline: no work)."""
    _require_no_parameters(request)
    dev.check_writable()
    return data_out_residual(request)


CommandFunction = Callable[["BlockDevice", Request], Response]
WorkerCommand = Callable[["BlockDevice", Request, Completion], "Response | None"]

#: The sanitize service actions that complete inline (merged into the SPC command table).
SANITIZE_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.SANITIZE, SanitizeServiceAction.EXIT_FAILURE_MODE): exit_failure_mode,
}

#: The ones that run on a worker thread: `BlockDevice` passes them ``complete``.
SANITIZE_WORKER_COMMANDS: dict[tuple[int, int | None], WorkerCommand] = {
    (Opcode.SANITIZE, SanitizeServiceAction.OVERWRITE): overwrite,
    (Opcode.SANITIZE, SanitizeServiceAction.BLOCK_ERASE): block_erase,
}
