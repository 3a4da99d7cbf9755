"""READ DEFECT DATA(10/12) and WRITE ATOMIC(16) with its Block Limits VPD fields."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.command_builders import assert_check
from scsi_emulation.testing import run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]
BLOCKS = 2048


def defect10(flags: int, allocation: int = 32) -> bytes:
    return bytes((0x37, 0, flags, 0, 0, 0, 0)) + allocation.to_bytes(2, "big") + b"\0"


def defect12(flags: int, allocation: int = 32) -> bytes:
    return bytes((0xB7, flags)) + bytes(4) + allocation.to_bytes(4, "big") + b"\0\0"


@pytest.mark.parametrize("flags", [0x00, 0x18, 0x10 | 3, 0x08 | 5])
def test_read_defect_data_is_an_empty_list(disk: Disk, flags: int) -> None:
    target, _ = disk
    r = run_command(target, defect10(flags), data_in=32)
    assert r.status == Status.GOOD and r.data == bytes((0, flags, 0, 0)) and r.residual == 28
    r = run_command(target, defect12(flags), data_in=32)
    assert r.status == Status.GOOD and r.data == bytes((0, flags)) + bytes(6)


def test_read_defect_data_errors(disk: Disk) -> None:
    target, _ = disk
    for fmt in (1, 2, 7):  # reserved defect list formats
        r = run_command(target, defect10(fmt), data_in=32)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)
        r = run_command(target, defect12(fmt), data_in=32)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    r = run_command(target, defect10(0x20), data_in=32)  # reserved bit
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)
    assert run_command(target, defect10(0, 2), data_in=32).data == bytes(2)


def atomic(lba: int, blocks: int, flags: int = 0, boundary: int = 0) -> bytes:
    return (
        bytes((0x9C, flags))
        + lba.to_bytes(8, "big")
        + boundary.to_bytes(2, "big")
        + blocks.to_bytes(2, "big")
        + b"\0\0"
    )


def test_block_limits_atomic_fields(make_disk: MakeDisk) -> None:
    target, _ = make_disk()
    b0 = run_command(target, b"\x12\x01\xb0\0\xff\0", data_in=255).data
    max_transfer = struct.unpack_from(">I", b0, 8)[0]
    max_atomic, alignment, granularity, with_boundary, boundary = struct.unpack_from(
        ">IIIII", b0, 44
    )
    assert 0 < max_atomic <= max_transfer and max_atomic == 0xFFFF
    assert (alignment, granularity, with_boundary, boundary) == (0, 0, 0, 0)
    target, _ = make_disk(max_transfer_blocks=128)
    b0 = run_command(target, b"\x12\x01\xb0\0\xff\0", data_in=255).data
    assert struct.unpack_from(">I", b0, 44)[0] == 128


def test_write_atomic(disk: Disk) -> None:
    target, _ = disk
    data = bytes(range(256)) * 2 * 8
    for flags in (0, 0x08, 0x10, 0x18):  # DPO/FUA allowed (DPOFUA=1)
        r = run_command(target, atomic(BLOCKS - 8, 8, flags), data_out=data)
        assert r.status == Status.GOOD
    read16 = b"\x88\0" + (BLOCKS - 8).to_bytes(8, "big") + (8).to_bytes(4, "big") + b"\0\0"
    assert run_command(target, read16, data_in=len(data)).data == data
    assert run_command(target, atomic(0, 0)).status == Status.GOOD


@pytest.mark.parametrize(
    ("lba", "blocks"),
    [(BLOCKS - 4, 8), (BLOCKS + 1, 0), (1 << 63, 1), ((1 << 64) - 1, 1), (BLOCKS - 1, 2)],
)
def test_write_atomic_out_of_range(disk: Disk, lba: int, blocks: int) -> None:
    target, _ = disk
    r = run_command(target, atomic(lba, blocks), data_out=bytes(blocks * 512))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)


def test_write_atomic_field_errors(make_disk: MakeDisk) -> None:
    target, _ = make_disk(max_atomic_transfer_blocks=4)
    r = run_command(target, atomic(0, 8), data_out=bytes(8 * 512))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 12)
    r = run_command(target, atomic(0, 1, boundary=1), data_out=bytes(512))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 11)
    r = run_command(target, atomic(0, 1, flags=0x20), data_out=bytes(512))  # WRPROTECT
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    r = run_command(target, atomic(0, 2), data_out=bytes(512))  # short data-out
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)


def test_write_atomic_read_only_and_disabled(make_disk: MakeDisk) -> None:
    target, _ = make_disk(read_only=True)
    r = run_command(target, atomic(0, 1), data_out=bytes(512))
    assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    target, _ = make_disk(max_atomic_transfer_blocks=0)
    r = run_command(target, atomic(0, 1), data_out=bytes(512))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
    b0 = run_command(target, b"\x12\x01\xb0\0\xff\0", data_in=255).data
    assert struct.unpack_from(">III", b0, 44) == (0, 0, 0)
