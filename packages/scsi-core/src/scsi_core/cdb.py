"""CDB field layouts and decoding for the 6/10/12/16/32-byte command forms.

Holds the precompiled `struct.Struct` layouts of SBC-4's block-command CDBs, a `BlockCdb`
dataclass with the named fields (LBA, transfer length, DPO, FUA, BYTCHK, UNMAP, ANCHOR, NDOB,
IMMED, group number, control byte) and the offsets of the ALLOCATION LENGTH and PARAMETER LIST
LENGTH fields of SPC/SBC commands. Knows nothing about what the fields mean to a device: range
checks against a capacity and the sense to answer belong to the emulation.

The hot path may unpack the ``CDB6``/``CDB10``/``CDB12``/``CDB16`` layouts directly instead of
building a `BlockCdb`: that is what they are exported for.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from scsi_core.opcodes import Opcode, VariableLength, cdb_length, has_service_action

__all__ = [
    "CDB6",
    "CDB10",
    "CDB12",
    "CDB16",
    "CDB32",
    "COMPARE_AND_WRITE_CDB",
    "BlockCdb",
    "CdbError",
    "FlagSet",
    "allocation_length",
    "block_cdb_opcodes",
    "control_byte",
    "decode_block_cdb",
    "encode_block_cdb",
    "flag_set",
    "naca",
    "parameter_list_length",
    "service_action",
]


class CdbError(ValueError):
    """A CDB too short for its opcode's layout, or an opcode this decoder has no layout for."""


#: READ(6)/WRITE(6) (SBC-4 5.15/5.42): opcode, LBA bits 20..16 in byte 1, LBA 15..0,
#: TRANSFER LENGTH, CONTROL.
CDB6 = struct.Struct(">BBHBB")
#: 10-byte block commands: opcode, flags, LBA, GROUP NUMBER, TRANSFER LENGTH, CONTROL.
CDB10 = struct.Struct(">BBIBHB")
#: 12-byte block commands: opcode, flags, LBA, TRANSFER LENGTH, GROUP NUMBER, CONTROL.
CDB12 = struct.Struct(">BBIIBB")
#: 16-byte block commands: opcode, flags, LBA, TRANSFER LENGTH, GROUP NUMBER, CONTROL.
CDB16 = struct.Struct(">BBQIBB")
#: COMPARE AND WRITE (SBC-4 5.3): opcode, flags, LBA, 3 reserved, NUMBER OF LOGICAL BLOCKS,
#: GROUP NUMBER, CONTROL.
COMPARE_AND_WRITE_CDB = struct.Struct(">BBQ3xBBB")
#: 32-byte VARIABLE LENGTH block commands (SBC-4 5.17 READ(32)): opcode, CONTROL, 4 reserved,
#: GROUP NUMBER, ADDITIONAL CDB LENGTH (18h), SERVICE ACTION, flags, reserved, LBA, EXPECTED
#: INITIAL LOGICAL BLOCK REFERENCE TAG, EXPECTED APPLICATION TAG, APPLICATION TAG MASK,
#: TRANSFER LENGTH.
CDB32 = struct.Struct(">BB4xBBHBxQIHHI")


class FlagSet(enum.Enum):
    """Which meaning the flag byte (byte 1, or byte 10 of a 32-byte CDB) has for an opcode."""

    #: READ/WRITE/ORWRITE/COMPARE AND WRITE: RDPROTECT/WRPROTECT(7..5), DPO(4), FUA(3).
    READ_WRITE = "read_write"
    #: VERIFY / WRITE AND VERIFY: VRPROTECT/WRPROTECT(7..5), DPO(4), BYTCHK(2..1).
    VERIFY = "verify"
    #: WRITE SAME: WRPROTECT(7..5), ANCHOR(4), UNMAP(3), NDOB(0).
    WRITE_SAME = "write_same"
    #: SYNCHRONIZE CACHE / PRE-FETCH: IMMED(1).
    CACHE = "cache"
    #: READ(6)/WRITE(6): no flags.
    NONE = "none"


