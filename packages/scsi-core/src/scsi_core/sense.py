"""Sense data: sense keys, ASC/ASCQ codes, fixed and descriptor formats (SPC-5 4.4).

Holds the encodings and their parsers, plus the sense-key-specific field pointer (SPC-5
4.4.2.2) that tells an initiator which CDB or parameter-list byte was wrong. Knows nothing about
which command produced the sense or how a transport carries it.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass

__all__ = [
    "FIXED_SENSE_LENGTH",
    "Asc",
    "FieldPointer",
    "SenseData",
    "SenseError",
    "SenseFormat",
    "SenseKey",
    "build_sense",
    "parse_sense",
]

#: Length of the fixed-format sense data this module builds (additional length 10).
FIXED_SENSE_LENGTH = 18


class SenseError(ValueError):
    """Bytes that are not parseable sense data."""


class SenseKey(enum.IntEnum):
    """SENSE KEY values (SPC-5 4.4.8, table 51)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    RESERVED_C = 0xC
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


class Asc(enum.IntEnum):
    """ADDITIONAL SENSE CODE / QUALIFIER pairs (SPC-5 4.4.9, table 52), as ``asc << 8 | ascq``."""

    NO_ADDITIONAL_SENSE_INFORMATION = 0x0000
    OPERATION_IN_PROGRESS = 0x0016
    PERIPHERAL_DEVICE_WRITE_FAULT = 0x0300
    LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = 0x0400
    LOGICAL_UNIT_IS_IN_PROCESS_OF_BECOMING_READY = 0x0401
    LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED = 0x0402
    LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED = 0x0403
    LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS = 0x041B
    WRITE_ERROR = 0x0C00
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = 0x0E03
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    DEFECT_LIST_NOT_FOUND = 0x1C00
    MISCOMPARE_DURING_VERIFY_OPERATION = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    ACCESS_DENIED_INVALID_LU_IDENTIFIER = 0x2009
    LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    LOGICAL_UNIT_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    PARAMETER_NOT_SUPPORTED = 0x2601
    PARAMETER_VALUE_INVALID = 0x2602
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604
    WRITE_PROTECTED = 0x2700
    HARDWARE_WRITE_PROTECTED = 0x2701
    LOGICAL_UNIT_SOFTWARE_WRITE_PROTECTED = 0x2702
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED = 0x2800
    POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = 0x2900
    POWER_ON_OCCURRED = 0x2901
    SCSI_BUS_RESET_OCCURRED = 0x2902
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = 0x2903
    DEVICE_INTERNAL_RESET = 0x2904
    I_T_NEXUS_LOSS_OCCURRED = 0x2907
    PARAMETERS_CHANGED = 0x2A00
    MODE_PARAMETERS_CHANGED = 0x2A01
    RESERVATIONS_PREEMPTED = 0x2A03
    RESERVATIONS_RELEASED = 0x2A04
    REGISTRATIONS_PREEMPTED = 0x2A05
    CAPACITY_DATA_HAS_CHANGED = 0x2A09
    COMMAND_SEQUENCE_ERROR = 0x2C00
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = 0x2F00
    COMMANDS_CLEARED_BY_DEVICE_SERVER = 0x2F02
    THIN_PROVISIONING_SOFT_THRESHOLD_REACHED = 0x3807
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    MEDIUM_NOT_PRESENT = 0x3A00
    INQUIRY_DATA_HAS_CHANGED = 0x3F03
    REPORTED_LUNS_DATA_HAS_CHANGED = 0x3F0E
    INTERNAL_TARGET_FAILURE = 0x4400
    INVALID_MESSAGE_ERROR = 0x4900
    DATA_PHASE_ERROR = 0x4B00
    OVERLAPPED_COMMANDS_ATTEMPTED = 0x4E00
    MEDIUM_REMOVAL_PREVENTED = 0x5302
    INSUFFICIENT_REGISTRATION_RESOURCES = 0x5504
    LOW_POWER_CONDITION_ON = 0x5E00

    @property
    def asc(self) -> int:
        """The ADDITIONAL SENSE CODE byte."""
        return self.value >> 8

    @property
    def ascq(self) -> int:
        """The ADDITIONAL SENSE CODE QUALIFIER byte."""
        return self.value & 0xFF


