"""SANITIZE (SBC-4 5.30): OVERWRITE, BLOCK ERASE and EXIT FAILURE MODE.

Holds the parameter checks, the work itself (an overwrite pass over every block, or one
discard of the whole LU, which reads back as zeros because LBPRZ is 1), and the IMMED rule:
with IMMED=1 the command ends GOOD at once and the work runs on a thread, while every command
but INQUIRY, REPORT LUNS and REQUEST SENSE ends NOT READY, SANITIZE IN PROGRESS (SBC-4
4.11, 5.30.1). Without IMMED the work is done before the command completes, like every other
command here. CRYPTOGRAPHIC ERASE is not offered: there is no encryption key to change.
BLOCK ERASE is offered only on thin-provisioned LUs (the command table filters it), because
it leaves every block deallocated. There is no sanitize failure mode: a failed sanitize ends
in MEDIUM ERROR, WRITE ERROR, and EXIT FAILURE MODE is accepted as a no-op.
Knows nothing about transports; it uses the device's back-end directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode, SanitizeServiceAction
from scsi_core.sense import Asc, SenseKey
from scsi_core.target import Request, Response

from scsi_emulation.backend import BackendError
from scsi_emulation.errors import (
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from scsi_emulation.transfer import data_out_residual, receive_parameters

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = ["SANITIZE_COMMANDS", "SANITIZE_IN_PROGRESS", "SANITIZE_PERMITTED"]

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


def _parameter_length(request: Request) -> int:
    return int.from_bytes(request.cdb[7:9], "big")


def _require_no_parameters(request: Request) -> None:
    if _parameter_length(request):
        # BLOCK ERASE / EXIT FAILURE MODE take no parameter list (SBC-4 5.30.1).
        raise invalid_field_in_cdb(7)


def _run(dev: BlockDevice, request: Request, work: Callable[[], None]) -> Response:
    """Do ``work`` now, or (IMMED) on a thread while the LU reports SANITIZE IN PROGRESS."""
    if not request.cdb[1] & _IMMED:
        try:
            work()
        except BackendError as e:
            logger.warning("sanitize failed: %s", e)
            raise CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from e
        return data_out_residual(request)
    dev.sanitizing = True
    dev.invalidate_fast_path()

    def background() -> None:
        try:
            work()
        except Exception:
            logger.exception("background sanitize failed")
        finally:
            dev.sanitizing = False
            dev.invalidate_fast_path()

    threading.Thread(target=background, name="sanitize", daemon=True).start()
    return data_out_residual(request)


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


def overwrite(dev: BlockDevice, request: Request) -> Response:
    """SANITIZE, OVERWRITE: the parameter list is 5 .. block size + 4 bytes long."""
    length = _parameter_length(request)
    if not _OVERWRITE_HEADER < length <= dev.block_size + _OVERWRITE_HEADER:
        raise invalid_field_in_cdb(7)
    dev.check_writable()
    block = _overwrite_block(receive_parameters(request, length), dev.block_size)
    chunk = memoryview(block * max(_CHUNK // dev.block_size, 1))
    total = dev.nblocks << dev.shift
    durable = dev.durable

    def work() -> None:
        offset = 0
        while offset < total:
            n = min(len(chunk), total - offset)
            dev.backend.write(offset, [chunk[:n]], n, durable)
            offset += n
        dev.backend.flush()

    return _run(dev, request, work)


def block_erase(dev: BlockDevice, request: Request) -> Response:
    """SANITIZE, BLOCK ERASE: every block deallocated (reads return zeros, WABEREQ=01b)."""
    _require_no_parameters(request)
    dev.check_writable()
    total = dev.nblocks << dev.shift

    def work() -> None:
        dev.backend.discard(0, total)
        dev.backend.flush()

    return _run(dev, request, work)


def exit_failure_mode(dev: BlockDevice, request: Request) -> Response:
    """SANITIZE, EXIT FAILURE MODE: there is no failure mode to leave; GOOD."""
    _require_no_parameters(request)
    dev.check_writable()
    return data_out_residual(request)


CommandFunction = Callable[["BlockDevice", Request], Response]

SANITIZE_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.SANITIZE, SanitizeServiceAction.OVERWRITE): overwrite,
    (Opcode.SANITIZE, SanitizeServiceAction.BLOCK_ERASE): block_erase,
    (Opcode.SANITIZE, SanitizeServiceAction.EXIT_FAILURE_MODE): exit_failure_mode,
}
