"""SBC commands: READ CAPACITY, VERIFY, WRITE AND VERIFY, SYNCHRONIZE CACHE, PRE-FETCH,
WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, GET LBA STATUS."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from scsi_core.cdb import BlockCdb, encode_block_cdb
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.testing import CommandResult, run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]
BLOCKS = 2048


def cdb(op: int, lba: int = 0, n: int = 1, **flags: object) -> bytes:
    return encode_block_cdb(BlockCdb(op, lba, n, **flags))  # type: ignore[arg-type]


def code(r: CommandResult) -> Asc | None:
    return Asc(r.sense.code) if r.sense is not None else None


def write(target: EmulatedTarget, lba: int, data: bytes) -> None:
    assert run_command(target, cdb(0x8A, lba, len(data) // 512), data_out=data).status == 0


def read(target: EmulatedTarget, lba: int, n: int) -> bytes:
    return run_command(target, cdb(0x88, lba, n), data_in=n * 512).data


def test_read_capacity(disk: Disk) -> None:
    target, _ = disk
    d = run_command(target, bytes((0x25,)) + bytes(9), data_in=8).data
    assert struct.unpack(">II", d) == (BLOCKS - 1, 512)
    r = run_command(target, bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)), data_in=8)
    assert code(r) == Asc.INVALID_FIELD_IN_CDB
    rc16 = bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
    d = run_command(target, rc16, data_in=32).data
    last, size, _, lbppbe, flags = struct.unpack_from(">QIBBH", d)
    assert (last, size) == (BLOCKS - 1, 512)
    assert lbppbe >= 3 and flags & 0x8000 and flags & 0x4000  # 4 KiB fs blocks, LBPME, LBPRZ
    short = bytes((0x9E, 0x10)) + bytes(8) + (12).to_bytes(4, "big") + b"\0\0"
    r = run_command(target, short, data_in=32)
    assert len(r.data) == 12 and r.residual == 20


def test_4k_logical_blocks(make_disk: MakeDisk) -> None:
    target, _ = make_disk(block_size=4096)
    d = run_command(target, bytes((0x25,)) + bytes(9), data_in=8).data
    assert struct.unpack(">II", d) == (BLOCKS // 8 - 1, 4096)
    write(target, 0, b"")  # zero blocks
    r = run_command(target, cdb(0x2A, 1, 1), data_out=b"q" * 4096)
    assert r.status == Status.GOOD
    assert run_command(target, cdb(0x28, 1, 1), data_in=4096).data == b"q" * 4096


@pytest.mark.parametrize("op", [0x2F, 0xAF, 0x8F])
def test_verify(disk: Disk, op: int) -> None:
    target, _ = disk
    data = b"v" * 1024
    write(target, 4, data)
    assert run_command(target, cdb(op, 4, 2)).status == Status.GOOD  # BYTCHK 0
    assert run_command(target, cdb(op, 4, 2, bytchk=1), data_out=data).status == Status.GOOD
    bad = bytearray(data)
    bad[700] = 0
    r = run_command(target, cdb(op, 4, 2, bytchk=1), data_out=bytes(bad))
    assert r.status == Status.CHECK_CONDITION and r.sense is not None
    assert (SenseKey(r.sense.key), code(r)) == (
        SenseKey.MISCOMPARE,
        Asc.MISCOMPARE_DURING_VERIFY_OPERATION,
    )
    assert r.sense.information == 700
    r = run_command(target, cdb(op, 4, 2, bytchk=3), data_out=b"v" * 512)
    assert r.status == Status.GOOD
    assert code(run_command(target, cdb(op, 4, 2, bytchk=2))) == Asc.INVALID_FIELD_IN_CDB
    r = run_command(target, cdb(op, BLOCKS - 1, 2))
    assert code(r) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE


@pytest.mark.parametrize("op", [0x2E, 0xAE, 0x8E])
def test_write_and_verify(disk: Disk, op: int) -> None:
    target, _ = disk
    assert run_command(target, cdb(op, 8, 1), data_out=b"w" * 512).status == Status.GOOD
    assert read(target, 8, 1) == b"w" * 512
    r = run_command(target, cdb(op, 8, 1, bytchk=2), data_out=b"w" * 512)
    assert code(r) == Asc.INVALID_FIELD_IN_CDB


@pytest.mark.parametrize("op", [0x35, 0x91, 0x34, 0x90])
def test_sync_cache_and_prefetch(disk: Disk, op: int) -> None:
    target, _ = disk
    assert run_command(target, cdb(op, 0, 0)).status == Status.GOOD
    assert run_command(target, cdb(op, 10, 5, immed=True)).status == Status.GOOD
    assert code(run_command(target, cdb(op, BLOCKS, 1))) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same(make_disk: MakeDisk, op: int) -> None:
    target, device = make_disk(max_write_same_blocks=64)
    pattern = bytes(range(256)) * 2
    assert run_command(target, cdb(op, 100, 5), data_out=pattern).status == Status.GOOD
    assert read(target, 100, 5) == pattern * 5
    r = run_command(target, cdb(op, 100, 5, unmap=True), data_out=bytes(512))
    assert r.status == Status.GOOD
    assert read(target, 100, 5) == bytes(2560)
    assert code(run_command(target, cdb(op, 0, 0), data_out=pattern)) == Asc.INVALID_FIELD_IN_CDB
    r = run_command(target, cdb(op, BLOCKS - 1, 2), data_out=pattern)
    assert code(r) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    r = run_command(target, cdb(op, 0, 1, anchor=True), data_out=pattern)
    assert code(r) == Asc.INVALID_FIELD_IN_CDB
    r = run_command(target, cdb(op, 0, 1), data_out=pattern[:100])
    assert code(r) == Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    too_many = device.options.max_write_same_blocks + 1
    r = run_command(target, cdb(op, 0, too_many), data_out=pattern)
    assert code(r) == Asc.INVALID_FIELD_IN_CDB


def test_write_same_16_ndob(disk: Disk) -> None:
    target, _ = disk
    write(target, 50, b"z" * 1024)
    assert run_command(target, cdb(0x93, 50, 2, ndob=True, unmap=True)).status == Status.GOOD
    assert read(target, 50, 2) == bytes(1024)


def test_write_same_unmap_needs_thin(make_disk: MakeDisk) -> None:
    target, device = make_disk(thin_provisioning=False)
    r = run_command(target, cdb(0x93, 0, 1, unmap=True), data_out=bytes(512))
    assert code(r) == Asc.INVALID_FIELD_IN_CDB
    assert all(c.opcode != 0x42 for c in device.commands)
    r = run_command(target, bytes((0x42,)) + bytes(9))
    assert code(r) == Asc.INVALID_COMMAND_OPERATION_CODE


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return bytes((0x42, int(anchor), 0, 0, 0, 0, 0)) + length.to_bytes(2, "big") + b"\0"


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def test_unmap(disk: Disk) -> None:
    target, device = disk
    write(target, 0, b"u" * 512 * 64)
    params = unmap_params((0, 16), (32, 8))
    r = run_command(target, unmap_cdb(len(params)), data_out=params)
    assert r.status == Status.GOOD
    assert read(target, 0, 16) == bytes(8192) and read(target, 16, 16) == b"u" * 8192
    assert read(target, 32, 8) == bytes(4096)
    assert run_command(target, unmap_cdb(0)).status == Status.GOOD
    r = run_command(target, unmap_cdb(6), data_out=bytes(6))
    assert code(r) == Asc.PARAMETER_LIST_LENGTH_ERROR
    params = unmap_params((BLOCKS - 1, 2))
    r = run_command(target, unmap_cdb(len(params)), data_out=params)
    assert code(r) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    r = run_command(target, unmap_cdb(len(params), anchor=True), data_out=params)
    assert code(r) == Asc.INVALID_FIELD_IN_CDB
    many = unmap_params(*[(0, 1)] * (device.options.max_unmap_descriptors + 1))
    r = run_command(target, unmap_cdb(len(many)), data_out=many)
    assert code(r) == Asc.INVALID_FIELD_IN_PARAMETER_LIST


def test_unmap_read_only(make_disk: MakeDisk) -> None:
    target, _ = make_disk(read_only=True)
    params = unmap_params((0, 1))
    r = run_command(target, unmap_cdb(len(params)), data_out=params)
    assert r.sense is not None and r.sense.key == SenseKey.DATA_PROTECT


def test_compare_and_write(disk: Disk) -> None:
    target, _ = disk
    write(target, 20, b"o" * 1024)
    good = b"o" * 1024 + b"n" * 1024
    r = run_command(target, cdb(0x89, 20, 2), data_out=good)
    assert r.status == Status.GOOD and read(target, 20, 2) == b"n" * 1024
    r = run_command(target, cdb(0x89, 20, 2), data_out=good)
    assert r.sense is not None and r.sense.key == SenseKey.MISCOMPARE
    assert r.sense.information == 0 and read(target, 20, 2) == b"n" * 1024
    r = run_command(target, cdb(0x89, BLOCKS - 1, 2), data_out=good)
    assert code(r) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    r = run_command(target, cdb(0x89, 20, 2), data_out=good[:1500])
    assert code(r) == Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT


def test_orwrite(disk: Disk) -> None:
    target, _ = disk
    write(target, 30, b"\x0f" * 512)
    r = run_command(target, cdb(0x8B, 30, 1), data_out=b"\xf0" * 512)
    assert r.status == Status.GOOD and read(target, 30, 1) == b"\xff" * 512


def get_lba_status(lba: int, alloc: int = 1024) -> bytes:
    return bytes((0x9E, 0x12)) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + b"\0\0"


def test_get_lba_status(disk: Disk) -> None:
    target, device = disk
    if not device.backend.supports_discard:
        pytest.skip("file system without hole punching")
    write(target, 64, b"d" * 512 * 8)  # 4 KiB of data at byte 32768
    d = run_command(target, get_lba_status(0), data_in=1024).data
    n = (int.from_bytes(d[:4], "big") - 4) // 16
    extents = [struct.unpack_from(">QIB", d, 8 + 16 * i) for i in range(n)]
    assert extents[0] == (0, 64, 1)
    assert extents[1][0] == 64 and extents[1][2] == 0 and extents[1][1] >= 8
    assert sum(e[1] for e in extents) == BLOCKS
    r = run_command(target, get_lba_status(BLOCKS), data_in=1024)
    assert code(r) == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    d = run_command(target, get_lba_status(0, alloc=24), data_in=1024).data
    assert len(d) == 24
