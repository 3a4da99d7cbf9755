"""FileBackend: preadv/pwritev into buffers, zero fill, discard, write zeroes, allocation."""

from __future__ import annotations

import os
import pathlib

from scsi_emulation.backend import FileBackend


def test_read_write_through_buffers(image: pathlib.Path) -> None:
    b = FileBackend(image)
    src = bytearray(b"A" * 1000 + b"B" * 24)
    b.write(512, [memoryview(src)[:1000], memoryview(src)[1000:]], 1024)
    out = bytearray(1024)
    view = memoryview(out)
    b.read(512, [view[:100], view[100:]], 1024)
    assert out == src
    assert b.read_nowait(512, [view], 1024) in (0, 1024)  # page cache: usually everything
    b.close()


def test_read_past_end_is_zero_filled(image: pathlib.Path) -> None:
    b = FileBackend(image)
    os.truncate(image, 4096)  # shrink behind its back: the tail reads as zeros
    os.pwrite(b.fd, b"x" * 4096, 0)
    out = bytearray(b"\xff" * 8192)
    b.read(0, [memoryview(out)], 8192)
    assert out == b"x" * 4096 + bytes(4096)
    b.close()


def test_discard_and_allocation(image: pathlib.Path) -> None:
    b = FileBackend(image)
    size = b.size
    assert b.allocation(0) == (False, size)
    data = b"\x11" * 65536
    b.write(65536, [memoryview(data)], len(data))
    mapped, length = b.allocation(65536)
    assert mapped and length >= 65536
    assert b.allocation(0) == (False, 65536)
    b.discard(65536, 65536)
    out = bytearray(65536)
    b.read(65536, [memoryview(out)], 65536)
    assert out == bytes(65536)
    if b.supports_discard:
        assert b.allocation(0) == (False, size)
    assert b.allocation(size) == (False, 0)
    b.close()


def test_write_zeroes(image: pathlib.Path) -> None:
    b = FileBackend(image)
    b.write(0, [memoryview(b"\x22" * 8192)], 8192)
    b.write_zeroes(1024, 2048)
    out = bytearray(8192)
    b.read(0, [memoryview(out)], 8192)
    assert out == b"\x22" * 1024 + bytes(2048) + b"\x22" * 5120
    b.write_zeroes(0, 8192, may_discard=True)
    b.read(0, [memoryview(out)], 8192)
    assert out == bytes(8192)
    b.flush()
    b.close()


def test_read_only_and_refresh_size(image: pathlib.Path) -> None:
    b = FileBackend(image, read_only=True)
    assert b.read_only
    os.truncate(image, 2 << 20)
    assert b.refresh_size() == 2 << 20 == b.size
    b.close()
