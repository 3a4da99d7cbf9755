"""Opcode names and CDB lengths (SPC-5 4.2.5.1)."""

from scsi_core.opcodes import (
    MaintenanceIn,
    Opcode,
    ServiceActionIn16,
    cdb_length,
    command_name,
    has_service_action,
)


def test_group_code_lengths() -> None:
    assert cdb_length(Opcode.TEST_UNIT_READY) == 6
    assert cdb_length(Opcode.READ_10) == 10
    assert cdb_length(Opcode.MODE_SENSE_10) == 10
    assert cdb_length(Opcode.READ_16) == 16
    assert cdb_length(Opcode.REPORT_LUNS) == 12
    assert cdb_length(Opcode.VARIABLE_LENGTH) == 32
    assert cdb_length(0xC0) == 0


def test_names() -> None:
    assert command_name(0x28) == "READ_10"
    assert command_name(0x9E, 0x10) == "SERVICE_ACTION_IN_16/READ_CAPACITY_16"
    assert command_name(0xA3, 0x0C) == "MAINTENANCE_IN/REPORT_SUPPORTED_OPERATION_CODES"
    assert command_name(0x7F, 0x0009) == "VARIABLE_LENGTH/READ_32"
    assert command_name(0xFF) == "OPCODE_FFh"
    assert command_name(0x9E, 0x1F) == "SERVICE_ACTION_IN_16/SA_1Fh"
    assert command_name(0x28, 3) == "READ_10"


def test_service_action_opcodes() -> None:
    assert has_service_action(Opcode.SERVICE_ACTION_IN_16)
    assert has_service_action(Opcode.VARIABLE_LENGTH)
    assert not has_service_action(Opcode.READ_10)
    assert int(ServiceActionIn16.GET_LBA_STATUS) == 0x12
    assert int(MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS) == 0x0D
