"""SPC commands: INQUIRY/VPD, REQUEST SENSE, REPORT LUNS, MODE SENSE/SELECT, RSOC, RSTMF,
START STOP UNIT, PREVENT ALLOW, RESERVE/RELEASE(6), unit attentions."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from scsi_core.cdb import BlockCdb, encode_block_cdb
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.testing import CommandResult, run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return bytes((0x12, evpd, page)) + alloc.to_bytes(2, "big") + b"\0"


def assert_check(r: CommandResult, key: SenseKey, code: Asc, byte: int | None = None) -> None:
    assert r.status == Status.CHECK_CONDITION
    assert r.sense is not None
    assert (SenseKey(r.sense.key), Asc(r.sense.code)) == (key, code)
    if byte is not None:
        fp = r.sense.field_pointer
        assert fp is not None and fp.byte == byte


def test_standard_inquiry(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, inquiry(), data_in=255)
    d = r.data
    assert r.status == Status.GOOD and len(d) == 74 and r.residual == 255 - 74
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2 and d[4] == len(d) - 5
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"PYVHOST " and all(0x20 <= c < 0x7F for c in d[8:36])
    assert b"\x04\x60" in d[58:74]  # SPC-4 version descriptor


def test_inquiry_allocation_length_truncates(disk: Disk) -> None:
    target, _ = disk
    for alloc in (0, 1, 5, 36):
        r = run_command(target, inquiry(alloc=alloc), data_in=255)
        assert r.status == Status.GOOD and len(r.data) == alloc


def test_vpd_pages(disk: Disk) -> None:
    target, _ = disk
    pages = run_command(target, inquiry(1, 0x00), data_in=255).data
    listed = list(pages[4 : 4 + pages[3]])
    assert listed == sorted(listed) and {0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(listed)
    for code in listed:
        d = run_command(target, inquiry(1, code), data_in=255).data
        assert d[1] == code and len(d) == 4 + int.from_bytes(d[2:4], "big")
    ident = run_command(target, inquiry(1, 0x83), data_in=255).data
    assert ident[4:8] == bytes((0x01, 0x03, 0x00, 0x08)) and ident[8] >> 4 == 0x3  # NAA 3h
    b1 = run_command(target, inquiry(1, 0xB1), data_in=255).data
    assert b1[4:6] == b"\x00\x01"  # non-rotating medium
    b2 = run_command(target, inquiry(1, 0xB2), data_in=255).data
    assert b2[5] & 0xE0 == 0xE0 and (b2[5] >> 2) & 7 == 1  # LBPU LBPWS LBPWS10, LBPRZ
    b0 = run_command(target, inquiry(1, 0xB0), data_in=255).data
    assert len(b0) == 64 and b0[4] & 1  # WSNZ
    assert struct.unpack_from(">I", b0, 20)[0] > 0  # MAXIMUM UNMAP LBA COUNT


def test_naa_is_stable_and_per_lun(image: object) -> None:
    from scsi_emulation.identity import DeviceIdentity

    ident = DeviceIdentity(serial="abc")
    assert ident.naa_designator(0) == DeviceIdentity(serial="abc").naa_designator(0)
    assert ident.naa_designator(0) != ident.naa_designator(1)


def test_rotating_disk(make_disk: MakeDisk) -> None:
    target, _ = make_disk(solid_state=False, thin_provisioning=False)
    assert run_command(target, inquiry(1, 0xB1), data_in=255).data[4:6] == b"\x00\x00"
    assert run_command(target, inquiry(1, 0xB2), data_in=255).data[5] == 0


@pytest.mark.parametrize(
    ("cdb", "byte"),
    [(inquiry(0, 0x80), 2), (inquiry(1, 0x42), 2), (bytes((0x12, 0x02, 0, 0, 255, 0)), 1)],
)
def test_inquiry_invalid_fields(disk: Disk, cdb: bytes, byte: int) -> None:
    target, _ = disk
    r = run_command(target, cdb, data_in=255)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, byte)
    assert r.residual == 255


def test_unit_attention_reported_once_per_nexus(image: object, make_disk: MakeDisk) -> None:
    target, _ = make_disk()
    # nexus 1 is new: INQUIRY does not report the UA, TEST UNIT READY does, once.
    assert run_command(target, inquiry(), data_in=96, nexus=1).status == Status.GOOD
    r = run_command(target, bytes(6), nexus=1)
    assert_check(r, SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED)
    assert run_command(target, bytes(6), nexus=1).status == Status.GOOD


def test_request_sense_reports_and_clears_ua(make_disk: MakeDisk) -> None:
    target, _ = make_disk()
    r = run_command(target, bytes((0x03, 0, 0, 0, 252, 0)), data_in=252, nexus=7)
    assert r.status == Status.GOOD
    assert Asc(parse_sense(r.data).code) == Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
    r = run_command(target, bytes((0x03, 1, 0, 0, 252, 0)), data_in=252, nexus=7)
    assert r.data[0] == 0x72 and parse_sense(r.data).key == SenseKey.NO_SENSE
    assert run_command(target, bytes(6), nexus=7).status == Status.GOOD


def test_capacity_change_ua(disk: Disk, image: object) -> None:
    import os
    import pathlib

    target, device = disk
    assert isinstance(image, pathlib.Path)
    os.truncate(image, 2 << 20)
    device.resize()
    r = run_command(target, bytes(6))
    assert_check(r, SenseKey.UNIT_ATTENTION, Asc.CAPACITY_DATA_HAS_CHANGED)
    cap = run_command(target, bytes((0x25,)) + bytes(9), data_in=8).data
    assert int.from_bytes(cap[:4], "big") == 4095


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return bytes((0xA0, 0, select, 0, 0, 0)) + alloc.to_bytes(4, "big") + b"\0\0"


def test_report_luns(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, report_luns(), data_in=4096)
    assert r.data == b"\0\0\0\x08" + bytes(4) + bytes(8)
    r = run_command(target, report_luns(1), data_in=4096)
    assert r.data[8:16] == b"\xc1\x01" + bytes(6)
    r = run_command(target, report_luns(2), data_in=4096)
    assert r.data[3] == 16
    assert_check(
        run_command(target, report_luns(3), data_in=4096),
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_CDB,
        2,
    )
    assert_check(
        run_command(target, report_luns(0, 15), data_in=4096),
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_CDB,
        6,
    )


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, 0, alloc, 0))


def mode_sense10(page: int, pc: int = 0, llbaa: bool = False, alloc: int = 1024) -> bytes:
    return (
        bytes((0x5A, 0x10 if llbaa else 0, (pc << 6) | page, 0, 0, 0, 0))
        + alloc.to_bytes(2, "big")
        + b"\0"
    )


def test_mode_sense_all_pages_and_page_controls(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, mode_sense6(0x3F), data_in=255)
    d = r.data
    assert r.status == Status.GOOD and d[0] == len(d) - 1 and d[2] & 0x10 and d[3] == 8
    assert int.from_bytes(d[4:8], "big") == 2048 and int.from_bytes(d[9:12], "big") == 512
    pages = d[12:]
    codes = []
    while pages:
        codes.append(pages[0] & 0x3F)
        pages = pages[2 + pages[1] :]
    assert codes == [0x01, 0x08, 0x0A]
    current = run_command(target, mode_sense6(0x08, 0, True), data_in=255).data
    assert current[4:6] == b"\x08\x12" and current[6] & 0x04  # WCE on by default
    changeable = run_command(target, mode_sense6(0x08, 1, True), data_in=255).data
    assert changeable[6] == 0x04
    default = run_command(target, mode_sense6(0x08, 2, True), data_in=255).data
    assert default[6] & 0x04
    saved = run_command(target, mode_sense6(0x08, 3, True), data_in=255)
    assert_check(saved, SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
    bad = run_command(target, mode_sense6(0x19), data_in=255)
    assert_check(bad, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)


def test_mode_sense10_long_lba(disk: Disk) -> None:
    target, _ = disk
    d = run_command(target, mode_sense10(0x0A, llbaa=True), data_in=1024).data
    assert int.from_bytes(d[:2], "big") == len(d) - 2 and d[4] & 1 and d[7] == 16
    assert int.from_bytes(d[8:16], "big") == 2048 and d[24] == 0x0A


def test_read_only_sets_wp(make_disk: MakeDisk) -> None:
    target, _ = make_disk(read_only=True)
    assert run_command(target, mode_sense6(0x3F), data_in=255).data[2] & 0x80


def mode_select6(params: bytes, sp: bool = False) -> bytes:
    return bytes((0x15, 0x10 | int(sp), 0, 0, len(params), 0))


def test_mode_select_changes_wce_and_tells_other_nexuses(disk: Disk) -> None:
    target, device = disk
    run_command(target, bytes(6), nexus=2)  # nexus 2 consumes its power-on UA
    page = run_command(target, mode_sense6(0x08, 0, True), data_in=255).data[4:]
    new = bytearray(page)
    new[2] &= ~0x04
    r = run_command(target, mode_select6(bytes(4) + bytes(new)), data_out=bytes(4) + bytes(new))
    assert r.status == Status.GOOD and device.durable
    assert not run_command(target, mode_sense6(0x08, 0, True), data_in=255).data[6] & 0x04
    assert run_command(target, bytes(6)).status == Status.GOOD  # the selecting nexus: no UA
    r = run_command(target, bytes(6), nexus=2)
    assert_check(r, SenseKey.UNIT_ATTENTION, Asc.MODE_PARAMETERS_CHANGED)


def test_mode_select_errors(disk: Disk) -> None:
    target, _ = disk
    page = bytearray(run_command(target, mode_sense6(0x08, 0, True), data_in=255).data[4:])
    page[3] = 0x55  # not changeable
    params = bytes(4) + bytes(page)
    r = run_command(target, mode_select6(params), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert r.sense is not None and r.sense.field_pointer is not None
    assert (r.sense.field_pointer.byte, r.sense.field_pointer.in_cdb) == (7, False)
    r = run_command(target, mode_select6(bytes(4), sp=True), data_out=bytes(4))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    r = run_command(target, mode_select6(bytes(3)), data_out=bytes(3))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    params = bytes(4) + bytes((0x19, 2, 0, 0))
    r = run_command(target, mode_select6(params), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 4)
    r = run_command(target, mode_select6(bytes(8)), data_out=bytes(4))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)


def rsoc(option: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return (
        bytes((0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode))
        + sa.to_bytes(2, "big")
        + (4096).to_bytes(4, "big")
        + b"\0\0"
    )


def test_report_supported_operation_codes(disk: Disk) -> None:
    target, device = disk
    d = run_command(target, rsoc(0), data_in=4096).data
    length = int.from_bytes(d[:4], "big")
    assert length == 8 * len(device.commands) == len(d) - 4
    listed = {(d[i], int.from_bytes(d[i + 2 : i + 4], "big")) for i in range(4, len(d), 8)}
    assert (0x28, 0) in listed and (0x9E, 0x10) in listed
    d = run_command(target, rsoc(0, rctd=True), data_in=4096).data
    assert int.from_bytes(d[:4], "big") == 20 * len(device.commands)
    one = run_command(target, rsoc(1, 0x28), data_in=4096).data
    assert one[1] & 0x07 == 3 and one[2:4] == b"\x00\x0a" and one[4] == 0x28
    sa = run_command(target, rsoc(2, 0x9E, 0x10, rctd=True), data_in=4096).data
    assert sa[1] == 0x83 and sa[4:6] == b"\x9e\x10" and len(sa) == 4 + 16 + 12
    assert run_command(target, rsoc(1, 0x5E), data_in=4096).status == Status.CHECK_CONDITION
    missing = run_command(target, rsoc(1, 0xC0), data_in=4096).data
    assert missing[1] & 0x07 == 1
    r = run_command(target, rsoc(2, 0x28), data_in=4096)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 3)
    assert run_command(target, rsoc(3, 0x28), data_in=4096).data[4] == 0x28


def test_every_reported_command_is_dispatched(disk: Disk) -> None:
    target, device = disk
    for info in device.commands:
        cdb = bytearray(info.usage)
        for i in range(1, len(cdb)):
            cdb[i] = 0
        if info.service_action is not None:
            cdb[1] = info.service_action
        r = run_command(target, bytes(cdb), data_in=4096, data_out=bytes(4096))
        if r.sense is not None:
            assert r.sense.code != Asc.INVALID_COMMAND_OPERATION_CODE, info.name


def test_reserved_bits_are_rejected(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, bytes((0x00, 0x01, 0, 0, 0, 0)))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    r = run_command(target, bytes((0x00, 0, 0, 0, 0, 0x04)))  # NACA
    assert r.sense is not None and r.sense.field_pointer is not None
    assert (r.sense.field_pointer.byte, r.sense.field_pointer.bit) == (5, 2)


def test_unknown_opcode_and_service_action(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, bytes((0xC5,)) + bytes(15))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
    r = run_command(target, bytes((0x9E, 0x1F)) + bytes(14), data_in=32)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)


def test_report_supported_tmfs(disk: Disk) -> None:
    target, _ = disk
    cdb = bytes((0xA3, 0x0D, 0, 0, 0, 0)) + (4).to_bytes(4, "big") + b"\0\0"
    d = run_command(target, cdb, data_in=16).data
    assert len(d) == 4 and d[0] & 0x80 and d[0] & 0x08  # ABORT TASK, LU RESET
    cdb = bytes((0xA3, 0x0D, 0x80, 0, 0, 0)) + (16).to_bytes(4, "big") + b"\0\0"
    assert run_command(target, cdb, data_in=16).data[3] == 0x0C


def sbc(op: int, lba: int = 0, n: int = 1) -> bytes:
    return encode_block_cdb(BlockCdb(op, lba, n))


def test_removable_medium(make_disk: MakeDisk) -> None:
    target, _ = make_disk(removable=True)
    assert run_command(target, inquiry(), data_in=96).data[1] & 0x80
    prevent = bytes((0x1E, 0, 0, 0, 1, 0))
    allow = bytes((0x1E, 0, 0, 0, 0, 0))
    eject = bytes((0x1B, 0, 0, 0, 0x02, 0))
    load = bytes((0x1B, 0, 0, 0, 0x03, 0))
    assert run_command(target, prevent).status == Status.GOOD
    assert_check(run_command(target, eject), SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
    assert run_command(target, allow).status == Status.GOOD
    assert run_command(target, eject).status == Status.GOOD
    assert_check(run_command(target, bytes(6)), SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
    r = run_command(target, sbc(0x28), data_in=512)
    assert_check(r, SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
    sense = run_command(target, bytes((0x03, 0, 0, 0, 18, 0)), data_in=18).data
    assert parse_sense(sense).key == SenseKey.NOT_READY
    assert run_command(target, load).status == Status.GOOD
    # The loading nexus gets no 28/00 (libiscsi StartStopUnit.Simple); other nexuses do
    # (tests/test_removable_medium.py).
    assert run_command(target, bytes(6)).status == Status.GOOD
    bad = bytes((0x1E, 0, 0, 0, 2, 0))
    assert_check(run_command(target, bad), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 4)


def test_start_stop_power_condition_and_fixed_disk(disk: Disk) -> None:
    target, device = disk
    assert run_command(target, bytes((0x1B, 0, 0, 0, 0x02, 0))).status == Status.GOOD
    assert device.medium_present  # not removable: LOEJ is ignored
    assert run_command(target, bytes((0x1B, 0, 0, 0, 0x30, 0))).status == Status.GOOD


def test_reserve_release_6(disk: Disk) -> None:
    target, _ = disk
    run_command(target, bytes(6), nexus=2)  # consume nexus 2's power-on UA
    assert run_command(target, bytes((0x16,)) + bytes(5)).status == Status.GOOD
    assert run_command(target, bytes(6), nexus=2).status == Status.RESERVATION_CONFLICT
    r = run_command(target, sbc(0x28), data_in=512, nexus=2)
    assert r.status == Status.RESERVATION_CONFLICT
    assert run_command(target, inquiry(), data_in=96, nexus=2).status == Status.GOOD
    assert run_command(target, bytes((0x17,)) + bytes(5), nexus=2).status == Status.GOOD
    assert run_command(target, bytes(6), nexus=2).status == Status.RESERVATION_CONFLICT
    assert run_command(target, sbc(0x28), data_in=512).status == Status.GOOD
    assert run_command(target, bytes((0x17,)) + bytes(5)).status == Status.GOOD
    assert run_command(target, bytes(6), nexus=2).status == Status.GOOD
