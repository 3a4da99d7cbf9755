"""CRC32C (Castagnoli), the iSCSI header and data digest (RFC 7143 section 13.1, appendix B).

Holds only the checksum arithmetic; it knows nothing of PDUs. The table is computed here at
import time from the reflected polynomial, so no third-party package is needed.
"""

from __future__ import annotations

__all__ = ["crc32c", "digest_bytes"]

_POLYNOMIAL_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLYNOMIAL_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC32C of `data`, continuing from a previous result `crc` (0 to start)."""
    table = _TABLE
    value = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The 4-byte wire form of the digest over the concatenation of `parts`.

    iSCSI sends the CRC least significant byte first (RFC 7143 appendix B: 32 zero bytes give
    the wire bytes aa 36 91 8a).
    """
    crc = 0
    for part in parts:
        crc = crc32c(part, crc)
    return crc.to_bytes(4, "little")
