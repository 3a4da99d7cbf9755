"""SWP in the control mode page: writes and SANITIZE end in WRITE PROTECTED while it is set."""

from __future__ import annotations

from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.command_builders import assert_check, write10
from scsi_emulation.testing import run_command

Disk = tuple[EmulatedTarget, BlockDevice]


def control_page(target: EmulatedTarget, pc: int = 0) -> bytes:
    r = run_command(target, bytes((0x1A, 0x08, (pc << 6) | 0x0A, 0, 255, 0)), data_in=255)
    assert r.status == Status.GOOD
    return r.data


def select_control(target: EmulatedTarget, swp: bool) -> None:
    page = bytearray(control_page(target)[4:])
    page[4] = (page[4] & ~0x08) | (0x08 if swp else 0)
    params = bytes(4) + bytes(page)
    cdb = bytes((0x15, 0x10, 0, 0, len(params), 0))
    assert run_command(target, cdb, data_out=params).status == Status.GOOD


def test_swp_is_changeable_and_write_protects(disk: Disk) -> None:
    target, _ = disk
    assert control_page(target, pc=1)[4 + 4] & 0x08  # changeable
    select_control(target, swp=True)
    sense = control_page(target)
    assert sense[2] & 0x80 and sense[4 + 4] & 0x08  # WP in the header, SWP in the page
    r = run_command(target, write10(), data_out=bytes(512))
    assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    r = run_command(target, b"\x48\x02" + bytes(8))  # SANITIZE BLOCK ERASE
    assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    select_control(target, swp=False)
    assert not control_page(target)[2] & 0x80
    assert run_command(target, write10(), data_out=bytes(512)).status == Status.GOOD
