"""The commands an emulated block device supports, with their CDB usage data.

Holds one `CommandInfo` per supported opcode/service action: its name and the CDB USAGE DATA
bit mask that REPORT SUPPORTED OPERATION CODES returns (SPC-5 6.35.3) and that the device
server also uses to reject reserved bits (INVALID FIELD IN CDB). Knows nothing about how the
commands run.
"""

from __future__ import annotations

from dataclasses import dataclass

from scsi_core.opcodes import (
    MaintenanceIn,
    Opcode,
    PersistentReserveIn,
    PersistentReserveOut,
    SanitizeServiceAction,
    ServiceActionIn16,
)

from scsi_emulation.options import BlockDeviceOptions

__all__ = ["BLOCK_DEVICE_COMMANDS", "CommandInfo", "find_command", "supported_commands"]


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """A supported command. ``usage[0]`` is the opcode; ``usage`` has the CDB's length."""

    name: str
    opcode: int
    service_action: int | None
    usage: bytes
    #: Recommended timeout in seconds for the command timeouts descriptor.
    timeout: int = 30


def _cmd(op: Opcode, usage_hex: str, sa: int | None = None, name: str | None = None) -> CommandInfo:
    usage = bytes((op,)) + bytes.fromhex(usage_hex)
    return CommandInfo(name or op.name, int(op), sa, usage)


# 10/12/16-byte block command masks: flags, LBA, length, GROUP NUMBER (bits 4..0), CONTROL.
_RW10 = "18 ffffffff 1f ffff 00"
_RW12 = "18 ffffffff ffffffff 1f 00"
_RW16 = "18 ffffffffffffffff ffffffff 1f 00"


def _verify(n: str) -> str:
    return "16" + n[2:]  # DPO, BYTCHK(2..1)


def _cache(n: str) -> str:
    return "02" + n[2:]  # IMMED


def _prin(sa: PersistentReserveIn) -> CommandInfo:
    # SERVICE ACTION, reserved, ALLOCATION LENGTH (SPC-4 6.15.1)
    return _cmd(Opcode.PERSISTENT_RESERVE_IN, f"{sa:02x} 0000000000 ffff 00", sa, sa.name)


def _prout(sa: PersistentReserveOut) -> CommandInfo:
    # SERVICE ACTION, SCOPE|TYPE, reserved, PARAMETER LIST LENGTH (SPC-4 6.16.1)
    return _cmd(Opcode.PERSISTENT_RESERVE_OUT, f"{sa:02x} ff 0000 ffffffff 00", sa, sa.name)


def _sanitize(sa: SanitizeServiceAction) -> CommandInfo:
    # IMMED, AUSE, SERVICE ACTION; PARAMETER LIST LENGTH (SBC-4 5.30.1)
    return _cmd(Opcode.SANITIZE, f"{0xA0 | sa:02x} 0000000000 ffff 00", sa, f"SANITIZE_{sa.name}")


