"""A block device uses its worker pool (non-blocking read first) only where that can work."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from scsi_core.status import Status
from scsi_core.target import BytesWriter, Request, Response
from scsi_emulation import BlockDevice, FileBackend, IoWorkerPool
from scsi_emulation.backend import StorageBackend
from scsi_emulation.block_device import nowait_reads_work

READ_10 = bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0))


class CountingBackend(StorageBackend):
    """512 KiB of a byte pattern; counts blocking and non-blocking reads."""

    def __init__(self, nowait_supported: bool) -> None:
        self.nowait_supported = nowait_supported
        self.data = bytes(i & 0xFF for i in range(512 * 1024))
        self.reads = 0
        self.nowait_reads = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, buffers: Sequence[memoryview], length: int) -> None:
        self.reads += 1
        pos = offset
        for buf in buffers:
            buf[:] = self.data[pos : pos + len(buf)]
            pos += len(buf)

    def read_nowait(self, offset: int, buffers: Sequence[memoryview], length: int) -> int:
        self.nowait_reads += 1
        self.read(offset, buffers, length)
        return length

    def write(
        self, offset: int, buffers: Sequence[memoryview], length: int, durable: bool = False
    ) -> None:
        raise AssertionError("not written here")

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        raise AssertionError("not written here")


@pytest.fixture
def pool() -> Iterator[IoWorkerPool]:
    p = IoWorkerPool(1)
    yield p
    p.close()


def _never(response: Response) -> None:
    raise AssertionError("an inline read never completes later")


@pytest.mark.parametrize("supported", [True, False])
def test_declared_support_decides_which_read_is_used(pool: IoWorkerPool, supported: bool) -> None:
    backend = CountingBackend(supported)
    assert nowait_reads_work(backend) is supported
    device = BlockDevice(backend, io_pool=pool)
    device.execute(Request(0, READ_10, data_in=BytesWriter(512)), _never)  # power-on UA
    writer = BytesWriter(512)
    response = device.execute(Request(0, READ_10, data_in=writer), _never)
    assert response is not None and response.status == Status.GOOD
    assert writer.getvalue() == backend.data[512:1024]
    assert backend.nowait_reads == (1 if supported else 0)


def test_a_file_backend_is_probed(tmp_path: Path) -> None:
    """Whatever the file system answers, the probe agrees with RWF_NOWAIT itself."""
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    backend = FileBackend(image)
    try:
        try:
            os.preadv(backend.fd, [bytearray(1)], 0, os.RWF_NOWAIT)
            expected = True
        except BlockingIOError:
            expected = True
        except OSError:
            expected = False
        assert nowait_reads_work(backend) is expected
    finally:
        backend.close()
