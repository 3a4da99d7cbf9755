"""READ DEFECT DATA(10) and (12) (SBC-3 5.16, 5.17): an emulated medium has no defects.

Holds the two command functions ``(device, request) -> Response`` and `DEFECT_DATA_COMMANDS`.
The answer is the defect list header with an empty list, PLISTV/GLISTV set for the lists that
were asked for, in the requested format. Knows nothing about storage or transports.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode
from scsi_core.target import Request, Response

from scsi_emulation.errors import invalid_field_in_cdb
from scsi_emulation.transfer import send_data

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = ["DEFECT_DATA_COMMANDS"]

_HEADER_10 = struct.Struct(">xBH")  # reserved, PLISTV|GLISTV|FORMAT, DEFECT LIST LENGTH
_HEADER_12 = struct.Struct(">xBxxI")  # ..., reserved, DEFECT LIST LENGTH (4 bytes)
_PLIST = 0x10
_GLIST = 0x08
# DEFECT LIST FORMAT values (SBC-3 6.2.1 table 112): 000b short block, 011b long block,
# 100b bytes from index, 101b physical sector, 110b vendor specific.
_FORMATS = frozenset((0, 3, 4, 5, 6))


def _flags(request: Request, byte: int) -> int:
    value = request.cdb[byte]
    fmt = value & 0x07
    if fmt not in _FORMATS:
        raise invalid_field_in_cdb(byte, 2)
    return (value & (_PLIST | _GLIST)) | fmt


def read_defect_data_10(dev: BlockDevice, request: Request) -> Response:
    """READ DEFECT DATA(10): header only (DEFECT LIST LENGTH 0)."""
    flags = _flags(request, 2)
    allocation = int.from_bytes(request.cdb[7:9], "big")
    return send_data(request, _HEADER_10.pack(flags, 0), allocation)


def read_defect_data_12(dev: BlockDevice, request: Request) -> Response:
    """READ DEFECT DATA(12): header only (DEFECT LIST LENGTH 0)."""
    flags = _flags(request, 1)
    allocation = int.from_bytes(request.cdb[6:10], "big")
    return send_data(request, _HEADER_12.pack(flags, 0), allocation)


CommandFunction = Callable[["BlockDevice", Request], Response]

DEFECT_DATA_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.READ_DEFECT_DATA_10, None): read_defect_data_10,
    (Opcode.READ_DEFECT_DATA_12, None): read_defect_data_12,
}
