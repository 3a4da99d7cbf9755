"""Mode parameters: the pages a block device keeps, MODE SENSE data and MODE SELECT parsing.

Holds `ModePages` with the read-write error recovery (01h), caching (08h) and control (0Ah,
with D_SENSE and SWP changeable) pages, their changeable masks and defaults (SPC-5 7.5, SBC-4
6.5), the MODE SENSE(6/10) header and block descriptor layouts, and validation of MODE SELECT
parameter lists. Knows nothing about storage or unit attentions: the caller applies the
outcome.
"""

from __future__ import annotations

import struct

from scsi_core.sense import Asc, FieldPointer, SenseKey

from scsi_emulation.errors import (
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

__all__ = [
    "PAGE_CACHING",
    "PAGE_CONTROL",
    "PAGE_RW_ERROR_RECOVERY",
    "ModePages",
    "PageControl",
]

PAGE_RW_ERROR_RECOVERY = 0x01
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
ALL_PAGES = 0x3F
ALL_SUBPAGES = 0xFF

_WCE = 0x04  # caching page byte 2
_D_SENSE = 0x04  # control page byte 2
_SWP = 0x08  # control page byte 4: software write protect (SPC-4 7.5.8)


class PageControl:
    """PC field values (SPC-5 6.14.1, table 162)."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


_HEADER6 = struct.Struct(">BBBB")  # mode data length, medium type, device-specific, BD length
_HEADER10 = struct.Struct(">HBBBxH")  # ..., LONGLBA in byte 4
_SHORT_BD = struct.Struct(">IxBH")  # number of blocks, reserved, block length (24 bits)
_LONG_BD = struct.Struct(">Q4xI")

_WP = 0x80  # device-specific parameter (SBC-4 6.5.1)
_DPOFUA = 0x10


def _rw_error_recovery() -> bytearray:
    page = bytearray(12)
    page[0], page[1] = PAGE_RW_ERROR_RECOVERY, 10
    page[2] = 0xC0  # AWRE, ARRE: reallocation is the storage's business
    return page


def _caching(wce: bool) -> bytearray:
    page = bytearray(20)
    page[0], page[1] = PAGE_CACHING, 18
    page[2] = _WCE if wce else 0
    return page


def _control(d_sense: bool, swp: bool = False) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = PAGE_CONTROL, 10
    page[2] = _D_SENSE if d_sense else 0
    page[4] = _SWP if swp else 0
    page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
    page[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    return page


class ModePages:
    """Current and default mode parameters of one logical unit (shared by all I_T nexuses)."""

    def __init__(self, write_cache: bool, descriptor_sense: bool) -> None:
        self._default_wce = write_cache
        self._default_d_sense = descriptor_sense
        self.wce = write_cache
        self.d_sense = descriptor_sense
        #: Software write protect: the LU is write-protected while it is set.
        self.swp = False

    def _page(self, code: int, pc: int) -> bytearray:
        if code == PAGE_RW_ERROR_RECOVERY:
            page = _rw_error_recovery()
            if pc == PageControl.CHANGEABLE:
                page[2:] = bytes(len(page) - 2)
            return page
        if code == PAGE_CACHING:
            if pc == PageControl.CHANGEABLE:
                page = _caching(False)
                page[2] = _WCE
                return page
            return _caching(self._default_wce if pc == PageControl.DEFAULT else self.wce)
        if code == PAGE_CONTROL:
            if pc == PageControl.CHANGEABLE:
                page = bytearray(12)
                page[0], page[1], page[2], page[4] = PAGE_CONTROL, 10, _D_SENSE, _SWP
                return page
            if pc == PageControl.DEFAULT:
                return _control(self._default_d_sense)
            return _control(self.d_sense, self.swp)
        raise KeyError(code)

    def sense_pages(self, cdb_page_byte: int, subpage: int) -> bytes:
        """The mode pages MODE SENSE asks for (CDB byte 2 = PC and PAGE CODE, byte 3 subpage).

        Raises `CommandError` for saved values (not supported) or an unknown page/subpage.
        """
        pc, code = cdb_page_byte >> 6, cdb_page_byte & 0x3F
        if pc == PageControl.SAVED:
            raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
        if code == ALL_PAGES:
            if subpage not in (0x00, ALL_SUBPAGES):
                raise invalid_field_in_cdb(3)
            codes = [PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL]
        elif code in (PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL):
            if subpage != 0x00:
                raise invalid_field_in_cdb(3)
            codes = [code]
        else:
            raise invalid_field_in_cdb(2, 5)
        return b"".join(bytes(self._page(c, pc)) for c in codes)

    def mode_sense(
        self,
        cdb: bytes | memoryview,
        *,
        ten: bool,
        write_protect: bool,
        blocks: int,
        block_size: int,
    ) -> bytes:
        """The full MODE SENSE(6) or (10) parameter data (the caller truncates it)."""
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pages = self.sense_pages(cdb[2], cdb[3])
        device_specific = (_WP if write_protect else 0) | _DPOFUA
        if dbd:
            bd = b""
        elif llbaa:
            bd = _LONG_BD.pack(blocks, block_size)
        else:
            bd = _SHORT_BD.pack(min(blocks, 0xFFFFFFFF), block_size >> 16, block_size & 0xFFFF)
        if ten:
            length = _HEADER10.size + len(bd) + len(pages) - 2
            header = _HEADER10.pack(length, 0, device_specific, int(llbaa), len(bd))
        else:
            length = min(_HEADER6.size + len(bd) + len(pages) - 1, 0xFF)
            header = _HEADER6.pack(length, 0, device_specific, len(bd))
        return header + bd + pages

    def select(self, params: bytes, *, ten: bool, block_size: int) -> bool:
        """Validate and apply a MODE SELECT parameter list; return whether anything changed.

        All pages are checked before any is applied. Field pointers index ``params``.
        """
        header = _HEADER10 if ten else _HEADER6
        if len(params) < header.size:
            raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
        if ten:
            _, _, _, longlba, bd_len = _HEADER10.unpack_from(params)
            bd_size = 16 if longlba & 1 else 8
        else:
            _, _, _, bd_len = _HEADER6.unpack_from(params)
            bd_size = 8
        pos = header.size
        bd_end = pos + bd_len
        if bd_len % bd_size or bd_end > len(params):
            raise invalid_field_in_parameter_list(header.size - (2 if ten else 1))
        for offset in range(pos, bd_end, bd_size):
            if bd_size == 16:
                length = int.from_bytes(params[offset + 12 : offset + 16], "big")
                field_at = offset + 12
            else:
                length = int.from_bytes(params[offset + 5 : offset + 8], "big")
                field_at = offset + 5
            if length != block_size:
                raise invalid_field_in_parameter_list(field_at)
        pos = bd_end
        updates: list[tuple[int, bytearray]] = []
        while pos < len(params):
            if pos + 2 > len(params):
                raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
            code, page_len = params[pos] & 0x3F, params[pos + 1]
            if params[pos] & 0x40:  # SPF: no subpages here
                raise invalid_field_in_parameter_list(pos, 6)
            try:
                current = self._page(code, PageControl.CURRENT)
                mask = self._page(code, PageControl.CHANGEABLE)
            except KeyError:
                raise invalid_field_in_parameter_list(pos, 5) from None
            if page_len != current[1]:
                raise invalid_field_in_parameter_list(pos + 1)
            end = pos + 2 + page_len
            if end > len(params):
                raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
            new = bytearray(params[pos:end])
            for i in range(2, len(new)):
                if (new[i] ^ current[i]) & ~mask[i] & 0xFF:
                    bad = (new[i] ^ current[i]) & ~mask[i] & 0xFF
                    raise CommandError(
                        SenseKey.ILLEGAL_REQUEST,
                        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                        FieldPointer(pos + i, bad.bit_length() - 1, in_cdb=False),
                    )
            updates.append((code, new))
            pos = end
        changed = False
        for code, new in updates:
            if code == PAGE_CACHING:
                wce = bool(new[2] & _WCE)
                changed |= wce != self.wce
                self.wce = wce
            elif code == PAGE_CONTROL:
                d_sense = bool(new[2] & _D_SENSE)
                swp = bool(new[4] & _SWP)
                changed |= d_sense != self.d_sense or swp != self.swp
                self.d_sense = d_sense
                self.swp = swp
        return changed

    def reset(self) -> None:
        """Back to the defaults (a LOGICAL UNIT RESET does not do this; power on does)."""
        self.wce = self._default_wce
        self.d_sense = self._default_d_sense
        self.swp = False
