"""Per-command cost of READ(10)/WRITE(10) of 4 KiB through EmulatedTarget on a FileBackend.

Not a test (pytest does not collect it): run ``python3 packages/scsi-emulation/tests/
bench_hot_path.py``. It prints the cost of the bare ``preadv``/``pwritev`` and of the same
I/O through ``EmulatedTarget.execute`` (including building the `Request`), so the difference
is what the SCSI layers add per command.
"""

from __future__ import annotations

import os
import tempfile
import timeit

from scsi_core.target import Request, Response
from scsi_emulation import BlockDevice, EmulatedTarget, FileBackend

BLOCK = 4096
_buffer = bytearray(BLOCK)
_view = memoryview(_buffer)


class OneBuffer:
    """A minimal reader/writer over one 4 KiB buffer, like a one-descriptor virtio chain."""

    __slots__ = ("pos",)

    def __init__(self) -> None:
        self.pos = 0

    def remaining(self) -> int:
        return BLOCK - self.pos

    def buffers(self, length: int) -> list[memoryview]:
        return [_view[self.pos : self.pos + length]]

    def advance(self, n: int) -> None:
        self.pos += n

    def read(self, n: int) -> bytes:
        data = bytes(_view[self.pos : self.pos + n])
        self.pos += n
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), self.remaining())
        _view[self.pos : self.pos + n] = data[:n]
        self.pos += n
        return n

    @property
    def written(self) -> int:
        return self.pos


def _never(response: Response) -> None:
    raise AssertionError("inline commands do not call complete()")


def main(number: int = 200_000) -> None:
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.pwrite(fd, b"a" * (4 << 20), 0)
        os.close(fd)
        backend = FileBackend(path)
        target = EmulatedTarget({0: BlockDevice(backend)})
        read_cdb = bytes((0x28, 0, 0, 0, 0x10, 0, 0, 0, 8, 0)).ljust(32, b"\0")
        write_cdb = bytes((0x2A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0)).ljust(32, b"\0")
        target.execute(Request(0, read_cdb, data_in=OneBuffer()), _never)  # power-on UA

        def bare_read() -> None:
            os.preadv(backend.fd, [_view[0:BLOCK]], 0x10 * 512)

        def bare_write() -> None:
            os.pwritev(backend.fd, [_view[0:BLOCK]], 0x10 * 512)

        def scsi_read() -> None:
            target.execute(Request(0, read_cdb, data_in=OneBuffer()), _never)

        def scsi_write() -> None:
            target.execute(Request(0, write_cdb, data_out=OneBuffer()), _never)

        results = {}
        for name, fn in (
            ("preadv 4 KiB", bare_read),
            ("READ(10) 4 KiB via target", scsi_read),
            ("pwritev 4 KiB", bare_write),
            ("WRITE(10) 4 KiB via target", scsi_write),
        ):
            results[name] = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
            print(f"{name:28s} {results[name]:6.3f} us")
        read_extra = results["READ(10) 4 KiB via target"] - results["preadv 4 KiB"]
        write_extra = results["WRITE(10) 4 KiB via target"] - results["pwritev 4 KiB"]
        print(f"SCSI layers add {read_extra:.3f} us per read, {write_extra:.3f} us per write")
        target.close()
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
