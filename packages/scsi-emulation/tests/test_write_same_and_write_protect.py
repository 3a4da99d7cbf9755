"""WRITE SAME's Data-Out size rule, write protection before the other WRITE SAME / UNMAP
checks, and GET LBA STATUS right after UNMAP of one physical block: the emulation answers
libiscsi's WriteSame*.InvalidDataOutSize, ReadOnly.ReadOnlySBC and GetLBAStatus.UnmapSingle
exercise, driven with bytes only."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_core.cdb import BlockCdb, encode_block_cdb
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.command_builders import assert_check, ready, scratch_target
from scsi_emulation.target import EmulatedTarget
from scsi_emulation.testing import run_command

BLOCK = 512
WRITE_SAME_10 = 0x41
WRITE_SAME_16 = 0x93
WRITE_16 = 0x8A
READ_16 = 0x88


def cdb(op: int, lba: int = 0, n: int = 1, **flags: bool) -> bytes:
    return encode_block_cdb(BlockCdb(op, lba, n, **flags))


def read(target: EmulatedTarget, lba: int, n: int) -> bytes:
    r = run_command(target, cdb(READ_16, lba, n), data_in=n * BLOCK)
    assert r.status == Status.GOOD
    return r.data


def write(target: EmulatedTarget, lba: int, data: bytes) -> None:
    r = run_command(target, cdb(WRITE_16, lba, len(data) // BLOCK), data_out=data)
    assert r.status == Status.GOOD


def unmap(lba: int, n: int) -> tuple[bytes, bytes]:
    """UNMAP CDB and its one-descriptor parameter list."""
    params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", lba, n)
    return bytes((0x42, 0, 0, 0, 0, 0, 0)) + len(params).to_bytes(2, "big") + b"\0", params


def get_lba_status(lba: int, allocation: int = 24) -> bytes:
    return bytes((0x9E, 0x12)) + lba.to_bytes(8, "big") + allocation.to_bytes(4, "big") + b"\0\0"


# -- WRITE SAME: the Data-Out Buffer is exactly one logical block --------------------------


@pytest.mark.parametrize("op", [WRITE_SAME_10, WRITE_SAME_16])
@pytest.mark.parametrize("size", [BLOCK // 2, BLOCK * 2, BLOCK + 1, BLOCK - 1])
@pytest.mark.parametrize("unmap_bit", [False, True])
def test_write_same_data_out_other_than_one_block(op: int, size: int, unmap_bit: bool) -> None:
    with scratch_target() as target:
        ready(target, 0)
        write(target, 0, b"k" * BLOCK * 4)
        r = run_command(target, cdb(op, 0, 4, unmap=unmap_bit), data_out=b"\xa6" * size)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        assert read(target, 0, 4) == b"k" * BLOCK * 4  # nothing written


@pytest.mark.parametrize("op", [WRITE_SAME_10, WRITE_SAME_16])
def test_write_same_without_data_out(op: int) -> None:
    with scratch_target() as target:
        ready(target, 0)
        r = run_command(target, cdb(op, 0, 1))
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)


@pytest.mark.parametrize("op", [WRITE_SAME_10, WRITE_SAME_16])
def test_write_same_one_block_data_out(op: int) -> None:
    with scratch_target() as target:
        ready(target, 0)
        r = run_command(target, cdb(op, 8, 3), data_out=b"\xa6" * BLOCK)
        assert (r.status, r.residual) == (Status.GOOD, 0)
        assert read(target, 8, 3) == b"\xa6" * BLOCK * 3


def test_write_same_16_ndob_needs_no_data_out() -> None:
    with scratch_target() as target:
        ready(target, 0)
        write(target, 0, b"n" * BLOCK * 2)
        assert run_command(target, cdb(WRITE_SAME_16, 0, 2, ndob=True)).status == Status.GOOD
        assert read(target, 0, 2) == bytes(BLOCK * 2)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=1, max_value=4 * BLOCK).filter(lambda s: s != BLOCK))
def test_write_same_any_wrong_size_writes_nothing(size: int) -> None:
    with scratch_target(blocks=64) as target:
        ready(target, 0)
        r = run_command(target, cdb(WRITE_SAME_16, 0, 2), data_out=b"\x5a" * size)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
        assert read(target, 0, 2) == bytes(2 * BLOCK)


# -- write protection comes before the UNMAP / ANCHOR checks -------------------------------


@pytest.mark.parametrize("thin", [False, True])
@pytest.mark.parametrize("op", [WRITE_SAME_10, WRITE_SAME_16])
@pytest.mark.parametrize("unmap_bit", [False, True])
def test_write_same_on_read_only_lu_is_write_protected(
    op: int, thin: bool, unmap_bit: bool
) -> None:
    # With UNMAP on a fully provisioned LU this used to be INVALID FIELD IN CDB: a read-only
    # LU must say DATA PROTECT for any medium write, however it was asked for.
    with scratch_target(read_only=True, thin_provisioning=thin) as target:
        ready(target, 0)
        r = run_command(target, cdb(op, 0, 1, unmap=unmap_bit), data_out=bytes(BLOCK))
        assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def test_write_same_16_ndob_unmap_on_read_only_lu() -> None:
    with scratch_target(read_only=True) as target:
        ready(target, 0)
        r = run_command(target, cdb(WRITE_SAME_16, 0, 1, unmap=True, ndob=True))
        assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


@pytest.mark.parametrize("blocks", [1, 8])
def test_unmap_on_read_only_thin_lu_is_write_protected(blocks: int) -> None:
    with scratch_target(read_only=True, thin_provisioning=True) as target:
        ready(target, 0)
        command, params = unmap(0, blocks)
        r = run_command(target, command, data_out=params)
        assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def test_write_same_unmap_on_writable_fully_provisioned_lu_still_invalid() -> None:
    with scratch_target(thin_provisioning=False) as target:
        ready(target, 0)
        r = run_command(target, cdb(WRITE_SAME_16, 0, 1, unmap=True), data_out=bytes(BLOCK))
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, byte=1)


# -- GET LBA STATUS after UNMAP of one physical block ----------------------------------------


def _descriptors(data: bytes) -> list[tuple[int, int, int]]:
    count = (int.from_bytes(data[:4], "big") - 4) // 16
    count = min(count, (len(data) - 8) // 16)
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(count)]


def test_get_lba_status_after_unmap_of_one_physical_block() -> None:
    """The first descriptor starts at the requested LBA (SBC-4 GET LBA STATUS)."""
    with scratch_target(thin_provisioning=True, physical_block_size=4096) as target:
        device = target.logical_unit(0)
        assert isinstance(device, BlockDevice)
        if not device.backend.supports_discard:
            pytest.skip("file system without hole punching")
        ready(target, 0)
        per_physical = 8
        write(target, 0, b"A" * BLOCK * (256 + per_physical))
        for lba in (0, 8, 128, 248):
            command, params = unmap(lba, per_physical)
            assert run_command(target, command, data_out=params).status == Status.GOOD
            first = _descriptors(run_command(target, get_lba_status(lba), data_in=24).data)[0]
            assert first[0] == lba and first[2] == 1  # deallocated
            assert first[1] >= per_physical
            after = lba + per_physical
            first = _descriptors(run_command(target, get_lba_status(after), data_in=24).data)[0]
            assert first[0] == after and first[2] == 0  # mapped
        # Unmap blocks 0..7 again after re-mapping; asking at LBA 9 describes LBA 9 (mapped).
        write(target, 0, b"A" * BLOCK * (256 + per_physical))
        command, params = unmap(0, per_physical)
        assert run_command(target, command, data_out=params).status == Status.GOOD
        first = _descriptors(run_command(target, get_lba_status(9), data_in=24).data)[0]
        assert first[0] == 9 and first[2] == 0
