"""A data-in buffer for one SCSI command: the `scsi_core.target.DataWriter` protocol over a
bytearray whose filled part can be sliced into Data-In PDUs without copying.

Knows nothing of PDUs; the full-feature phase slices `view()`.
"""

from __future__ import annotations

__all__ = ["DataInBuffer"]


class DataInBuffer:
    """A `DataWriter` over a fresh zero-filled buffer of `capacity` bytes."""

    __slots__ = ("_buffer", "_position", "_view")

    def __init__(self, capacity: int) -> None:
        self._buffer = bytearray(capacity)
        self._view = memoryview(self._buffer)
        self._position = 0

    def remaining(self) -> int:
        return len(self._buffer) - self._position

    def buffers(self, length: int) -> list[memoryview]:
        end = min(len(self._buffer), self._position + max(length, 0))
        return [self._view[self._position : end]] if end > self._position else []

    def advance(self, n: int) -> None:
        if n < 0 or n > self.remaining():
            raise ValueError(f"advance({n}) with {self.remaining()} bytes remaining")
        self._position += n

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), self.remaining())
        self._view[self._position : self._position + n] = memoryview(data).cast("B")[:n]
        self._position += n
        return n

    @property
    def written(self) -> int:
        return self._position

    def view(self, start: int, end: int) -> memoryview:
        """The filled bytes start..end (no copy)."""
        return self._view[start : min(end, self._position)]
