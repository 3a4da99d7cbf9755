"""PDU framing on a byte stream: splitting received bytes into PDUs and laying PDUs out to send.

Handles the 48-byte BHS, the AHS, the header and data digests (CRC32C, only once negotiated)
and the padding of the data segment to a 4-byte boundary (RFC 7143 sections 11.2 and 11.2.4).
It does not decode header fields beyond the lengths; that is `pdu`'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from iscsi_target.constants import BHS_LENGTH
from iscsi_target.crc32c import crc32c, digest_bytes
from iscsi_target.pdu import Data

__all__ = ["FramingError", "PduReader", "RawPdu", "frame_pdu"]

logger = logging.getLogger(__name__)

_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
_COMPACT_AT = 1 << 20


class FramingError(Exception):
    """The byte stream cannot be split into PDUs any more (the connection must be dropped)."""


@dataclass(slots=True)
class RawPdu:
    """One PDU as received: its BHS, AHS and data segment without padding or digests."""

    bhs: bytes
    ahs: bytes
    data: bytes
    data_digest_ok: bool = True


class PduReader:
    """Incremental splitter of a received byte stream into `RawPdu`s.

    `header_digest` / `data_digest` are switched on by the owner once the login has negotiated
    them. `max_data_segment_length` is the largest data segment accepted; a larger one means
    the peer ignores our MaxRecvDataSegmentLength, and the stream is abandoned.
    """

    def __init__(self, max_data_segment_length: int) -> None:
        self.max_data_segment_length = max_data_segment_length
        self.header_digest = False
        self.data_digest = False
        self._buffer = bytearray()
        self._offset = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a PDU."""
        return len(self._buffer) - self._offset

    def feed(self, data: Data) -> None:
        """Append received bytes."""
        if self._offset >= _COMPACT_AT or (self._offset and self._offset == len(self._buffer)):
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_pdu(self) -> RawPdu | None:
        """Return the next complete PDU, or None until more bytes arrive.

        Raises `FramingError` for a header digest mismatch or an oversized data segment.
        """
        buffer = self._buffer
        start = self._offset
        available = len(buffer) - start
        if available < BHS_LENGTH:
            return None
        ahs_length = buffer[start + 4] * 4
        data_length = int.from_bytes(buffer[start + 5 : start + 8], "big")
        if data_length > self.max_data_segment_length:
            raise FramingError(
                f"data segment of {data_length} bytes exceeds the limit of "
                f"{self.max_data_segment_length}"
            )
        header_end = start + BHS_LENGTH + ahs_length
        data_start = header_end + (4 if self.header_digest else 0)
        padded = data_length + (-data_length % 4)
        end = data_start + padded
        if data_length and self.data_digest:
            end += 4
        if len(buffer) < end:
            return None
        view = memoryview(buffer)
        try:
            if self.header_digest:
                expected = crc32c(view[start:header_end]).to_bytes(4, "little")
                if view[header_end:data_start] != expected:
                    raise FramingError("header digest mismatch")
            bhs = bytes(view[start : start + BHS_LENGTH])
            ahs = bytes(view[start + BHS_LENGTH : header_end])
            data = bytes(view[data_start : data_start + data_length])
            digest_ok = True
            if data_length and self.data_digest:
                digest_ok = digest_bytes(view[data_start : data_start + padded]) == bytes(
                    view[end - 4 : end]
                )
                if not digest_ok:
                    logger.warning("data digest mismatch on a PDU with opcode %#04x", bhs[0] & 0x3F)
        finally:
            view.release()
        self._offset = end
        return RawPdu(bhs, ahs, data, digest_ok)


def frame_pdu(
    header: bytes, data: Data, *, header_digest: bool = False, data_digest: bool = False
) -> list[Data]:
    """Lay out one PDU for sending: header (BHS + AHS), digests, data segment and padding.

    Returns the pieces in wire order; the data segment is passed through without a copy.
    """
    parts: list[Data] = [header]
    if header_digest:
        parts.append(digest_bytes(header))
    length = len(data)
    if length:
        parts.append(data)
        padding = _PADDING[-length % 4]
        if padding:
            parts.append(padding)
        if data_digest:
            parts.append(digest_bytes(data, padding))
    return parts
