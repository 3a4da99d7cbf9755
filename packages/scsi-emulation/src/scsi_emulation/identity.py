"""What a logical unit says about itself: vendor, product, revision, serial and NAA name.

Holds `DeviceIdentity`, with the padding rules of SPC-5 6.7.2 (ASCII, left-aligned, space
padded) and the derivation of a stable locally assigned NAA designator. Knows nothing about
commands or storage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["DeviceIdentity", "ascii_field"]


def ascii_field(text: str, width: int) -> bytes:
    """``text`` as printable ASCII, left-aligned and space padded to ``width`` (SPC-5 4.3.1)."""
    data = "".join(c if 0x20 <= ord(c) < 0x7F else "_" for c in text).encode("ascii")
    return data[:width].ljust(width, b" ")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Identification strings; ``naa`` overrides the derived 8-byte NAA designator."""

    vendor: str = "PYVHOST"
    product: str = "SCSI DISK"
    revision: str = "0001"
    serial: str = ""
    naa: int | None = None

    def naa_designator(self, lun: int) -> bytes:
        """An 8-byte NAA designator (NAA 3h, locally assigned: SPC-5 7.7.7.6.3).

        Derived from vendor, product, serial and LUN, so it is stable across restarts and
        distinct per LU when serials differ (or LUNs do).
        """
        if self.naa is not None:
            return self.naa.to_bytes(8, "big")
        digest = hashlib.sha256(
            f"{self.vendor}\0{self.product}\0{self.serial}\0{lun}".encode()
        ).digest()
        value = (0x3 << 60) | (int.from_bytes(digest[:8], "big") & ((1 << 60) - 1))
        return value.to_bytes(8, "big")

    def unit_serial(self, lun: int) -> str:
        """The unit serial number (VPD 80h): the configured one, or derived from the NAA."""
        return self.serial or self.naa_designator(lun).hex()