@dataclass(slots=True)
class BlockCdb:
    """The fields of an SBC block command CDB, whatever its size.

    ``length`` is the TRANSFER LENGTH (or NUMBER OF LOGICAL BLOCKS) with the READ(6)/WRITE(6)
    rule applied: a 0 in those two CDBs means 256 blocks (SBC-4 5.15). For the 32-byte form
    ``service_action`` is the VARIABLE LENGTH service action and ``opcode`` is 7Fh.
    ``protect`` is RDPROTECT/WRPROTECT/VRPROTECT; ``bytchk`` is the 2-bit SBC-4 field.
    """

    opcode: int
    lba: int
    length: int
    dpo: bool = False
    fua: bool = False
    bytchk: int = 0
    unmap: bool = False
    anchor: bool = False
    ndob: bool = False
    immed: bool = False
    protect: int = 0
    group: int = 0
    control: int = 0
    service_action: int = 0


# opcode -> (layout size, flag meaning). SBC-4 clause 5.
_BLOCK_OPCODES: dict[int, tuple[int, FlagSet]] = {
    Opcode.READ_6: (6, FlagSet.NONE),
    Opcode.WRITE_6: (6, FlagSet.NONE),
    Opcode.READ_10: (10, FlagSet.READ_WRITE),
    Opcode.WRITE_10: (10, FlagSet.READ_WRITE),
    Opcode.VERIFY_10: (10, FlagSet.VERIFY),
    Opcode.WRITE_AND_VERIFY_10: (10, FlagSet.VERIFY),
    Opcode.WRITE_SAME_10: (10, FlagSet.WRITE_SAME),
    Opcode.PRE_FETCH_10: (10, FlagSet.CACHE),
    Opcode.SYNCHRONIZE_CACHE_10: (10, FlagSet.CACHE),
    Opcode.READ_12: (12, FlagSet.READ_WRITE),
    Opcode.WRITE_12: (12, FlagSet.READ_WRITE),
    Opcode.VERIFY_12: (12, FlagSet.VERIFY),
    Opcode.WRITE_AND_VERIFY_12: (12, FlagSet.VERIFY),
    Opcode.READ_16: (16, FlagSet.READ_WRITE),
    Opcode.WRITE_16: (16, FlagSet.READ_WRITE),
    Opcode.ORWRITE_16: (16, FlagSet.READ_WRITE),
    Opcode.VERIFY_16: (16, FlagSet.VERIFY),
    Opcode.WRITE_AND_VERIFY_16: (16, FlagSet.VERIFY),
    Opcode.WRITE_SAME_16: (16, FlagSet.WRITE_SAME),
    Opcode.PRE_FETCH_16: (16, FlagSet.CACHE),
    Opcode.SYNCHRONIZE_CACHE_16: (16, FlagSet.CACHE),
    Opcode.COMPARE_AND_WRITE: (15, FlagSet.READ_WRITE),  # 16 bytes, own layout
}

_VARIABLE_FLAGS: dict[int, FlagSet] = {
    VariableLength.READ_32: FlagSet.READ_WRITE,
    VariableLength.WRITE_32: FlagSet.READ_WRITE,
    VariableLength.ORWRITE_32: FlagSet.READ_WRITE,
    VariableLength.VERIFY_32: FlagSet.VERIFY,
    VariableLength.WRITE_AND_VERIFY_32: FlagSet.VERIFY,
    VariableLength.WRITE_SAME_32: FlagSet.WRITE_SAME,
}

_ADDITIONAL_CDB_LENGTH_32 = 0x18


def block_cdb_opcodes() -> frozenset[int]:
    """Opcodes `decode_block_cdb` understands (plus 7Fh with a block service action)."""
    return frozenset(_BLOCK_OPCODES) | {Opcode.VARIABLE_LENGTH}


def flag_set(opcode: int, service_action: int = 0) -> FlagSet | None:
    """The flag-byte meaning of a block opcode, or None when it is not a block command."""
    if opcode == Opcode.VARIABLE_LENGTH:
        return _VARIABLE_FLAGS.get(service_action)
    entry = _BLOCK_OPCODES.get(opcode)
    return entry[1] if entry else None


def _decode_flags(c: BlockCdb, kind: FlagSet, flags: int) -> None:
    if kind is FlagSet.NONE:
        return
    if kind is FlagSet.CACHE:
        c.immed = bool(flags & 0x02)
        return
    c.protect = flags >> 5
    if kind is FlagSet.READ_WRITE:
        c.dpo = bool(flags & 0x10)
        c.fua = bool(flags & 0x08)
    elif kind is FlagSet.VERIFY:
        c.dpo = bool(flags & 0x10)
        c.bytchk = (flags >> 1) & 3
    else:
        c.anchor = bool(flags & 0x10)
        c.unmap = bool(flags & 0x08)
        c.ndob = bool(flags & 0x01)


