"""REPORT LUNS parameter data (SPC-5 6.33).

Holds the SELECT REPORT values and the builder of the LUN list. Knows nothing about which LUNs
exist: the target passes them in.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from scsi_core.lun import REPORT_LUNS_WLUN, encode_lun

__all__ = ["SELECT_ALL", "SELECT_ALL_WITH_WELL_KNOWN", "SELECT_WELL_KNOWN", "report_luns_data"]

SELECT_ALL = 0x00  # logical units, no well-known LUs
SELECT_WELL_KNOWN = 0x01
SELECT_ALL_WITH_WELL_KNOWN = 0x02

_HEADER = struct.Struct(">I4x")  # LUN LIST LENGTH, reserved


def report_luns_data(luns: Iterable[int], select_report: int) -> bytes | None:
    """The parameter data for ``select_report``, or None when it is not supported."""
    if select_report == SELECT_ALL:
        chosen = sorted(luns)
    elif select_report == SELECT_WELL_KNOWN:
        chosen = [REPORT_LUNS_WLUN]
    elif select_report == SELECT_ALL_WITH_WELL_KNOWN:
        chosen = [*sorted(luns), REPORT_LUNS_WLUN]
    else:
        return None
    body = b"".join(encode_lun(n) for n in chosen)
    return _HEADER.pack(len(body)) + body
