"""How many bytes a block command moves, for checking it against the iSCSI Expected Data
Transfer Length (RFC 7143 section 11.4.5: residual overflow and underflow).

The SCSI layer fills or drains whatever buffer it is given; only the transport knows the
EDTL, so only it can tell an overflow (the CDB asks for more than the EDTL) from an underflow.
This module derives the CDB's transfer length for the SBC commands that carry a block count;
other commands return None and are judged by what they actually transferred.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from scsi_core.cdb import CdbError, decode_block_cdb
from scsi_core.opcodes import Opcode

__all__ = ["Direction", "Transfer", "expected_transfer", "with_transfer_length"]


class Direction(enum.Enum):
    """Which way the command's data moves."""

    IN = "in"  # target to initiator (Data-In)
    OUT = "out"  # initiator to target (Data-Out)


@dataclass(frozen=True, slots=True)
class Transfer:
    """The data a CDB asks to move.

    `strict`: a different EDTL must fail the command. `block_size` is set (non-zero) when the
    transfer is a count of blocks in the CDB's TRANSFER LENGTH field, so a shorter copy of the
    CDB can be made with `with_transfer_length`.
    """

    direction: Direction
    length: int
    strict: bool = False
    block_size: int = 0


_READS = frozenset({Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16})
_WRITES = frozenset(
    {
        Opcode.WRITE_6,
        Opcode.WRITE_10,
        Opcode.WRITE_12,
        Opcode.WRITE_16,
        Opcode.WRITE_AND_VERIFY_10,
        Opcode.WRITE_AND_VERIFY_12,
        Opcode.WRITE_AND_VERIFY_16,
        Opcode.ORWRITE_16,
    }
)
_VERIFIES = frozenset({Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16})
# WRITE SAME is left to the device server: a write-protected LU must answer DATA PROTECT
# whatever the EDTL, and a Data-Out other than one block is its ILLEGAL REQUEST to give.
_BLOCK_TRANSFERS = _READS | _WRITES | _VERIFIES | {Opcode.COMPARE_AND_WRITE}


def expected_transfer(cdb: bytes | bytearray | memoryview, block_size: int) -> Transfer | None:
    """The transfer a block command's CDB asks for, or None when this module cannot tell."""
    if not cdb:
        return None
    opcode = cdb[0]
    if opcode not in _BLOCK_TRANSFERS:
        return None
    try:
        fields = decode_block_cdb(cdb)
    except CdbError:
        return None
    if opcode in _READS:
        return Transfer(Direction.IN, fields.length * block_size, block_size=block_size)
    if opcode in _WRITES:
        return Transfer(Direction.OUT, fields.length * block_size, block_size=block_size)
    if opcode in _VERIFIES:
        # BYTCHK 0: no data; 1: the blocks to compare; 3: one block compared with each
        # (SBC-4 5.34).
        blocks = {0: 0, 1: fields.length, 3: 1}.get(fields.bytchk)
        if blocks is None:
            return None
        patchable = block_size if fields.bytchk == 1 else 0
        return Transfer(Direction.OUT, blocks * block_size, block_size=patchable)
    # COMPARE AND WRITE carries the verify data and the write data: twice the blocks, and a
    # Data-Out of any other size is an error (SBC-4 5.3).
    return Transfer(Direction.OUT, 2 * fields.length * block_size, strict=True)


# Where the TRANSFER LENGTH field sits, by CDB size: (offset, width) (SBC-4 5.15, 5.16, 5.42).
_LENGTH_FIELD = {6: (4, 1), 10: (7, 2), 12: (6, 4), 16: (10, 4)}
_CDB_SIZE = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}  # by opcode group code (SPC-5 4.2.5.1)


def with_transfer_length(cdb: bytes | bytearray | memoryview, blocks: int) -> bytes | None:
    """A copy of a READ/WRITE/WRITE AND VERIFY/ORWRITE CDB asking for `blocks` blocks.

    Used to write only what the initiator sent when its EDTL is below the CDB's transfer
    length. None when the CDB cannot express it (0 blocks in a 6-byte CDB means 256).
    """
    size = _CDB_SIZE.get(cdb[0] >> 5)
    if size is None or len(cdb) < size:
        return None
    offset, width = _LENGTH_FIELD[size]
    if size == 6 and not 0 < blocks < 256:
        return None
    patched = bytearray(cdb)
    patched[offset : offset + width] = blocks.to_bytes(width, "big")
    return bytes(patched)
