"""READ/WRITE (6/10/12/16): data, ranges, FUA, residuals, write protection (SBC-4 5.15-5.42)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import pytest
from scsi_core.cdb import BlockCdb, encode_block_cdb
from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.backend import FileBackend
from scsi_emulation.testing import run_command

BLOCKS = 2048
Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]

READS = (Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16)
WRITES = (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)


def cdb(op: int, lba: int, n: int, **flags: bool) -> bytes:
    return encode_block_cdb(BlockCdb(op, lba, n, **flags))


@pytest.mark.parametrize(("read_op", "write_op"), list(zip(READS, WRITES, strict=True)))
def test_write_then_read_back(disk: Disk, read_op: int, write_op: int) -> None:
    target, _ = disk
    payload = bytes(range(256)) * 6  # 3 blocks
    r = run_command(target, cdb(write_op, 10, 3), data_out=payload)
    assert (r.status, r.residual) == (Status.GOOD, 0)
    r = run_command(target, cdb(read_op, 10, 3), data_in=len(payload))
    assert (r.status, r.data, r.residual) == (Status.GOOD, payload, 0)


def test_last_block_and_out_of_range(disk: Disk) -> None:
    target, _ = disk
    assert run_command(target, cdb(0x28, BLOCKS - 1, 1), data_in=512).status == Status.GOOD
    for lba, n in ((BLOCKS - 1, 2), (BLOCKS, 0), (BLOCKS + 1, 0), (0xFFFFFFFF, 1)):
        r = run_command(target, cdb(0x28, lba, n), data_in=1024)
        assert r.status == Status.CHECK_CONDITION
        assert r.sense is not None and r.sense.key == SenseKey.ILLEGAL_REQUEST
        assert r.sense.code == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
        assert r.residual == 1024  # nothing transferred
    r = run_command(target, cdb(0x88, 2**63, 1), data_in=512)
    assert r.sense is not None and r.sense.code == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE


def test_zero_blocks_is_good(disk: Disk) -> None:
    target, _ = disk
    assert run_command(target, cdb(0x28, 0, 0)).status == Status.GOOD
    assert run_command(target, cdb(0x2A, 0, 0)).status == Status.GOOD


def test_read6_zero_means_256_blocks(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, bytes((0x08, 0, 0, 0, 0, 0)), data_in=256 * 512)
    assert (r.status, len(r.data), r.residual) == (Status.GOOD, 256 * 512, 0)


@pytest.mark.parametrize("op", [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A])
def test_protect_field_is_invalid(disk: Disk, op: int) -> None:
    target, _ = disk
    r = run_command(target, cdb(op, 0, 1)[:1] + b"\x20" + cdb(op, 0, 1)[2:], data_out=bytes(512))
    assert r.sense is not None and r.sense.code == Asc.INVALID_FIELD_IN_CDB
    fp = r.sense.field_pointer
    assert fp is not None and (fp.byte, fp.bit, fp.in_cdb) == (1, 7, True)


def test_short_data_in_buffer_gets_what_fits(disk: Disk) -> None:
    target, _ = disk
    run_command(target, cdb(0x2A, 0, 2), data_out=b"x" * 1024)
    r = run_command(target, cdb(0x28, 0, 2), data_in=600)
    assert (r.status, r.data, r.residual) == (Status.GOOD, b"x" * 600, 0)


def test_long_data_in_buffer_reports_residual(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, cdb(0x28, 0, 1), data_in=4096)
    assert (r.status, r.residual) == (Status.GOOD, 4096 - 512)


def test_short_data_out_writes_nothing(disk: Disk) -> None:
    target, _ = disk
    run_command(target, cdb(0x2A, 0, 1), data_out=b"a" * 512)
    r = run_command(target, cdb(0x2A, 0, 1), data_out=b"b" * 200)
    assert r.status == Status.CHECK_CONDITION and r.residual == 200
    assert r.sense is not None and r.sense.code == Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    assert run_command(target, cdb(0x28, 0, 1), data_in=512).data == b"a" * 512
    r = run_command(target, cdb(0x2A, 0, 1))  # no data-out buffer at all
    assert r.status == Status.CHECK_CONDITION


def test_long_data_out_reports_residual(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, cdb(0x2A, 0, 1), data_out=b"c" * 1000)
    assert (r.status, r.residual) == (Status.GOOD, 488)


def test_read_only_lu_refuses_writes(make_disk: MakeDisk) -> None:
    target, _ = make_disk(read_only=True)
    for op in WRITES:
        r = run_command(target, cdb(op, 0, 1), data_out=bytes(512))
        assert r.status == Status.CHECK_CONDITION
        assert r.sense is not None and r.sense.key == SenseKey.DATA_PROTECT
        assert r.sense.code == Asc.WRITE_PROTECTED
    assert run_command(target, cdb(0x28, 0, 1), data_in=512).status == Status.GOOD


class RecordingBackend(FileBackend):
    """Remembers the durable flag of each write."""

    durable_writes: list[bool]

    def write(
        self, offset: int, buffers: Sequence[memoryview], length: int, durable: bool = False
    ) -> None:
        self.durable_writes.append(durable)
        super().write(offset, buffers, length, durable)


def test_fua_and_write_cache_make_writes_durable(image: pathlib.Path) -> None:
    backend = RecordingBackend(image)
    backend.durable_writes = []
    device = BlockDevice(backend)
    target = EmulatedTarget({0: device})
    run_command(target, bytes(6))
    run_command(target, cdb(0x2A, 0, 1), data_out=bytes(512))
    run_command(target, cdb(0x2A, 0, 1, fua=True), data_out=bytes(512))
    device.set_write_cache(False)
    run_command(target, cdb(0x2A, 0, 1), data_out=bytes(512))
    assert backend.durable_writes == [False, True, True]
    target.close()