def _encode_flags(c: BlockCdb, kind: FlagSet) -> int:
    if kind is FlagSet.NONE:
        return 0
    if kind is FlagSet.CACHE:
        return 0x02 if c.immed else 0
    flags = (c.protect & 7) << 5
    if kind is FlagSet.READ_WRITE:
        flags |= (c.dpo << 4) | (c.fua << 3)
    elif kind is FlagSet.VERIFY:
        flags |= (c.dpo << 4) | ((c.bytchk & 3) << 1)
    else:
        flags |= (c.anchor << 4) | (c.unmap << 3) | int(c.ndob)
    return flags


def decode_block_cdb(cdb: bytes | bytearray | memoryview) -> BlockCdb:
    """Decode an SBC block command CDB into a `BlockCdb`.

    Reserved bits are ignored (checking them is the device server's choice). Raises `CdbError`
    for an opcode without a block layout or a CDB shorter than its layout.
    """
    if not cdb:
        raise CdbError("empty CDB")
    opcode = cdb[0]
    if opcode == Opcode.VARIABLE_LENGTH:
        if len(cdb) < CDB32.size:
            raise CdbError(f"32-byte CDB is {len(cdb)} bytes")
        (_, control, group, _, sa, flags, lba, _, _, _, length) = CDB32.unpack_from(cdb)
        kind = _VARIABLE_FLAGS.get(sa)
        if kind is None:
            raise CdbError(f"VARIABLE LENGTH service action {sa:#06x} has no block layout")
        c = BlockCdb(opcode, lba, length, group=group & 0x1F, control=control, service_action=sa)
        _decode_flags(c, kind, flags)
        return c
    entry = _BLOCK_OPCODES.get(opcode)
    if entry is None:
        raise CdbError(f"opcode {opcode:#04x} has no block layout")
    size, kind = entry
    if size == 6:
        if len(cdb) < 6:
            raise CdbError(f"6-byte CDB is {len(cdb)} bytes")
        _, hi, lo, length, control = CDB6.unpack_from(cdb)
        return BlockCdb(opcode, ((hi & 0x1F) << 16) | lo, length or 256, control=control)
    if size == 10:
        layout: struct.Struct = CDB10
    elif size == 12:
        layout = CDB12
    elif size == 16:
        layout = CDB16
    else:
        layout = COMPARE_AND_WRITE_CDB
    if len(cdb) < layout.size:
        raise CdbError(f"{layout.size}-byte CDB is {len(cdb)} bytes")
    if size == 10:
        _, flags, lba, group, length, control = CDB10.unpack_from(cdb)
    else:
        _, flags, lba, length, group, control = layout.unpack_from(cdb)
    c = BlockCdb(opcode, lba, length, group=group & 0x1F, control=control)
    _decode_flags(c, kind, flags)
    return c


def encode_block_cdb(c: BlockCdb) -> bytes:
    """Encode a `BlockCdb` (the inverse of `decode_block_cdb` for in-range fields).

    Raises `CdbError` when a field does not fit its layout.
    """
    try:
        return _encode_block_cdb(c)
    except struct.error as e:
        raise CdbError(f"{c}: a field does not fit the CDB layout ({e})") from None


def _encode_block_cdb(c: BlockCdb) -> bytes:
    if c.opcode == Opcode.VARIABLE_LENGTH:
        kind = _VARIABLE_FLAGS.get(c.service_action)
        if kind is None:
            raise CdbError(f"VARIABLE LENGTH service action {c.service_action:#06x} unknown")
        return CDB32.pack(
            c.opcode,
            c.control,
            c.group & 0x1F,
            _ADDITIONAL_CDB_LENGTH_32,
            c.service_action,
            _encode_flags(c, kind),
            c.lba,
            0,
            0,
            0,
            c.length,
        )
    entry = _BLOCK_OPCODES.get(c.opcode)
    if entry is None:
        raise CdbError(f"opcode {c.opcode:#04x} has no block layout")
    size, kind = entry
    flags = _encode_flags(c, kind)
    if size == 6:
        if not 1 <= c.length <= 256 or not 0 <= c.lba < 1 << 21:
            raise CdbError("READ(6)/WRITE(6) take an LBA below 2**21 and 1..256 blocks")
        return CDB6.pack(c.opcode, c.lba >> 16, c.lba & 0xFFFF, c.length & 0xFF, c.control)
    if size == 10:
        return CDB10.pack(c.opcode, flags, c.lba, c.group & 0x1F, c.length, c.control)
    layout = {12: CDB12, 16: CDB16}.get(size, COMPARE_AND_WRITE_CDB)
    return layout.pack(c.opcode, flags, c.lba, c.length, c.group & 0x1F, c.control)


