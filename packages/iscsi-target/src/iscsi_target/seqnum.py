"""32-bit serial number arithmetic for CmdSN, StatSN and DataSN (RFC 1982, as RFC 7143
section 4.2.2.1 requires).

Pure functions on integers; no protocol state.
"""

from __future__ import annotations

__all__ = ["sn_add", "sn_in_window", "sn_less"]

_MASK = 0xFFFFFFFF
_HALF = 1 << 31


def sn_add(a: int, n: int) -> int:
    """a + n modulo 2**32."""
    return (a + n) & _MASK


def sn_less(a: int, b: int) -> bool:
    """True when serial number a precedes b (RFC 1982 section 3.2)."""
    return a != b and ((a < b and b - a < _HALF) or (a > b and a - b > _HALF))


def sn_in_window(sn: int, low: int, high: int) -> bool:
    """True when low <= sn <= high in serial arithmetic."""
    return not sn_less(sn, low) and not sn_less(high, sn)
