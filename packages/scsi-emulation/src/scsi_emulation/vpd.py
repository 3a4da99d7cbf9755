"""Standard INQUIRY data and the VPD pages of an emulated block device (SPC-5 6.7, 7.7; SBC-4 6.6).

Holds builders for the standard INQUIRY data and for VPD pages 00h (supported pages), 80h (unit
serial number), 83h (device identification), 8Fh (third-party copy), B0h (block limits), B1h
(block device characteristics) and B2h (logical block provisioning), and the LU's designators
(which EXTENDED COPY matches). Knows nothing about CDB parsing or allocation lengths: the
caller truncates.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from scsi_emulation.identity import ascii_field
from scsi_emulation.options import BlockDeviceOptions

__all__ = [
    "PERIPHERAL_DISK",
    "PERIPHERAL_NONE",
    "PERIPHERAL_WELL_KNOWN",
    "VpdContext",
    "designators",
    "standard_inquiry",
    "supported_vpd_pages",
    "vpd_page",
]

PERIPHERAL_DISK = 0x00
PERIPHERAL_WELL_KNOWN = 0x1E
#: Peripheral qualifier 011b, device type 1Fh: no logical unit here (SPC-5 6.7.2).
PERIPHERAL_NONE = 0x7F

# Version descriptors (SPC-5 table 148): SAM-5, SPC-4, SBC-3.
_VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)
_STANDARD_LENGTH = 74  # through the eight version descriptors (bytes 58..73)

_HEADER = struct.Struct(">BBH")  # peripheral byte, page code, page length
_B0 = struct.Struct(">BBHIIIIIIIQ")  # WSNZ .. MAXIMUM WRITE SAME LENGTH (bytes 4..43)
# MAXIMUM ATOMIC TRANSFER LENGTH, ATOMIC ALIGNMENT, ATOMIC TRANSFER LENGTH GRANULARITY, MAXIMUM
# ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY, MAXIMUM ATOMIC BOUNDARY SIZE (bytes 44..63).
_B0_ATOMIC = struct.Struct(">IIIII")
_B0_LENGTH = 0x3C
_B1_LENGTH = 0x3C
_B2_LENGTH = 0x04


def standard_inquiry(
    peripheral: int,
    vendor: str,
    product: str,
    revision: str,
    *,
    removable: bool = False,
    command_queuing: bool = True,
    third_party_copy: bool = False,
) -> bytes:
    """Standard INQUIRY data: VERSION 6 (SPC-4), HISUP, response format 2, CMDQUE, and 3PC
    when the LU is a copy manager (EXTENDED COPY)."""
    head = bytes(
        (
            peripheral,
            0x80 if removable else 0x00,
            0x06,  # SPC-4
            0x12,  # HISUP, RESPONSE DATA FORMAT 2
            _STANDARD_LENGTH - 5,
            0x08 if third_party_copy else 0x00,  # 3PC; no SCCS/ACC/TPGS/PROTECT
            0x00,
            0x02 if command_queuing else 0x00,  # CMDQUE
        )
    )
    body = ascii_field(vendor, 8) + ascii_field(product, 16) + ascii_field(revision, 4)
    descriptors = b"".join(v.to_bytes(2, "big") for v in _VERSION_DESCRIPTORS)
    data = head + body + bytes(58 - 36) + descriptors
    return data.ljust(_STANDARD_LENGTH, b"\0")


@dataclass(frozen=True, slots=True)
class VpdContext:
    """What the VPD builders need from the logical unit."""

    lun: int
    options: BlockDeviceOptions
    #: Logical blocks per allocation unit (OPTIMAL UNMAP GRANULARITY).
    unmap_granularity: int


def _page(code: int, body: bytes, peripheral: int = PERIPHERAL_DISK) -> bytes:
    return _HEADER.pack(peripheral, code, len(body)) + body


def _supported(ctx: VpdContext) -> bytes:
    return _page(0x00, bytes(supported_vpd_pages(ctx.options)))


def _serial(ctx: VpdContext) -> bytes:
    return _page(0x80, ctx.options.identity.unit_serial(ctx.lun).encode("ascii", "replace"))


def _designator(code_set: int, kind: int, value: bytes) -> bytes:
    # association 00b (the logical unit), PIV 0 (SPC-5 7.7.7.1, table 659)
    return bytes((code_set, kind, 0, len(value))) + value


def designators(lun: int, options: BlockDeviceOptions) -> list[tuple[int, int, bytes]]:
    """The LU's designators as (CODE SET, DESIGNATOR TYPE, designator), association 00b."""
    ident = options.identity
    return [
        (0x01, 0x03, ident.naa_designator(lun)),  # NAA, binary
        # T10 vendor ID based (type 1): vendor (8 bytes) + vendor-specific unique text.
        (
            0x02,
            0x01,
            ascii_field(ident.vendor, 8)
            + f"{ident.product.strip()}:{ident.unit_serial(lun)}".encode("ascii", "replace"),
        ),
    ]