class SenseFormat(enum.IntEnum):
    """RESPONSE CODE values (SPC-5 4.4.1, table 27)."""

    FIXED_CURRENT = 0x70
    FIXED_DEFERRED = 0x71
    DESCRIPTOR_CURRENT = 0x72
    DESCRIPTOR_DEFERRED = 0x73


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """The sense-key-specific field pointer for ILLEGAL REQUEST (SPC-5 4.4.2.2, table 31).

    ``in_cdb`` is the C/D bit: True when ``byte`` indexes the CDB, False for the parameter
    list. ``bit`` (0..7) names the most significant bit in error, or None when the whole byte
    (or field starting there) is wrong (BPV = 0).
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def to_sks(self) -> int:
        """The 3-byte SENSE KEY SPECIFIC value, SKSV included."""
        value = 0x800000 | (self.byte & 0xFFFF)
        if self.in_cdb:
            value |= 0x400000
        if self.bit is not None:
            value |= 0x080000 | ((self.bit & 7) << 16)
        return value

    @classmethod
    def from_sks(cls, sks: int) -> FieldPointer:
        """Decode a SENSE KEY SPECIFIC value (the SKSV bit is not checked here)."""
        bit = (sks >> 16) & 7 if sks & 0x080000 else None
        return cls(byte=sks & 0xFFFF, bit=bit, in_cdb=bool(sks & 0x400000))


@dataclass(frozen=True, slots=True)
class SenseData:
    """Decoded sense data, independent of the format it travels in.

    ``information`` is None when the VALID bit (fixed) or information descriptor (descriptor
    format) is absent. ``sks`` is the 3-byte SENSE KEY SPECIFIC value including the SKSV bit
    (bit 23), or None when it is not valid.
    """

    key: int
    asc: int = 0
    ascq: int = 0
    current: bool = True
    information: int | None = None
    command_specific: int = 0
    sks: int | None = None
    fru: int = 0
    filemark: bool = False
    eom: bool = False
    ili: bool = False

    @classmethod
    def of(
        cls,
        key: int,
        code: Asc,
        *,
        field_pointer: FieldPointer | None = None,
        information: int | None = None,
    ) -> SenseData:
        """Convenience constructor: a current error with a named ASC/ASCQ pair."""
        return cls(
            key=key,
            asc=code.asc,
            ascq=code.ascq,
            information=information,
            sks=field_pointer.to_sks() if field_pointer is not None else None,
        )

    @property
    def code(self) -> int:
        """``asc << 8 | ascq``; compare with an `Asc` member."""
        return (self.asc << 8) | self.ascq

    @property
    def field_pointer(self) -> FieldPointer | None:
        """The field pointer, when this is ILLEGAL REQUEST sense with a valid SKS."""
        if self.sks is None or self.key != SenseKey.ILLEGAL_REQUEST:
            return None
        return FieldPointer.from_sks(self.sks)

    def to_bytes(self, descriptor: bool = False) -> bytes:
        """Encode in fixed (default, 18 bytes) or descriptor format."""
        return _encode_descriptor(self) if descriptor else _encode_fixed(self)


# Fixed format (SPC-5 4.4.3, table 48): response code, obsolete, flags|key, INFORMATION(4),
# additional length, COMMAND-SPECIFIC INFORMATION(4), ASC, ASCQ, FRU, SKS(3).
_FIXED = struct.Struct(">BBBIBIBBB3s")
# Descriptor format header (SPC-5 4.4.2, table 28).
_DESC_HEADER = struct.Struct(">BBBB3xB")
# Information (00h) and command-specific information (01h) descriptors, 12 bytes each.
_DESC_U64 = struct.Struct(">BBBxQ")
# Sense key specific descriptor (02h), 8 bytes.
_DESC_SKS = struct.Struct(">BBxx3sx")
# Field replaceable unit descriptor (03h), 4 bytes.
_DESC_FRU = struct.Struct(">BBxB")
# Stream commands descriptor (04h, FILEMARK/EOM/ILI), 4 bytes.
_DESC_STREAM = struct.Struct(">BBxB")


def _encode_fixed(s: SenseData) -> bytes:
    code = int(SenseFormat.FIXED_CURRENT if s.current else SenseFormat.FIXED_DEFERRED)
    info = 0
    # A value that needs more than 4 bytes cannot be reported in the fixed format; the VALID
    # bit then stays zero (SPC-5 4.4.3).
    if s.information is not None and 0 <= s.information <= 0xFFFFFFFF:
        code |= 0x80
        info = s.information
    flags = (s.filemark << 7) | (s.eom << 6) | (s.ili << 5) | (s.key & 0xF)
    sks = (s.sks & 0xFFFFFF).to_bytes(3, "big") if s.sks is not None else bytes(3)
    return _FIXED.pack(
        code,
        0,
        flags,
        info,
        FIXED_SENSE_LENGTH - 8,
        s.command_specific & 0xFFFFFFFF,
        s.asc & 0xFF,
        s.ascq & 0xFF,
        s.fru & 0xFF,
        sks,
    )


def _encode_descriptor(s: SenseData) -> bytes:
    parts: list[bytes] = []
    if s.information is not None:
        parts.append(_DESC_U64.pack(0x00, 0x0A, 0x80, s.information & (2**64 - 1)))
    if s.command_specific:
        parts.append(_DESC_U64.pack(0x01, 0x0A, 0x00, s.command_specific & (2**64 - 1)))
    if s.sks is not None:
        parts.append(_DESC_SKS.pack(0x02, 0x06, (s.sks & 0xFFFFFF).to_bytes(3, "big")))
    if s.fru:
        parts.append(_DESC_FRU.pack(0x03, 0x02, s.fru & 0xFF))
    if s.filemark or s.eom or s.ili:
        flags = (s.filemark << 7) | (s.eom << 6) | (s.ili << 5)
        parts.append(_DESC_STREAM.pack(0x04, 0x02, flags))
    body = b"".join(parts)
    code = SenseFormat.DESCRIPTOR_CURRENT if s.current else SenseFormat.DESCRIPTOR_DEFERRED
    header = _DESC_HEADER.pack(code, s.key & 0xF, s.asc & 0xFF, s.ascq & 0xFF, len(body))
    return header + body


def parse_sense(data: bytes | bytearray | memoryview) -> SenseData:
    """Decode fixed or descriptor format sense data.

    Truncated fixed-format data is accepted down to 8 bytes (fields past the end read as
    zero), as SPC allows a short allocation length to cut sense data. Raises `SenseError` for
    an unknown response code or a malformed descriptor list.
    """
    data = bytes(data)
    if len(data) < 8:
        raise SenseError(f"sense data too short: {len(data)} bytes")
    response_code = data[0] & 0x7F
    if response_code in (SenseFormat.FIXED_CURRENT, SenseFormat.FIXED_DEFERRED):
        return _parse_fixed(data)
    if response_code in (SenseFormat.DESCRIPTOR_CURRENT, SenseFormat.DESCRIPTOR_DEFERRED):
        return _parse_descriptor(data)
    raise SenseError(f"unknown sense response code {data[0]:#04x}")


def _parse_fixed(data: bytes) -> SenseData:
    padded = data[:FIXED_SENSE_LENGTH].ljust(FIXED_SENSE_LENGTH, b"\0")
    code, _, flags, info, _, cmd_specific, asc, ascq, fru, sks_raw = _FIXED.unpack(padded)
    sks = int.from_bytes(sks_raw, "big")
    return SenseData(
        key=flags & 0xF,
        asc=asc,
        ascq=ascq,
        current=(code & 0x7F) == SenseFormat.FIXED_CURRENT,
        information=info if code & 0x80 else None,
        command_specific=cmd_specific,
        sks=sks if sks & 0x800000 else None,
        fru=fru,
        filemark=bool(flags & 0x80),
        eom=bool(flags & 0x40),
        ili=bool(flags & 0x20),
    )


def _parse_descriptor(data: bytes) -> SenseData:
    code, key, asc, ascq, additional = _DESC_HEADER.unpack_from(data)
    end = min(len(data), 8 + additional)
    information: int | None = None
    command_specific = 0
    sks: int | None = None
    fru = 0
    stream_flags = 0
    pos = 8
    while pos < end:
        if pos + 2 > end:
            raise SenseError(f"truncated sense descriptor header at byte {pos}")
        dtype, dlen = data[pos], data[pos + 1]
        if pos + 2 + dlen > end:
            raise SenseError(f"sense descriptor {dtype:#04x} at byte {pos} overruns the data")
        desc = data[pos : pos + 2 + dlen]
        if dtype in (0x00, 0x01):
            if dlen != 0x0A:
                raise SenseError(f"sense descriptor {dtype:#04x} has length {dlen}, not 10")
            _, _, valid, value = _DESC_U64.unpack(desc)
            if dtype == 0x00:
                information = value if valid & 0x80 else None
            else:
                command_specific = value
        elif dtype == 0x02:
            if dlen != 0x06:
                raise SenseError(f"sense key specific descriptor has length {dlen}, not 6")
            raw = int.from_bytes(desc[4:7], "big")
            sks = raw if raw & 0x800000 else None
        elif dtype == 0x03 and dlen >= 2:
            fru = desc[3]
        elif dtype == 0x04 and dlen >= 2:
            stream_flags = desc[3]
        # Other descriptor types (block commands, ATA return, progress...) are skipped.
        pos += 2 + dlen
    return SenseData(
        key=key & 0xF,
        asc=asc,
        ascq=ascq,
        current=(code & 0x7F) == SenseFormat.DESCRIPTOR_CURRENT,
        information=information,
        command_specific=command_specific,
        sks=sks,
        fru=fru,
        filemark=bool(stream_flags & 0x80),
        eom=bool(stream_flags & 0x40),
        ili=bool(stream_flags & 0x20),
    )


@functools.lru_cache(maxsize=512)
def build_sense(
    key: int,
    code: Asc,
    field_pointer: FieldPointer | None = None,
    descriptor: bool = False,
) -> bytes:
    """Sense bytes for a current error, cached: error paths cost one dict lookup.

    For sense that carries per-command values (INFORMATION), build a `SenseData` instead.
    """
    return SenseData.of(key, code, field_pointer=field_pointer).to_bytes(descriptor)