# (offset, size) of ALLOCATION LENGTH, by opcode or (opcode, service action). SPC-5 clause 6,
# SBC-4 clause 5.
_ALLOCATION_LENGTH: dict[int | tuple[int, int], tuple[int, int]] = {
    Opcode.REQUEST_SENSE: (4, 1),
    Opcode.INQUIRY: (3, 2),
    Opcode.MODE_SENSE_6: (4, 1),
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: (3, 2),
    Opcode.READ_DEFECT_DATA_10: (7, 2),
    Opcode.READ_BUFFER: (6, 3),
    Opcode.LOG_SENSE: (7, 2),
    Opcode.MODE_SENSE_10: (7, 2),
    Opcode.PERSISTENT_RESERVE_IN: (7, 2),
    Opcode.RECEIVE_COPY_RESULTS: (10, 4),
    Opcode.SERVICE_ACTION_IN_16: (10, 4),
    Opcode.REPORT_LUNS: (6, 4),
    Opcode.SECURITY_PROTOCOL_IN: (6, 4),
    Opcode.MAINTENANCE_IN: (6, 4),
    Opcode.READ_DEFECT_DATA_12: (6, 4),
}

# (offset, size) of PARAMETER LIST LENGTH, by opcode.
_PARAMETER_LIST_LENGTH: dict[int, tuple[int, int]] = {
    Opcode.MODE_SELECT_6: (4, 1),
    Opcode.SEND_DIAGNOSTIC: (3, 2),
    Opcode.WRITE_BUFFER: (6, 3),
    Opcode.UNMAP: (7, 2),
    Opcode.SANITIZE: (7, 2),
    Opcode.LOG_SELECT: (7, 2),
    Opcode.MODE_SELECT_10: (7, 2),
    Opcode.PERSISTENT_RESERVE_OUT: (5, 4),
    Opcode.EXTENDED_COPY: (10, 4),
    Opcode.SECURITY_PROTOCOL_OUT: (6, 4),
    Opcode.MAINTENANCE_OUT: (6, 4),
}


def _field(cdb: bytes | bytearray | memoryview, where: tuple[int, int] | None) -> int | None:
    if where is None:
        return None
    offset, size = where
    if len(cdb) < offset + size:
        return None
    return int.from_bytes(cdb[offset : offset + size], "big")


def allocation_length(cdb: bytes | bytearray | memoryview) -> int | None:
    """The ALLOCATION LENGTH of an SPC/SBC data-in command, or None if it has none."""
    if not cdb:
        return None
    return _field(cdb, _ALLOCATION_LENGTH.get(cdb[0]))


def parameter_list_length(cdb: bytes | bytearray | memoryview) -> int | None:
    """The PARAMETER LIST LENGTH of an SPC/SBC data-out command, or None if it has none."""
    if not cdb:
        return None
    return _field(cdb, _PARAMETER_LIST_LENGTH.get(cdb[0]))


def service_action(cdb: bytes | bytearray | memoryview) -> int | None:
    """The SERVICE ACTION field, for opcodes that have one (None otherwise or if truncated)."""
    if not cdb or not has_service_action(cdb[0]):
        return None
    if cdb[0] == Opcode.VARIABLE_LENGTH:
        return int.from_bytes(cdb[8:10], "big") if len(cdb) >= 10 else None
    return cdb[1] & 0x1F if len(cdb) >= 2 else None


def control_byte(cdb: bytes | bytearray | memoryview) -> int:
    """The CONTROL byte: the last byte of the CDB, or byte 1 of a 32-byte CDB (SPC-5 4.2.5.2).

    The CDB length comes from the opcode's group code, so a buffer padded past the CDB (virtio
    always carries 32 bytes) still gives the right byte. Returns 0 for a truncated CDB.
    """
    if not cdb:
        return 0
    if cdb[0] == Opcode.VARIABLE_LENGTH:
        return cdb[1] if len(cdb) > 1 else 0
    n = cdb_length(cdb[0]) or len(cdb)
    return cdb[n - 1] if len(cdb) >= n else 0


def naca(control: int) -> bool:
    """The NACA bit of a CONTROL byte (SAM-5 5.11)."""
    return bool(control & 0x04)
