"""Numeric constants of RFC 7143: opcodes, status classes, reasons and response codes.

Holds only names for numbers; no encoding and no behaviour.
"""

from __future__ import annotations

import enum

__all__ = [
    "BHS_LENGTH",
    "RESERVED_TAG",
    "AhsType",
    "AsyncEvent",
    "LoginStage",
    "LoginStatus",
    "LogoutReason",
    "LogoutResponseCode",
    "Opcode",
    "RejectReason",
    "ScsiResponseCode",
    "TmfFunction",
    "TmfResponseCode",
]

BHS_LENGTH = 48
RESERVED_TAG = 0xFFFFFFFF  # the "no tag" value for ITT and TTT (RFC 7143 section 11.2.1.8)


class Opcode(enum.IntEnum):
    """PDU opcodes (RFC 7143 section 11.2.1.2)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MANAGEMENT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MANAGEMENT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class AhsType(enum.IntEnum):
    """Additional Header Segment types (RFC 7143 section 11.2.2.1)."""

    EXTENDED_CDB = 1
    BIDIRECTIONAL_READ_LENGTH = 2


class LoginStage(enum.IntEnum):
    """CSG/NSG values (RFC 7143 section 11.12.3)."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class LoginStatus(enum.IntEnum):
    """Status-Class << 8 | Status-Detail of a Login Response (RFC 7143 section 11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANNOT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class RejectReason(enum.IntEnum):
    """Reason codes of the Reject PDU (RFC 7143 section 11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECTED = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class ScsiResponseCode(enum.IntEnum):
    """The Response field of a SCSI Response (RFC 7143 section 11.4.3)."""

    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class TmfFunction(enum.IntEnum):
    """Task management function codes (RFC 7143 section 11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponseCode(enum.IntEnum):
    """Task management response codes (RFC 7143 section 11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


class LogoutReason(enum.IntEnum):
    """Reason codes of a Logout Request (RFC 7143 section 11.14.1)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(enum.IntEnum):
    """Response codes of a Logout Response (RFC 7143 section 11.15.1)."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class AsyncEvent(enum.IntEnum):
    """AsyncEvent codes of an Asynchronous Message (RFC 7143 section 11.9.1)."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUESTED = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255
