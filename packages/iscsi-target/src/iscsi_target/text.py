"""The key=value text format of Login and Text PDUs (RFC 7143 sections 6.1 and 6.2).

Decoding and encoding of the null-separated pairs and of the value types (numbers, booleans,
binary strings). It knows the syntax only; which keys exist and how they are negotiated is
`negotiation`'s job.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_VALUE_LENGTH",
    "TextError",
    "decode_text",
    "encode_binary",
    "encode_text",
    "parse_binary",
    "parse_boolean",
    "parse_number",
]

MAX_KEY_LENGTH = 63  # section 6.1
# Section 6.1 limits most values to 255 bytes, but CHAP challenges and responses may be long
# binary values (section 12.1.3 allows up to 1024 bytes of binary in hex: 2048 + "0x").
MAX_VALUE_LENGTH = 8192
_KEY_SYNTAX = re.compile(r"[A-Za-z0-9.\-+@_]+\Z")


class TextError(ValueError):
    """Malformed key=value text or an unparsable value."""


def decode_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Split a text data segment into (key, value) pairs, in order.

    Empty strings between nulls (padding some initiators add) are skipped. Raises `TextError`
    for a pair without "=", a bad key, an over-long value or bytes that are not UTF-8.
    """
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError("text is not UTF-8") from exc
    pairs = []
    for item in text.split("\0"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise TextError(f"no '=' in {item[:40]!r}")
        if len(key) > MAX_KEY_LENGTH or not _KEY_SYNTAX.match(key):
            raise TextError(f"invalid key {key[:70]!r}")
        if len(value) > MAX_VALUE_LENGTH:
            raise TextError(f"value of {key} is {len(value)} bytes long")
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode (key, value) pairs as null-terminated key=value strings."""
    return b"".join(f"{key}={value}\0".encode() for key, value in pairs)


def parse_number(value: str) -> int:
    """Parse a numerical value: decimal, 0x hexadecimal or 0b base64 (section 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            return int(value[2:], 16)
        if value[:2] in ("0b", "0B"):
            return int.from_bytes(base64.b64decode(value[2:], validate=True), "big")
        if value.isdigit():
            return int(value, 10)
    except (ValueError, binascii.Error) as exc:
        raise TextError(f"invalid number {value[:40]!r}") from exc
    raise TextError(f"invalid number {value[:40]!r}")


def parse_boolean(value: str) -> bool:
    """Parse "Yes" or "No"."""
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise TextError(f"invalid boolean {value[:40]!r}")


def parse_binary(value: str) -> bytes:
    """Parse a binary value given as 0x hexadecimal or 0b base64 (section 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            digits = value[2:]
            if len(digits) % 2:
                digits = "0" + digits
            return bytes.fromhex(digits)
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise TextError(f"invalid binary value {value[:40]!r}") from exc
    raise TextError(f"binary value without 0x or 0b prefix: {value[:40]!r}")


def encode_binary(data: bytes) -> str:
    """The 0x hexadecimal form of a binary value."""
    return "0x" + data.hex()
