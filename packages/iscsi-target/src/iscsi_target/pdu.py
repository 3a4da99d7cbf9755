"""The iSCSI PDU codec: one dataclass per PDU of RFC 7143 section 11 and its 48-byte BHS layout.

Each class encodes to (BHS + AHS bytes, data segment) and decodes from the BHS, the AHS and
the data segment. Framing (lengths, padding, digests) lives in `framing`; this module knows
nothing of sockets, sessions or SCSI semantics. Field names follow the RFC's field names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from iscsi_target.constants import BHS_LENGTH, RESERVED_TAG, AhsType, Opcode

__all__ = [
    "R2T",
    "AsyncMessage",
    "Data",
    "DataIn",
    "DataOut",
    "LoginRequest",
    "LoginResponse",
    "LogoutRequest",
    "LogoutResponse",
    "NopIn",
    "NopOut",
    "Pdu",
    "PduError",
    "Reject",
    "ScsiCommand",
    "ScsiResponse",
    "SnackRequest",
    "TaskManagementRequest",
    "TaskManagementResponse",
    "TextRequest",
    "TextResponse",
    "UnknownOpcodeError",
    "decode_pdu",
    "encode_pdu",
]

Data: TypeAlias = bytes | bytearray | memoryview
ZERO_LUN = bytes(8)


class PduError(Exception):
    """A PDU that cannot be decoded; `header` is its BHS (for a Reject's data segment)."""

    def __init__(self, message: str, header: bytes = b"") -> None:
        super().__init__(message)
        self.header = header


class UnknownOpcodeError(PduError):
    """The opcode is not one RFC 7143 defines (or not one for this direction)."""


# Byte 0 carries the immediate-delivery bit and the opcode (RFC 7143 section 11.2.1.1).
IMMEDIATE_BIT = 0x40
OPCODE_MASK = 0x3F
FINAL_BIT = 0x80

# Layouts. The 32-bit word at offset 4 is TotalAHSLength (high byte, in 4-byte words) and
# DataSegmentLength (low 24 bits); `_word` and `_split_word` handle it.
SCSI_COMMAND_LAYOUT = struct.Struct(">BBxxI8sIIII16s")
SCSI_RESPONSE_LAYOUT = struct.Struct(">BBBBI8xIIIIIIII")
TMF_REQUEST_LAYOUT = struct.Struct(">BBxxI8sIIIIII8x")
TMF_RESPONSE_LAYOUT = struct.Struct(">BBBxI8xI4xIII12x")
LOGIN_REQUEST_LAYOUT = struct.Struct(">BBBBI6sHIHxxII16x")
LOGIN_RESPONSE_LAYOUT = struct.Struct(">BBBBI6sHI4xIIIBB10x")
TEXT_REQUEST_LAYOUT = struct.Struct(">BBxxI8sIIII16x")
TEXT_RESPONSE_LAYOUT = struct.Struct(">BBxxI8sIIIII12x")
DATA_OUT_LAYOUT = struct.Struct(">BBxxI8sII4xI4xII4x")
DATA_IN_LAYOUT = struct.Struct(">BBxBI8sIIIIIIII")
R2T_LAYOUT = struct.Struct(">BBxxI8sIIIIIIII")
ASYNC_MESSAGE_LAYOUT = struct.Struct(">BBxxI8sI4xIIIBBHHH4x")
LOGOUT_REQUEST_LAYOUT = struct.Struct(">BBxxI8xIHxxII16x")
LOGOUT_RESPONSE_LAYOUT = struct.Struct(">BBBxI8xI4xIII4xHH4x")
SNACK_LAYOUT = struct.Struct(">BBxxI8sII4xI4xII4x")
REJECT_LAYOUT = struct.Struct(">BBBxI8xI4xIIII8x")
NOP_OUT_LAYOUT = TEXT_REQUEST_LAYOUT
NOP_IN_LAYOUT = TEXT_RESPONSE_LAYOUT
AHS_HEADER = struct.Struct(">HBx")
BIDI_AHS = struct.Struct(">HBxI")

MAX_DATA_SEGMENT_LENGTH = (1 << 24) - 1

for _layout in (
    SCSI_COMMAND_LAYOUT,
    SCSI_RESPONSE_LAYOUT,
    TMF_REQUEST_LAYOUT,
    TMF_RESPONSE_LAYOUT,
    LOGIN_REQUEST_LAYOUT,
    LOGIN_RESPONSE_LAYOUT,
    TEXT_REQUEST_LAYOUT,
    TEXT_RESPONSE_LAYOUT,
    DATA_OUT_LAYOUT,
    DATA_IN_LAYOUT,
    R2T_LAYOUT,
    ASYNC_MESSAGE_LAYOUT,
    LOGOUT_REQUEST_LAYOUT,
    LOGOUT_RESPONSE_LAYOUT,
    SNACK_LAYOUT,
    REJECT_LAYOUT,
):
    assert _layout.size == BHS_LENGTH, _layout.format


def _word(ahs: int, data: Data) -> int:
    length = len(data)
    if length > MAX_DATA_SEGMENT_LENGTH:
        raise ValueError(f"data segment of {length} bytes does not fit 24 bits")
    return (ahs // 4) << 24 | length


def _byte0(opcode: Opcode, immediate: bool) -> int:
    return int(opcode) | (IMMEDIATE_BIT if immediate else 0)


# --------------------------------------------------------------------------- initiator PDUs


@dataclass(slots=True)
class NopOut:
    """NOP-Out (RFC 7143 section 11.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    lun: bytes = ZERO_LUN
    immediate: bool = False
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return NOP_OUT_LAYOUT.pack(
            _byte0(self.OPCODE, self.immediate),
            FINAL_BIT,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.cmdsn,
            self.exp_statsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> NopOut:
        b0, _, _, lun, itt, ttt, cmdsn, exp_statsn = NOP_OUT_LAYOUT.unpack_from(bhs)
        return cls(itt, ttt, cmdsn, exp_statsn, lun, bool(b0 & IMMEDIATE_BIT), data)


@dataclass(slots=True)
class ScsiCommand:
    """SCSI Command (RFC 7143 section 11.3); `cdb` includes any Extended CDB AHS bytes."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    FLAG_READ: ClassVar[int] = 0x40
    FLAG_WRITE: ClassVar[int] = 0x20
    ATTR_MASK: ClassVar[int] = 0x07
    itt: int
    cdb: bytes
    expected_data_transfer_length: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    lun: bytes = ZERO_LUN
    final: bool = True
    read: bool = False
    write: bool = False
    attribute: int = 1  # SIMPLE
    immediate: bool = False
    bidirectional_read_length: int | None = None
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        cdb = self.cdb
        ahs = b""
        if len(cdb) > 16:
            extra = cdb[16:]
            body = AHS_HEADER.pack(len(extra) + 1, AhsType.EXTENDED_CDB) + extra
            ahs += body + bytes(-len(body) % 4)
        if self.bidirectional_read_length is not None:
            # AHSLength 5 counts the reserved byte and the 4-byte length (section 11.2.2.2).
            length = self.bidirectional_read_length
            ahs += BIDI_AHS.pack(5, AhsType.BIDIRECTIONAL_READ_LENGTH, length)
        flags = (
            (FINAL_BIT if self.final else 0)
            | (self.FLAG_READ if self.read else 0)
            | (self.FLAG_WRITE if self.write else 0)
            | (self.attribute & self.ATTR_MASK)
        )
        bhs = SCSI_COMMAND_LAYOUT.pack(
            _byte0(self.OPCODE, self.immediate),
            flags,
            _word(len(ahs), self.data),
            self.lun,
            self.itt,
            self.expected_data_transfer_length,
            self.cmdsn,
            self.exp_statsn,
            bytes(cdb[:16]).ljust(16, b"\0"),
        )
        return bhs + ahs, self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> ScsiCommand:
        b0, flags, _, lun, itt, edtl, cmdsn, exp_statsn, cdb = SCSI_COMMAND_LAYOUT.unpack_from(bhs)
        bidi: int | None = None
        offset = 0
        while offset < len(ahs):
            if offset + 4 > len(ahs):
                raise PduError("truncated AHS", bytes(bhs[:BHS_LENGTH]))
            length, ahs_type = AHS_HEADER.unpack_from(ahs, offset)
            end = offset + 3 + length
            if length == 0 or end > len(ahs):
                raise PduError(f"AHS length {length} overruns the AHS", bytes(bhs[:BHS_LENGTH]))
            if ahs_type == AhsType.EXTENDED_CDB:
                cdb += bytes(ahs[offset + 4 : end])
            elif ahs_type == AhsType.BIDIRECTIONAL_READ_LENGTH and length == 5:
                bidi = int.from_bytes(ahs[offset + 4 : offset + 8], "big")
            else:
                raise PduError(f"unsupported AHS type {ahs_type}", bytes(bhs[:BHS_LENGTH]))
            offset = end + (-end % 4)
        return cls(
            itt=itt,
            cdb=cdb,
            expected_data_transfer_length=edtl,
            cmdsn=cmdsn,
            exp_statsn=exp_statsn,
            lun=lun,
            final=bool(flags & FINAL_BIT),
            read=bool(flags & cls.FLAG_READ),
            write=bool(flags & cls.FLAG_WRITE),
            attribute=flags & cls.ATTR_MASK,
            immediate=bool(b0 & IMMEDIATE_BIT),
            bidirectional_read_length=bidi,
            data=data,
        )


@dataclass(slots=True)
class TaskManagementRequest:
    """Task Management Function Request (RFC 7143 section 11.5)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MANAGEMENT_REQUEST
    itt: int
    function: int
    referenced_task_tag: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    ref_cmdsn: int = 0
    exp_datasn: int = 0
    lun: bytes = ZERO_LUN
    immediate: bool = True

    def encode(self) -> tuple[bytes, Data]:
        return TMF_REQUEST_LAYOUT.pack(
            _byte0(self.OPCODE, self.immediate),
            FINAL_BIT | (self.function & 0x7F),
            0,
            self.lun,
            self.itt,
            self.referenced_task_tag,
            self.cmdsn,
            self.exp_statsn,
            self.ref_cmdsn,
            self.exp_datasn,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> TaskManagementRequest:
        b0, flags, _, lun, itt, ref, cmdsn, exp_statsn, ref_cmdsn, exp_datasn = (
            TMF_REQUEST_LAYOUT.unpack_from(bhs)
        )
        return cls(
            itt, flags & 0x7F, ref, cmdsn, exp_statsn, ref_cmdsn, exp_datasn, lun,
            bool(b0 & IMMEDIATE_BIT),
        )  # fmt: skip


@dataclass(slots=True)
class LoginRequest:
    """Login Request (RFC 7143 section 11.12); always immediate."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    itt: int
    isid: int
    csg: int
    nsg: int
    transit: bool = False
    cont: bool = False
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    version_max: int = 0
    version_min: int = 0
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        flags = _login_flags(self.transit, self.cont, self.csg, self.nsg)
        return LOGIN_REQUEST_LAYOUT.pack(
            _byte0(self.OPCODE, True),
            flags,
            self.version_max,
            self.version_min,
            _word(0, self.data),
            self.isid.to_bytes(6, "big"),
            self.tsih,
            self.itt,
            self.cid,
            self.cmdsn,
            self.exp_statsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> LoginRequest:
        _, flags, vmax, vmin, _, isid, tsih, itt, cid, cmdsn, exp_statsn = (
            LOGIN_REQUEST_LAYOUT.unpack_from(bhs)
        )
        return cls(
            itt=itt,
            isid=int.from_bytes(isid, "big"),
            csg=(flags >> 2) & 3,
            nsg=flags & 3,
            transit=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            tsih=tsih,
            cid=cid,
            cmdsn=cmdsn,
            exp_statsn=exp_statsn,
            version_max=vmax,
            version_min=vmin,
            data=data,
        )


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    return (0x80 if transit else 0) | (0x40 if cont else 0) | (csg & 3) << 2 | (nsg & 3)


@dataclass(slots=True)
class TextRequest:
    """Text Request (RFC 7143 section 11.10)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    itt: int
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    exp_statsn: int = 0
    lun: bytes = ZERO_LUN
    final: bool = True
    cont: bool = False
    immediate: bool = False
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        flags = (FINAL_BIT if self.final else 0) | (0x40 if self.cont else 0)
        return TEXT_REQUEST_LAYOUT.pack(
            _byte0(self.OPCODE, self.immediate),
            flags,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.cmdsn,
            self.exp_statsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> TextRequest:
        b0, flags, _, lun, itt, ttt, cmdsn, exp_statsn = TEXT_REQUEST_LAYOUT.unpack_from(bhs)
        return cls(
            itt, ttt, cmdsn, exp_statsn, lun, bool(flags & FINAL_BIT), bool(flags & 0x40),
            bool(b0 & IMMEDIATE_BIT), data,
        )  # fmt: skip


@dataclass(slots=True)
class DataOut:
    """SCSI Data-Out (RFC 7143 section 11.7)."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    itt: int
    ttt: int = RESERVED_TAG
    datasn: int = 0
    buffer_offset: int = 0
    exp_statsn: int = 0
    lun: bytes = ZERO_LUN
    final: bool = False
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return DATA_OUT_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT if self.final else 0,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.exp_statsn,
            self.datasn,
            self.buffer_offset,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> DataOut:
        _, flags, _, lun, itt, ttt, exp_statsn, datasn, offset = DATA_OUT_LAYOUT.unpack_from(bhs)
        return cls(itt, ttt, datasn, offset, exp_statsn, lun, bool(flags & FINAL_BIT), data)


@dataclass(slots=True)
class LogoutRequest:
    """Logout Request (RFC 7143 section 11.14)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    itt: int
    reason: int = 0
    cid: int = 0
    cmdsn: int = 0
    exp_statsn: int = 0
    immediate: bool = False

    def encode(self) -> tuple[bytes, Data]:
        return LOGOUT_REQUEST_LAYOUT.pack(
            _byte0(self.OPCODE, self.immediate),
            FINAL_BIT | (self.reason & 0x7F),
            0,
            self.itt,
            self.cid,
            self.cmdsn,
            self.exp_statsn,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> LogoutRequest:
        b0, flags, _, itt, cid, cmdsn, exp_statsn = LOGOUT_REQUEST_LAYOUT.unpack_from(bhs)
        return cls(itt, flags & 0x7F, cid, cmdsn, exp_statsn, bool(b0 & IMMEDIATE_BIT))


@dataclass(slots=True)
class SnackRequest:
    """SNACK Request (RFC 7143 section 11.16); only ever rejected here (ERL 0)."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    itt: int
    type: int = 0
    ttt: int = RESERVED_TAG
    exp_statsn: int = 0
    begrun: int = 0
    run_length: int = 0
    lun: bytes = ZERO_LUN

    def encode(self) -> tuple[bytes, Data]:
        return SNACK_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT | (self.type & 0x0F),
            0,
            self.lun,
            self.itt,
            self.ttt,
            self.exp_statsn,
            self.begrun,
            self.run_length,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> SnackRequest:
        _, flags, _, lun, itt, ttt, exp_statsn, begrun, run_length = SNACK_LAYOUT.unpack_from(bhs)
        return cls(itt, flags & 0x0F, ttt, exp_statsn, begrun, run_length, lun)


# --------------------------------------------------------------------------- target PDUs


@dataclass(slots=True)
class NopIn:
    """NOP-In (RFC 7143 section 11.19)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    lun: bytes = ZERO_LUN
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return NOP_IN_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> NopIn:
        _, _, _, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn = NOP_IN_LAYOUT.unpack_from(bhs)
        return cls(itt, ttt, statsn, exp_cmdsn, max_cmdsn, lun, data)


@dataclass(slots=True)
class ScsiResponse:
    """SCSI Response (RFC 7143 section 11.4); `data` holds SenseLength + sense data."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    FLAG_BIDI_OVERFLOW: ClassVar[int] = 0x10
    FLAG_BIDI_UNDERFLOW: ClassVar[int] = 0x08
    FLAG_OVERFLOW: ClassVar[int] = 0x04
    FLAG_UNDERFLOW: ClassVar[int] = 0x02
    itt: int
    status: int = 0
    response: int = 0
    flags: int = 0  # the o/u/O/U bits
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    exp_datasn: int = 0
    bidi_residual_count: int = 0
    residual_count: int = 0
    snack_tag: int = 0
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return SCSI_RESPONSE_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT | (self.flags & 0x1E),
            self.response,
            self.status,
            _word(0, self.data),
            self.itt,
            self.snack_tag,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.exp_datasn,
            self.bidi_residual_count,
            self.residual_count,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> ScsiResponse:
        (_, flags, response, status, _, itt, snack, statsn, exp_cmdsn, max_cmdsn, exp_datasn,
         bidi, residual) = SCSI_RESPONSE_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(
            itt, status, response, flags & 0x1E, statsn, exp_cmdsn, max_cmdsn, exp_datasn,
            bidi, residual, snack, data,
        )  # fmt: skip

    @property
    def sense(self) -> bytes:
        """The sense data without its 2-byte SenseLength prefix (empty if none)."""
        if len(self.data) < 2:
            return b""
        length = int.from_bytes(self.data[:2], "big")
        return bytes(self.data[2 : 2 + length])


@dataclass(slots=True)
class TaskManagementResponse:
    """Task Management Function Response (RFC 7143 section 11.6)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MANAGEMENT_RESPONSE
    itt: int
    response: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0

    def encode(self) -> tuple[bytes, Data]:
        return TMF_RESPONSE_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            self.response,
            0,
            self.itt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> TaskManagementResponse:
        _, _, response, _, itt, statsn, exp_cmdsn, max_cmdsn = TMF_RESPONSE_LAYOUT.unpack_from(bhs)
        return cls(itt, response, statsn, exp_cmdsn, max_cmdsn)


@dataclass(slots=True)
class LoginResponse:
    """Login Response (RFC 7143 section 11.13); `status` is Status-Class << 8 | Detail."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    itt: int
    isid: int
    csg: int
    nsg: int
    transit: bool = False
    cont: bool = False
    tsih: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    status: int = 0
    version_max: int = 0
    version_active: int = 0
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return LOGIN_RESPONSE_LAYOUT.pack(
            self.OPCODE,
            _login_flags(self.transit, self.cont, self.csg, self.nsg),
            self.version_max,
            self.version_active,
            _word(0, self.data),
            self.isid.to_bytes(6, "big"),
            self.tsih,
            self.itt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.status >> 8,
            self.status & 0xFF,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> LoginResponse:
        (_, flags, vmax, vactive, _, isid, tsih, itt, statsn, exp_cmdsn, max_cmdsn, sclass,
         sdetail) = LOGIN_RESPONSE_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(
            itt=itt,
            isid=int.from_bytes(isid, "big"),
            csg=(flags >> 2) & 3,
            nsg=flags & 3,
            transit=bool(flags & 0x80),
            cont=bool(flags & 0x40),
            tsih=tsih,
            statsn=statsn,
            exp_cmdsn=exp_cmdsn,
            max_cmdsn=max_cmdsn,
            status=sclass << 8 | sdetail,
            version_max=vmax,
            version_active=vactive,
            data=data,
        )


@dataclass(slots=True)
class TextResponse:
    """Text Response (RFC 7143 section 11.11)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    itt: int
    ttt: int = RESERVED_TAG
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    lun: bytes = ZERO_LUN
    final: bool = True
    cont: bool = False
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        flags = (FINAL_BIT if self.final else 0) | (0x40 if self.cont else 0)
        return TEXT_RESPONSE_LAYOUT.pack(
            self.OPCODE,
            flags,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> TextResponse:
        _, flags, _, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn = TEXT_RESPONSE_LAYOUT.unpack_from(
            bhs
        )
        return cls(
            itt, ttt, statsn, exp_cmdsn, max_cmdsn, lun, bool(flags & FINAL_BIT),
            bool(flags & 0x40), data,
        )  # fmt: skip


@dataclass(slots=True)
class DataIn:
    """SCSI Data-In (RFC 7143 section 11.7); with `status_present` it also ends the command."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    FLAG_ACK: ClassVar[int] = 0x40
    FLAG_OVERFLOW: ClassVar[int] = 0x04
    FLAG_UNDERFLOW: ClassVar[int] = 0x02
    FLAG_STATUS: ClassVar[int] = 0x01
    itt: int
    datasn: int = 0
    buffer_offset: int = 0
    final: bool = False
    status_present: bool = False
    status: int = 0
    residual_flags: int = 0  # FLAG_OVERFLOW / FLAG_UNDERFLOW, only with status_present
    residual_count: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    ttt: int = RESERVED_TAG
    lun: bytes = ZERO_LUN
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        flags = (FINAL_BIT if self.final else 0) | (
            self.FLAG_STATUS | (self.residual_flags & 0x06) if self.status_present else 0
        )
        return DATA_IN_LAYOUT.pack(
            self.OPCODE,
            flags,
            self.status if self.status_present else 0,
            _word(0, self.data),
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.datasn,
            self.buffer_offset,
            self.residual_count,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> DataIn:
        (_, flags, status, _, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn, datasn, offset,
         residual) = DATA_IN_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(
            itt=itt,
            datasn=datasn,
            buffer_offset=offset,
            final=bool(flags & FINAL_BIT),
            status_present=bool(flags & cls.FLAG_STATUS),
            status=status,
            residual_flags=flags & 0x06,
            residual_count=residual,
            statsn=statsn,
            exp_cmdsn=exp_cmdsn,
            max_cmdsn=max_cmdsn,
            ttt=ttt,
            lun=lun,
            data=data,
        )


@dataclass(slots=True)
class R2T:
    """Ready To Transfer (RFC 7143 section 11.8)."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    itt: int
    ttt: int
    r2tsn: int
    buffer_offset: int
    desired_data_transfer_length: int
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    lun: bytes = ZERO_LUN

    def encode(self) -> tuple[bytes, Data]:
        return R2T_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            0,
            self.lun,
            self.itt,
            self.ttt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.r2tsn,
            self.buffer_offset,
            self.desired_data_transfer_length,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> R2T:
        (_, _, _, lun, itt, ttt, statsn, exp_cmdsn, max_cmdsn, r2tsn, offset,
         length) = R2T_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(itt, ttt, r2tsn, offset, length, statsn, exp_cmdsn, max_cmdsn, lun)


@dataclass(slots=True)
class AsyncMessage:
    """Asynchronous Message (RFC 7143 section 11.9)."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    async_event: int
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    lun: bytes = ZERO_LUN
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return ASYNC_MESSAGE_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            _word(0, self.data),
            self.lun,
            RESERVED_TAG,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.async_event,
            self.async_vcode,
            self.parameter1,
            self.parameter2,
            self.parameter3,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> AsyncMessage:
        (_, _, _, lun, _, statsn, exp_cmdsn, max_cmdsn, event, vcode, p1, p2,
         p3) = ASYNC_MESSAGE_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(event, vcode, p1, p2, p3, statsn, exp_cmdsn, max_cmdsn, lun, data)


@dataclass(slots=True)
class LogoutResponse:
    """Logout Response (RFC 7143 section 11.15)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    itt: int
    response: int = 0
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def encode(self) -> tuple[bytes, Data]:
        return LOGOUT_RESPONSE_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            self.response,
            0,
            self.itt,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.time2wait,
            self.time2retain,
        ), b""

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> LogoutResponse:
        (_, _, response, _, itt, statsn, exp_cmdsn, max_cmdsn, t2w,
         t2r) = LOGOUT_RESPONSE_LAYOUT.unpack_from(bhs)  # fmt: skip
        return cls(itt, response, statsn, exp_cmdsn, max_cmdsn, t2w, t2r)


@dataclass(slots=True)
class Reject:
    """Reject (RFC 7143 section 11.17); `data` is the complete BHS of the rejected PDU."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int
    statsn: int = 0
    exp_cmdsn: int = 0
    max_cmdsn: int = 0
    datasn_r2tsn: int = 0
    data: Data = b""

    def encode(self) -> tuple[bytes, Data]:
        return REJECT_LAYOUT.pack(
            self.OPCODE,
            FINAL_BIT,
            self.reason,
            _word(0, self.data),
            RESERVED_TAG,
            self.statsn,
            self.exp_cmdsn,
            self.max_cmdsn,
            self.datasn_r2tsn,
        ), self.data

    @classmethod
    def decode(cls, bhs: Data, ahs: Data, data: Data) -> Reject:
        _, _, reason, _, _, statsn, exp_cmdsn, max_cmdsn, datasn = REJECT_LAYOUT.unpack_from(bhs)
        return cls(reason, statsn, exp_cmdsn, max_cmdsn, datasn, data)


Pdu: TypeAlias = (
    NopOut
    | ScsiCommand
    | TaskManagementRequest
    | LoginRequest
    | TextRequest
    | DataOut
    | LogoutRequest
    | SnackRequest
    | NopIn
    | ScsiResponse
    | TaskManagementResponse
    | LoginResponse
    | TextResponse
    | DataIn
    | R2T
    | AsyncMessage
    | LogoutResponse
    | Reject
)

_PDU_CLASSES: tuple[type[Pdu], ...] = (
    NopOut,
    ScsiCommand,
    TaskManagementRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    SnackRequest,
    NopIn,
    ScsiResponse,
    TaskManagementResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    R2T,
    AsyncMessage,
    LogoutResponse,
    Reject,
)
_DECODERS: dict[int, type[Pdu]] = {cls.OPCODE: cls for cls in _PDU_CLASSES}
INITIATOR_OPCODES = frozenset(int(op) for op in Opcode if op < 0x20)


def decode_pdu(bhs: Data, ahs: Data = b"", data: Data = b"") -> Pdu:
    """Decode one PDU from its BHS (48 bytes), AHS and data segment (without padding).

    Raises `UnknownOpcodeError` for an opcode RFC 7143 does not define and `PduError` for a
    malformed header.
    """
    if len(bhs) < BHS_LENGTH:
        raise PduError(f"BHS of {len(bhs)} bytes, need {BHS_LENGTH}", bytes(bhs))
    opcode = bhs[0] & OPCODE_MASK
    cls = _DECODERS.get(opcode)
    if cls is None:
        raise UnknownOpcodeError(f"unknown opcode {opcode:#04x}", bytes(bhs[:BHS_LENGTH]))
    try:
        return cls.decode(bhs, ahs, data)
    except (struct.error, ValueError) as exc:
        raise PduError(f"malformed {cls.__name__}: {exc}", bytes(bhs[:BHS_LENGTH])) from exc


def encode_pdu(pdu: Pdu) -> tuple[bytes, Data]:
    """Encode `pdu` to (BHS + AHS, data segment without padding)."""
    return pdu.encode()
