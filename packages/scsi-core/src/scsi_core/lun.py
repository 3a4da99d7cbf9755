"""Logical unit number encoding for the 8-byte LUN field (SAM-5 4.7).

Holds the single-level forms a target with up to 16384 LUNs needs: peripheral device addressing
(LUN 0..255, bus identifier 0), flat space addressing (LUN 0..16383) and the REPORT LUNS
well-known LUN. Knows nothing about how a transport carries the field (virtio-scsi and iSCSI
each wrap it in their own header).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MAX_LUN",
    "REPORT_LUNS_WLUN",
    "LunError",
    "assign_luns",
    "decode_lun",
    "encode_lun",
]

#: Highest LUN the flat space addressing method can express (14 bits).
MAX_LUN = 16383

#: The REPORT LUNS well-known logical unit (SAM-5 4.7.6.3, extended address method 11b,
#: W-LUN 01h), as ``decode_lun`` returns it: the first two bytes of its 8-byte form.
REPORT_LUNS_WLUN = 0xC101

_PERIPHERAL = 0x00  # address method 00b (SAM-5 4.7.6.2)
_FLAT = 0x40  # address method 01b (SAM-5 4.7.6.4)
_ZERO6 = bytes(6)


class LunError(ValueError):
    """A LUN number that no single-level 8-byte form can carry."""


def encode_lun(n: int) -> bytes:
    """Encode LUN ``n`` as the 8-byte SAM-5 field.

    LUNs below 256 use peripheral device addressing (bus identifier 0), as Linux and QEMU do;
    256..16383 use flat space addressing; ``REPORT_LUNS_WLUN`` gives ``C1 01 00 ...``.
    """
    if n == REPORT_LUNS_WLUN:
        return b"\xc1\x01" + _ZERO6
    if 0 <= n < 256:
        return bytes((_PERIPHERAL, n)) + _ZERO6
    if 256 <= n <= MAX_LUN:
        return bytes((_FLAT | (n >> 8), n & 0xFF)) + _ZERO6
    raise LunError(f"LUN {n} cannot be encoded in a single-level LUN field")


def decode_lun(b: bytes | bytearray | memoryview) -> int | None:
    """Decode an 8-byte single-level LUN field.

    Returns the LUN (0..16383) for peripheral (bus 0) or flat space addressing, or
    ``REPORT_LUNS_WLUN``. Returns None for anything else: another bus identifier, a multi-level
    (non-zero second level) LUN, logical unit or extended addressing other than the REPORT LUNS
    W-LUN, or a field that is not 8 bytes long.
    """
    if len(b) != 8 or bytes(b[2:8]) != _ZERO6:
        return None
    first, second = b[0], b[1]
    method = first & 0xC0
    if method == _PERIPHERAL:
        return second if first == 0 else None
    if method == _FLAT:
        return ((first & 0x3F) << 8) | second
    if first == 0xC1 and second == 0x01:
        return REPORT_LUNS_WLUN
    return None


def assign_luns(items: Iterable[str]) -> list[tuple[int, str]]:
    """Number logical-unit arguments as both daemons' command lines take them.

    ``N=REST`` puts REST at LUN N; a bare ``REST`` takes the LUN after the previous one (the
    first free one from there). Returns ``(lun, rest)`` pairs in order. Raises ValueError,
    naming the item, for a LUN above MAX_LUN or given twice.
    """
    assigned: list[tuple[int, str]] = []
    used: set[int] = set()
    next_lun = 0
    for item in items:
        lun_text, sep, rest = item.partition("=")
        if sep and lun_text.isdigit():
            lun = int(lun_text)
            if lun > MAX_LUN:
                raise ValueError(f"LUN {lun} in {item!r} is outside 0..{MAX_LUN}")
        else:
            lun, rest = next_lun, item
            while lun in used:
                lun += 1
        if lun in used:
            raise ValueError(f"LUN {lun} is given twice ({item!r})")
        used.add(lun)
        next_lun = lun + 1
        assigned.append((lun, rest))
    return assigned
