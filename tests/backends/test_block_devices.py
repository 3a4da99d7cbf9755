"""Block devices (loop devices made by losetup) as back-ends, and SCSI logical units over
every kind of back-end: READ CAPACITY from the back-end's size, data, UNMAP and GET LBA
STATUS, back-end errors as CHECK CONDITION, reads through the worker pool."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from scsi_core.sense import Asc, SenseKey
from scsi_emulation.backend import BackendError
from scsi_emulation.backends.blockdev import BlockDeviceBackend
from scsi_emulation.backends.nbd import NbdBackend
from scsi_emulation.backends.uri import open_backend
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.testing import run_command
from vhost_device_scsi.luns import LunError, LunSpec, LunTable

from tests.backends.scsi_checks import (
    exercise,
    lba_status,
    read16,
    read_capacity16,
    scsi_disk,
    write16,
)
from tests.backends.servers import LoopDevice, NbdServer

pytestmark = pytest.mark.backends

MakeLoop = Callable[..., LoopDevice]
Start = Callable[..., NbdServer]
MiB = 1 << 20


def test_loop_device_geometry_and_data(make_loop: MakeLoop) -> None:
    loop = make_loop(16 * MiB)
    backend = open_backend(loop.path)
    assert isinstance(backend, BlockDeviceBackend)
    try:
        assert backend.size == 16 * MiB
        assert (backend.logical_block_size, backend.physical_block_size) == (512, 512)
        assert not backend.read_only and backend.supports_discard
        data = os.urandom(65536)
        backend.write(MiB, [memoryview(data)], len(data), durable=True)
        out = bytearray(len(data))
        backend.read(MiB, [memoryview(out)], len(out))
        assert out == data
        backend.flush()
        with loop.backing.open("rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
        blocks_before = os.stat(loop.backing).st_blocks
        backend.discard(MiB, 65536)  # deallocates in the backing file, reads as zeros
        backend.read(MiB, [memoryview(out)], len(out))
        assert out == bytes(len(out))
        assert os.stat(loop.backing).st_blocks < blocks_before
        backend.write(0, [memoryview(b"\x01" * 8192)], 8192)
        backend.write_zeroes(0, 4096)
        backend.read(0, [memoryview(out)[:8192]], 8192)
        assert out[:8192] == bytes(4096) + b"\x01" * 4096
    finally:
        backend.close()


def test_loop_device_4k_sectors_and_direct(make_loop: MakeLoop) -> None:
    loop = make_loop(8 * MiB, sector=4096)
    backend = open_backend(f"file:{loop.path}?direct=on")
    assert isinstance(backend, BlockDeviceBackend) and backend.direct
    try:
        assert (backend.logical_block_size, backend.physical_block_size) == (4096, 4096)
        raw = bytearray(8192 + 3)
        unaligned = memoryview(raw)[3:]  # not aligned in memory: bounced
        unaligned[:] = os.urandom(8192)
        backend.write(4096, [unaligned], 8192)
        out = bytearray(8192)
        backend.read(4096, [memoryview(out)], 8192)
        assert out == unaligned
    finally:
        backend.close()


def test_read_only_loop_device(make_loop: MakeLoop) -> None:
    loop = make_loop(4 * MiB, read_only=True)
    backend = open_backend(loop.path)
    try:
        assert backend.read_only
    finally:
        backend.close()


def test_not_a_block_device(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(BackendError) as info:
        BlockDeviceBackend(os.fspath(tmp_path))
    assert info.value.errno == errno.ENOTBLK


# -- SCSI over the back-ends --------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[IoWorkerPool]:
    p = IoWorkerPool(4, name="test-io")
    yield p
    p.close()


def test_scsi_over_loop_device(make_loop: MakeLoop, pool: IoWorkerPool) -> None:
    loop = make_loop(16 * MiB)
    target = scsi_disk(open_backend(loop.path), pool)
    try:
        exercise(target, 16 * MiB // 512)
    finally:
        target.close()


def test_scsi_over_nbd(nbd_server: NbdServer, pool: IoWorkerPool) -> None:
    target = scsi_disk(NbdBackend.connect(nbd_server.uri), pool)
    try:
        exercise(target, 64 * MiB // 512)
        assert write16(target, 0, b"\x05" * 4096).status == 0
        start, count, status = lba_status(target, 0)
        assert (start, status) == (0, 0) and count >= 8  # mapped
        start, count, status = lba_status(target, 100_000)
        assert (start, status) == (100_000, 1) and count > 0  # deallocated
    finally:
        target.close()


def test_backend_errors_are_check_conditions(nbdkit_custom: Start, pool: IoWorkerPool) -> None:
    server = nbdkit_custom(
        "memory", "1M", "error-pread=EIO", "error-pread-rate=1", filters=("error",)
    )
    target = scsi_disk(NbdBackend.connect(server.uri), pool)
    try:
        r = read16(target, 0, 8)
        assert r.status == 2 and r.sense is not None
        assert (r.sense.key, r.sense.code) == (SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
    finally:
        target.close()
    full = nbdkit_custom("full", "1M")
    target = scsi_disk(NbdBackend.connect(full.uri), pool)
    try:
        r = write16(target, 0, bytes(4096))
        assert r.status == 2 and r.sense is not None
        assert r.sense.key == SenseKey.DATA_PROTECT  # ENOSPC: space allocation failed
    finally:
        target.close()


def test_lun_table_opens_uris(make_loop: MakeLoop, nbdkit_memory: NbdServer) -> None:
    loop = make_loop(8 * MiB, sector=4096)
    table = LunTable(io_threads=1)
    try:
        table.add(LunSpec(0, nbdkit_memory.uri))
        table.add(LunSpec(1, loop.path, block_size=4096))
        with pytest.raises(LunError, match="4096-byte logical blocks"):
            table.add(LunSpec(2, f"file:{loop.path}?direct=on", block_size=512))
        with pytest.raises(LunError, match="cannot reach NBD server"):
            table.add(LunSpec(3, "nbd://127.0.0.1:1/x"))
        assert table.describe().startswith(f"0:{nbdkit_memory.uri} 1:{loop.path}")
        for _ in range(3):  # unit attentions: power on, LUN inventory changed
            if run_command(table.target, bytes(6)).status == 0:
                break
        assert read_capacity16(table.target)[0] == 64 * MiB // 512
    finally:
        table.close()


def test_no_unmap_where_the_backend_cannot_discard(nbdkit_custom: Start) -> None:
    """nbdkit's nozero filter takes WRITE_ZEROES away: no LBPME, UNMAP is not a command."""
    plain = nbdkit_custom("memory", "1M")
    crippled = nbdkit_custom("memory", "1M", filters=("nozero",))
    table = LunTable(io_threads=1)
    try:
        table.add(LunSpec(0, plain.uri))
        table.add(LunSpec(1, crippled.uri))
        for lun, thin in ((0, True), (1, False)):
            for _ in range(3):
                if run_command(table.target, bytes(6), lun=lun).status == 0:
                    break
            cdb = bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2)
            data = run_command(table.target, cdb, data_in=32, lun=lun).data
            assert bool(data[14] & 0x80) == thin  # LBPME
            param = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 0, 1)
            unmap_cdb = bytes((0x42, 0)) + bytes(5) + struct.pack(">HB", 24, 0)
            r = run_command(table.target, unmap_cdb, data_out=param, lun=lun)
            if thin:
                assert r.status == 0
            else:
                assert r.status == 2 and r.sense is not None
                assert r.sense.code == Asc.INVALID_COMMAND_OPERATION_CODE
    finally:
        table.close()
