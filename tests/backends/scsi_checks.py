"""SCSI commands the back-end tests send to a logical unit over a back-end, and one common
check sequence (capacity, data with FUA, UNMAP, out-of-range)."""

from __future__ import annotations

import os
import struct

from scsi_core.sense import Asc
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget
from scsi_emulation.backend import StorageBackend
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.testing import CommandResult, run_command


def read_capacity16(target: EmulatedTarget) -> tuple[int, int, int]:
    cdb = bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    data = run_command(target, cdb, data_in=32).data
    last, size, exponent = struct.unpack_from(">QIB", data)
    return last + 1, size, exponent & 0x0F


def write16(target: EmulatedTarget, lba: int, data: bytes, fua: bool = False) -> CommandResult:
    cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, len(data) // 512, 0, 0)
    return run_command(target, cdb, data_out=data)


def read16(target: EmulatedTarget, lba: int, n: int) -> CommandResult:
    return run_command(target, struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0), data_in=n * 512)


def unmap(target: EmulatedTarget, lba: int, n: int) -> CommandResult:
    param = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", lba, n)
    return run_command(
        target, bytes((0x42, 0)) + bytes(5) + struct.pack(">HB", 24, 0), data_out=param
    )


def lba_status(target: EmulatedTarget, lba: int) -> tuple[int, int, int]:
    cdb = bytes((0x9E, 0x12)) + struct.pack(">QI", lba, 64) + bytes(2)
    data = run_command(target, cdb, data_in=64).data
    start, count, status = struct.unpack_from(">QIB", data, 8)
    return start, count, status & 0x0F


def scsi_disk(backend: StorageBackend, pool: IoWorkerPool) -> EmulatedTarget:
    target = EmulatedTarget({0: BlockDevice(backend, BlockDeviceOptions(), io_pool=pool)})
    run_command(target, bytes(6))  # the power-on unit attention
    return target


def exercise(target: EmulatedTarget, blocks: int) -> None:
    assert read_capacity16(target)[:2] == (blocks, 512)
    data = os.urandom(64 * 1024)
    assert write16(target, 2048, data, fua=True).status == 0
    r = read16(target, 2048, len(data) // 512)
    assert r.status == 0 and r.data == data
    assert unmap(target, 2048, 128).status == 0
    assert read16(target, 2048, 128).data == bytes(65536)
    r = read16(target, blocks - 1, 2)
    assert r.status == 2 and r.sense is not None
    assert r.sense.code == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
