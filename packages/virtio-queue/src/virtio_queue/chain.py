"""A popped descriptor chain and the reader/writer that move data through its buffers.

A DescriptorChain is the device's view of one request: its head index and its device-readable
and device-writable buffers as memoryviews into guest memory (scatter-gather lists). ChainReader
and ChainWriter implement the data-movement protocol of docs/interfaces.md over those lists:
small headers are copied with read()/write(), bulk data moves with buffers()/advance() and
os.preadv/os.pwritev straight into guest memory. Nothing here parses rings or knows devices.
"""

from __future__ import annotations

__all__ = ["ChainReader", "ChainWriter", "DescriptorChain"]


class DescriptorChain:
    """One descriptor chain popped from a split queue (virtio 1.2 section 2.7.4)."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def reader(self, skip: int = 0) -> ChainReader:
        """A reader over the device-readable buffers (driver -> device data).

        ``skip`` bytes are consumed at once (a header the caller already parsed); at most
        ``readable_len``.
        """
        reader = _new_reader(ChainReader)
        bufs = self.readable
        if skip and bufs and len(bufs[0]) == skip:
            # The hot case, inlined: a request header that fills the first descriptor.
            reader._bufs = bufs
            reader._total = total = self.readable_len
            reader._index = 1
            reader._offset = 0
            reader._remaining = total - skip
        else:
            _start(reader, bufs, self.readable_len, skip)
        return reader

    def writer(self, skip: int = 0) -> ChainWriter:
        """A writer over the device-writable buffers (device -> driver data).

        ``skip`` bytes are consumed at once (room a device fills itself, e.g. a response
        header): ``written`` counts them. At most ``writable_len``.
        """
        writer = _new_writer(ChainWriter)
        bufs = self.writable
        if skip and bufs and len(bufs[0]) == skip:
            # The hot case, inlined: a response header that fills the first descriptor.
            writer._bufs = bufs
            writer._total = total = self.writable_len
            writer._index = 1
            writer._offset = 0
            writer._remaining = total - skip
        else:
            _start(writer, bufs, self.writable_len, skip)
        return writer

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B/"
            f"{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )


class _Cursor:
    """A position (buffer index, offset in it) in a list of buffers, and the bytes left.

    The position may rest at the end of a buffer or on an empty one: the one-buffer fast paths
    then fall through to the general ones, which skip such buffers.
    """

    __slots__ = ("_bufs", "_index", "_offset", "_remaining", "_total")

    def __init__(self, bufs: list[memoryview], total: int) -> None:
        """``total`` must be the sum of the buffers' lengths (DescriptorChain knows it)."""
        self._bufs = bufs
        self._index = 0
        self._offset = 0
        self._total = total
        self._remaining = total

    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return self._remaining

    def buffers(self, length: int) -> list[memoryview]:
        """The next up-to-``length`` unconsumed bytes as memoryview slices; consumes nothing."""
        bufs = self._bufs
        i = self._index
        off = self._offset
        count = len(bufs)
        if not off and i < count and length > 0:
            # The common request: the data is one whole descriptor; hand it out unsliced.
            buf = bufs[i]
            if len(buf) == length:
                return [buf]
        out: list[memoryview] = []
        while length > 0 and i < count:
            buf = bufs[i]
            avail = len(buf) - off
            if avail >= length:
                out.append(buf[off : off + length])
                break
            if avail:
                out.append(buf[off:] if off else buf)
                length -= avail
            i += 1
            off = 0
        return out

    def advance(self, n: int) -> None:
        """Mark ``n`` bytes consumed (after a preadv/pwritev into/from ``buffers()``)."""
        remaining = self._remaining
        if n == remaining:  # everything (a whole data transfer): the end, without a walk
            self._remaining = 0
            self._index = len(self._bufs)
            self._offset = 0
            return
        if n < 0 or n > remaining:
            raise ValueError(f"cannot advance by {n}: {remaining} bytes remain")
        self._remaining = remaining - n
        bufs = self._bufs
        i = self._index
        off = self._offset + n
        count = len(bufs)
        while i < count and off >= len(bufs[i]):
            off -= len(bufs[i])
            i += 1
        self._index = i
        self._offset = off


class ChainReader(_Cursor):
    """Reads the device-readable part of a chain (the data-movement protocol's reader)."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        """Copy out up to ``n`` bytes (fewer only at the end of the chain) and consume them."""
        if n > self._remaining:
            n = self._remaining
        if n <= 0:
            return b""
        buf = self._bufs[self._index]
        off = self._offset
        end = off + n
        if end <= len(buf):
            # Common case (a header inside one descriptor): no list, one copy.
            self._remaining -= n
            if end == len(buf):
                self._index += 1
                self._offset = 0
            else:
                self._offset = end
            return bytes(buf[off:end])
        data = b"".join(self.buffers(n))
        self.advance(n)
        return data


class ChainWriter(_Cursor):
    """Writes the device-writable part of a chain (the data-movement protocol's writer)."""

    __slots__ = ()

    @property
    def written(self) -> int:
        """Total bytes consumed so far (what add_used should report)."""
        return self._total - self._remaining

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy in ``min(len(data), remaining())`` bytes, consume them and return the count."""
        n = len(data)
        if n > self._remaining:
            n = self._remaining
            data = memoryview(data)[:n]
        if n <= 0:
            return 0
        buf = self._bufs[self._index]
        off = self._offset
        end = off + n
        if end <= len(buf):
            buf[off:end] = data
            self._remaining -= n
            if end == len(buf):
                self._index += 1
                self._offset = 0
            else:
                self._offset = end
            return n
        src = memoryview(data)
        pos = 0
        for dst in self.buffers(n):
            step = len(dst)
            dst[:] = src[pos : pos + step]
            pos += step
        self.advance(n)
        return n


_new_reader = ChainReader.__new__
_new_writer = ChainWriter.__new__


def _start(cursor: _Cursor, bufs: list[memoryview], total: int, skip: int) -> None:
    """Set a fresh cursor over ``bufs`` (``total`` bytes) with ``skip`` bytes consumed.

    The reader/writer factories of every request call this instead of ``__init__``: a
    Python-level ``__init__`` plus a separate ``advance`` costs a call and a loop more.
    """
    cursor._bufs = bufs
    cursor._total = total
    if not skip:
        cursor._index = 0
        cursor._offset = 0
        cursor._remaining = total
    elif bufs and len(bufs[0]) == skip:
        # The header fills the first descriptor exactly (the Linux virtio-scsi layout).
        cursor._index = 1
        cursor._offset = 0
        cursor._remaining = total - skip
    else:
        cursor._index = 0
        cursor._offset = 0
        cursor._remaining = total
        cursor.advance(skip)
