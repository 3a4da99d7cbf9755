"""SCSI operation codes and service actions, with their T10 names.

Holds the numbers only (SPC-5 annex, SBC-4 clause 5, SAM-5 4.x) and the CDB length implied by
an opcode's group code. Knows nothing about what any command does or which ones a device
supports: that belongs to the emulation.
"""

from __future__ import annotations

import enum

__all__ = [
    "MaintenanceIn",
    "MaintenanceOut",
    "Opcode",
    "PersistentReserveIn",
    "PersistentReserveOut",
    "SanitizeServiceAction",
    "ServiceActionIn16",
    "ServiceActionOut16",
    "VariableLength",
    "cdb_length",
    "command_name",
    "has_service_action",
]


class Opcode(enum.IntEnum):
    """Operation codes (first CDB byte) from SPC-5 and SBC-4."""

    TEST_UNIT_READY = 0x00
    REZERO_UNIT = 0x01
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    REASSIGN_BLOCKS = 0x07
    READ_6 = 0x08
    WRITE_6 = 0x0A
    SEEK_6 = 0x0B
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    RECEIVE_DIAGNOSTIC_RESULTS = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SEEK_10 = 0x2B
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    READ_LONG_10 = 0x3E
    WRITE_LONG_10 = 0x3F
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    READ_TOC = 0x43
    SANITIZE = 0x48
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    VARIABLE_LENGTH = 0x7F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    ATA_PASS_THROUGH_16 = 0x85
    ACCESS_CONTROL_IN = 0x86
    ACCESS_CONTROL_OUT = 0x87
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    READ_ATTRIBUTE = 0x8C
    WRITE_ATTRIBUTE = 0x8D
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    LOCK_UNLOCK_CACHE_16 = 0x92
    WRITE_SAME_16 = 0x93
    WRITE_STREAM_16 = 0x9A
    READ_BUFFER_16 = 0x9B
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_BIDIRECTIONAL = 0x9D
    SERVICE_ACTION_IN_16 = 0x9E
    SERVICE_ACTION_OUT_16 = 0x9F
    REPORT_LUNS = 0xA0
    ATA_PASS_THROUGH_12 = 0xA1
    SECURITY_PROTOCOL_IN = 0xA2
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    MOVE_MEDIUM = 0xA5
    READ_12 = 0xA8
    SERVICE_ACTION_OUT_12 = 0xA9
    WRITE_12 = 0xAA
    SERVICE_ACTION_IN_12 = 0xAB
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    SECURITY_PROTOCOL_OUT = 0xB5
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(enum.IntEnum):
    """SERVICE ACTION IN(16) (9Eh) service actions, CDB byte 1 bits 4..0 (SBC-4 5.x)."""

    READ_CAPACITY_16 = 0x10
    READ_LONG_16 = 0x11
    GET_LBA_STATUS = 0x12
    REPORT_REFERRALS = 0x13
    GET_STREAM_STATUS = 0x16


class ServiceActionOut16(enum.IntEnum):
    """SERVICE ACTION OUT(16) (9Fh) service actions."""

    WRITE_LONG_16 = 0x11


class MaintenanceIn(enum.IntEnum):
    """MAINTENANCE IN (A3h) service actions (SPC-5 6.x)."""

    REPORT_IDENTIFYING_INFORMATION = 0x05
    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_ALIASES = 0x0B
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D
    REPORT_PRIORITY = 0x0E
    REPORT_TIMESTAMP = 0x0F
    MANAGEMENT_PROTOCOL_IN = 0x10


class MaintenanceOut(enum.IntEnum):
    """MAINTENANCE OUT (A4h) service actions."""

    SET_IDENTIFYING_INFORMATION = 0x06
    SET_TARGET_PORT_GROUPS = 0x0A
    CHANGE_ALIASES = 0x0B
    SET_PRIORITY = 0x0E
    SET_TIMESTAMP = 0x0F


class PersistentReserveIn(enum.IntEnum):
    """PERSISTENT RESERVE IN (5Eh) service actions (SPC-5 6.16)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PersistentReserveOut(enum.IntEnum):
    """PERSISTENT RESERVE OUT (5Fh) service actions (SPC-5 6.17)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07
    REPLACE_LOST_RESERVATION = 0x08


class SanitizeServiceAction(enum.IntEnum):
    """SANITIZE (48h) service actions (SBC-4 5.30)."""

    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTOGRAPHIC_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


class VariableLength(enum.IntEnum):
    """Service actions of the 32-byte VARIABLE LENGTH (7Fh) CDB, bytes 8..9 (SBC-4)."""

    READ_32 = 0x0009
    VERIFY_32 = 0x000A
    WRITE_32 = 0x000B
    WRITE_AND_VERIFY_32 = 0x000C
    WRITE_SAME_32 = 0x000D
    ORWRITE_32 = 0x000E
    WRITE_ATOMIC_32 = 0x000F
    WRITE_STREAM_32 = 0x0010


# Opcodes whose CDB carries a service action in byte 1 bits 4..0 (SPC-5 4.2.5.1).
_SERVICE_ACTION_OPCODES: dict[int, type[enum.IntEnum]] = {
    Opcode.SERVICE_ACTION_IN_16: ServiceActionIn16,
    Opcode.SERVICE_ACTION_OUT_16: ServiceActionOut16,
    Opcode.MAINTENANCE_IN: MaintenanceIn,
    Opcode.MAINTENANCE_OUT: MaintenanceOut,
    Opcode.PERSISTENT_RESERVE_IN: PersistentReserveIn,
    Opcode.PERSISTENT_RESERVE_OUT: PersistentReserveOut,
    Opcode.SANITIZE: SanitizeServiceAction,
}

# CDB length by group code (opcode bits 7..5), SPC-5 4.2.5.1 table 3. Groups 3 (7Fh is the
# variable-length CDB, others reserved) and 6/7 (vendor specific) have no fixed length.
_GROUP_LENGTH = (6, 10, 10, 0, 16, 12, 0, 0)


def cdb_length(opcode: int) -> int:
    """Return the CDB length the opcode's group code implies, or 0 when it is not fixed.

    For VARIABLE LENGTH (7Fh) this returns 32, the size of every SBC-4 32-byte CDB; the real
    length of such a CDB is 8 + its ADDITIONAL CDB LENGTH byte.
    """
    if opcode == Opcode.VARIABLE_LENGTH:
        return 32
    return _GROUP_LENGTH[(opcode >> 5) & 7]


def has_service_action(opcode: int) -> bool:
    """Whether CDB byte 1 bits 4..0 (or bytes 8..9 for 7Fh) select a service action."""
    return opcode in _SERVICE_ACTION_OPCODES or opcode == Opcode.VARIABLE_LENGTH


def command_name(opcode: int, service_action: int | None = None) -> str:
    """A readable name for logs: ``"READ_10"``, ``"SERVICE_ACTION_IN_16/READ_CAPACITY_16"``.

    Unknown values are shown in hex instead of raising.
    """
    try:
        name = Opcode(opcode).name
    except ValueError:
        name = f"OPCODE_{opcode & 0xFF:02X}h"
    if service_action is None:
        return name
    if opcode == Opcode.VARIABLE_LENGTH:
        sa_enum: type[enum.IntEnum] | None = VariableLength
    else:
        sa_enum = _SERVICE_ACTION_OPCODES.get(opcode)
    if sa_enum is None:
        return name
    try:
        return f"{name}/{sa_enum(service_action).name}"
    except ValueError:
        return f"{name}/SA_{service_action:02X}h"
