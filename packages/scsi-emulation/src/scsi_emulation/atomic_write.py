"""WRITE ATOMIC(16) (SBC-4 5.48) and the atomic limits of the Block Limits VPD page (6.6.4).

Holds the command function and `ATOMIC_WRITE_COMMANDS`. Atomicity here means what the emulation
can promise: the write is one back-end call made while no other command of the target runs
(commands execute one at a time on the caller's thread), so other commands see all of it or
none of it. With an `IoWorkerPool`, a read finishing on a pool thread at that moment could see
a page-sized part of it; and a crash mid-write is only as atomic as the host file system makes
one ``pwritev``. Knows nothing about transports.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode
from scsi_core.target import Request, Response

from scsi_emulation.errors import invalid_field_in_cdb

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = ["ATOMIC_WRITE_COMMANDS", "write_atomic_16"]

# flags (WRPROTECT|DPO|FUA), LBA, ATOMIC BOUNDARY, TRANSFER LENGTH, GROUP NUMBER
_CDB = struct.Struct(">xBQHHB")


def write_atomic_16(dev: BlockDevice, request: Request) -> Response:
    """WRITE ATOMIC(16): ATOMIC BOUNDARY must be 0 (MAXIMUM ATOMIC BOUNDARY SIZE is 0, which the
    command's usage data already enforces); TRANSFER LENGTH at most MAXIMUM ATOMIC TRANSFER
    LENGTH; alignment and granularity are unrestricted (0 in the VPD page)."""
    flags, lba, _boundary, n, _group = _CDB.unpack_from(request.cdb)
    dev.check_writable()
    dev.check_range(lba, n)
    if n > dev.options.atomic_transfer_limit:
        raise invalid_field_in_cdb(12)
    return dev.write(request, lba, n, bool(flags & 0x08))


CommandFunction = Callable[["BlockDevice", Request], Response]

ATOMIC_WRITE_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.WRITE_ATOMIC_16, None): write_atomic_16,
}