def _identification(ctx: VpdContext) -> bytes:
    body = b"".join(
        _designator(code_set, kind, value)
        for code_set, kind, value in designators(ctx.lun, ctx.options)
    )
    return _page(0x83, body)


def _third_party_copy(ctx: VpdContext) -> bytes:
    from scsi_emulation.extended_copy import third_party_copy_descriptors

    return _page(0x8F, third_party_copy_descriptors(ctx.options.block_size))


def _block_limits(ctx: VpdContext) -> bytes:
    o = ctx.options
    thin = o.thin_provisioning
    body = _B0.pack(
        0x01,  # WSNZ: a WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is an error
        o.max_compare_and_write_blocks,
        1,  # OPTIMAL TRANSFER LENGTH GRANULARITY
        o.max_transfer_blocks,
        o.optimal_transfer_blocks,
        o.max_transfer_blocks,  # MAXIMUM PREFETCH LENGTH
        o.max_unmap_lba_count if thin else 0,
        o.max_unmap_descriptors if thin else 0,
        ctx.unmap_granularity if thin else 0,
        0x80000000 if thin else 0,  # UGAVALID, alignment 0
        o.max_write_same_blocks,
    )
    # WRITE ATOMIC(16): no alignment or granularity rules, no atomic boundaries.
    body += _B0_ATOMIC.pack(o.atomic_transfer_limit, 0, 0, 0, 0)
    return _page(0xB0, body.ljust(_B0_LENGTH, b"\0"))


def _characteristics(ctx: VpdContext) -> bytes:
    rotation = 1 if ctx.options.solid_state else 0  # 1: non-rotating medium (SBC-4 6.6.2)
    # WABEREQ 01b: after SANITIZE BLOCK ERASE (thin LUs only) reads succeed, returning the
    # LBPRZ zeros. WACEREQ 00b: no CRYPTOGRAPHIC ERASE.
    wabereq = 0x40 if ctx.options.thin_provisioning else 0x00
    body = rotation.to_bytes(2, "big") + bytes((0, wabereq)) + bytes(_B1_LENGTH - 4)
    return _page(0xB1, body)


def _provisioning(ctx: VpdContext) -> bytes:
    if ctx.options.thin_provisioning:
        # LBPU, LBPWS, LBPWS10, LBPRZ=001b; provisioning type 010b (thin)
        flags, ptype = 0x80 | 0x40 | 0x20 | (0x1 << 2), 0x02
    else:
        flags, ptype = 0, 0
    return _page(0xB2, bytes((0, flags, ptype, 0)))


_BUILDERS: dict[int, Callable[[VpdContext], bytes]] = {
    0x00: _supported,
    0x80: _serial,
    0x83: _identification,
    0x8F: _third_party_copy,
    0xB0: _block_limits,
    0xB1: _characteristics,
    0xB2: _provisioning,
}


def supported_vpd_pages(options: BlockDeviceOptions) -> list[int]:
    """Page codes in ascending order (SPC-5 7.7.16 requires the order)."""
    return sorted(_BUILDERS)


def vpd_page(code: int, ctx: VpdContext) -> bytes | None:
    """The full VPD page, or None if the page is not supported."""
    build = _BUILDERS.get(code)
    return build(ctx) if build else None