BLOCK_DEVICE_COMMANDS: tuple[CommandInfo, ...] = (
    _cmd(Opcode.TEST_UNIT_READY, "00 00 00 00 00"),
    _cmd(Opcode.REQUEST_SENSE, "01 00 00 ff 00"),
    _cmd(Opcode.READ_6, "1f ffff ff 00"),
    _cmd(Opcode.WRITE_6, "1f ffff ff 00"),
    _cmd(Opcode.INQUIRY, "01 ff ffff 00"),
    _cmd(Opcode.MODE_SELECT_6, "11 00 00 ff 00"),
    _cmd(Opcode.RESERVE_6, "00 00 00 00 00"),
    _cmd(Opcode.RELEASE_6, "00 00 00 00 00"),
    _cmd(Opcode.MODE_SENSE_6, "08 ff ff ff 00"),
    _cmd(Opcode.START_STOP_UNIT, "01 00 0f f7 00"),
    _cmd(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, "00 00 00 03 00"),
    _cmd(Opcode.READ_CAPACITY_10, "00 ffffffff 00 00 01 00"),
    _cmd(Opcode.READ_10, _RW10),
    _cmd(Opcode.WRITE_10, _RW10),
    _cmd(Opcode.WRITE_AND_VERIFY_10, _verify(_RW10)),
    _cmd(Opcode.VERIFY_10, _verify(_RW10)),
    _cmd(Opcode.PRE_FETCH_10, _cache(_RW10)),
    _cmd(Opcode.SYNCHRONIZE_CACHE_10, _cache(_RW10)),
    _cmd(Opcode.WRITE_SAME_10, "08" + _RW10[2:]),  # UNMAP (ANCHOR unsupported)
    _cmd(Opcode.UNMAP, "00 00000000 1f ffff 00"),
    _cmd(Opcode.MODE_SELECT_10, "11 00 00 00 00 00 ffff 00"),
    _cmd(Opcode.MODE_SENSE_10, "18 ff ff 00 00 00 ffff 00"),
    _cmd(Opcode.READ_16, _RW16),
    _cmd(Opcode.COMPARE_AND_WRITE, "18 ffffffffffffffff 000000 ff 1f 00"),
    _cmd(Opcode.WRITE_16, _RW16),
    _cmd(Opcode.ORWRITE_16, _RW16),
    _cmd(Opcode.WRITE_AND_VERIFY_16, _verify(_RW16)),
    _cmd(Opcode.VERIFY_16, _verify(_RW16)),
    _cmd(Opcode.PRE_FETCH_16, _cache(_RW16)),
    _cmd(Opcode.SYNCHRONIZE_CACHE_16, _cache(_RW16)),
    _cmd(Opcode.WRITE_SAME_16, "09" + _RW16[2:]),  # UNMAP, NDOB
    _cmd(
        Opcode.SERVICE_ACTION_IN_16,
        "10 ffffffffffffffff ffffffff 01 00",
        ServiceActionIn16.READ_CAPACITY_16,
        "READ_CAPACITY_16",
    ),
    _cmd(
        Opcode.SERVICE_ACTION_IN_16,
        "12 ffffffffffffffff ffffffff 00 00",
        ServiceActionIn16.GET_LBA_STATUS,
        "GET_LBA_STATUS",
    ),
    _cmd(Opcode.REPORT_LUNS, "00 ff 00 00 00 ffffffff 00 00"),
    _cmd(
        Opcode.MAINTENANCE_IN,
        "0c 87 ff ffff ffffffff 00 00",
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
        "REPORT_SUPPORTED_OPERATION_CODES",
    ),
    _cmd(
        Opcode.MAINTENANCE_IN,
        "0d 80 00 00 00 ffffffff 00 00",
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
        "REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS",
    ),
    _cmd(Opcode.READ_12, _RW12),
    _cmd(Opcode.WRITE_12, _RW12),
    _cmd(Opcode.WRITE_AND_VERIFY_12, _verify(_RW12)),
    _cmd(Opcode.VERIFY_12, _verify(_RW12)),
    _cmd(Opcode.READ_DEFECT_DATA_10, "00 1f 00000000 ffff 00"),  # PLIST GLIST FORMAT
    _cmd(Opcode.READ_DEFECT_DATA_12, "1f ffffffff ffffffff 00 00"),
    *(_prin(sa) for sa in PersistentReserveIn),
    *(
        _prout(sa)
        for sa in PersistentReserveOut
        if sa
        not in (
            PersistentReserveOut.REGISTER_AND_MOVE,
            PersistentReserveOut.REPLACE_LOST_RESERVATION,
        )
    ),
    _sanitize(SanitizeServiceAction.OVERWRITE),
    _sanitize(SanitizeServiceAction.BLOCK_ERASE),
    _sanitize(SanitizeServiceAction.EXIT_FAILURE_MODE),
    # EXTENDED COPY (LID1) is service action 00h of 83h; RECEIVE COPY STATUS (LID1) and
    # RECEIVE COPY OPERATING PARAMETERS are 00h and 03h of 84h (SPC-4 6.4, 6.18).
    _cmd(Opcode.EXTENDED_COPY, "00 0000000000000000 ffffffff 00 00", 0x00, "EXTENDED_COPY_LID1"),
    _cmd(Opcode.RECEIVE_COPY_RESULTS, "00 ff 00000000000000 ffffffff 00 00", 0x00, "COPY_STATUS"),
    _cmd(
        Opcode.RECEIVE_COPY_RESULTS,
        "03 00 00000000000000 ffffffff 00 00",
        0x03,
        "OPERATING_PARAMETERS",
    ),
    # WRPROTECT must be 0; ATOMIC BOUNDARY must be 0 (MAXIMUM ATOMIC BOUNDARY SIZE is 0).
    _cmd(Opcode.WRITE_ATOMIC_16, "18 ffffffffffffffff 0000 ffff 1f 00"),
)

# Commands offered only on thin-provisioned LUs: their effect is deallocation.
_THIN_ONLY = frozenset(((Opcode.UNMAP, None), (Opcode.SANITIZE, SanitizeServiceAction.BLOCK_ERASE)))

_BY_KEY = {(c.opcode, c.service_action): c for c in BLOCK_DEVICE_COMMANDS}
SERVICE_ACTION_OPCODES = frozenset(
    c.opcode for c in BLOCK_DEVICE_COMMANDS if c.service_action is not None
)


def find_command(opcode: int, service_action: int | None) -> CommandInfo | None:
    """The supported command with this opcode (and service action, for opcodes that have one)."""
    return _BY_KEY.get((opcode, service_action if opcode in SERVICE_ACTION_OPCODES else None))


def supported_commands(options: BlockDeviceOptions) -> tuple[CommandInfo, ...]:
    """The commands a block device with ``options`` offers (and RSOC reports)."""
    thin = options.thin_provisioning
    atomic = options.atomic_transfer_limit > 0
    return tuple(
        c
        for c in BLOCK_DEVICE_COMMANDS
        if (thin or (c.opcode, c.service_action) not in _THIN_ONLY)
        and (atomic or c.opcode != Opcode.WRITE_ATOMIC_16)
    )
