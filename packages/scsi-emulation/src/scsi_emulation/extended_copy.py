"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): a copy manager for
block-to-block copies between the logical units of one target.

Holds the parameter-list parser (header, identification target descriptors E4h naming LUs by a
VPD 83h designator, block-to-block segment descriptors 02h), the copy itself (back-end to
back-end through a bounded bounce buffer), the copy status kept per I_T nexus and LIST
IDENTIFIER, the operating parameters, and the registry through which a copy finds the other
LUs of its target. Knows nothing about transports.

Every segment is checked (copy targets resolved, ranges, write protection) before any block
moves; a copy of `BACKGROUND_THRESHOLD` bytes or more (up to 64 segments of 65535 blocks)
then moves them on a worker thread (`BlockDevice.run_in_background`, counted in flight on
every LU it touches), a smaller one inline. The first failing segment's error is reported
after the segments before it were copied, as if they ran one by one.

Peers: every `BlockDevice` registers itself here; two devices belong to the same target when
their ``lister`` (the target's bound ``luns`` method, set at attach) compares equal, so a copy
never reaches an LU of another target in the same process.
"""

from __future__ import annotations

import logging
import struct
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, SenseData, SenseKey
from scsi_core.status import Status
from scsi_core.target import Completion, Request, Response

from scsi_emulation.backend import BackendError
from scsi_emulation.errors import (
    GOOD,
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from scsi_emulation.transfer import data_out_residual, receive_parameters, send_data
from scsi_emulation.vpd import designators

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = [
    "BACKGROUND_THRESHOLD",
    "COPY_COMMANDS",
    "COPY_WORKER_COMMANDS",
    "MAX_DESCRIPTOR_LIST_LENGTH",
    "MAX_SEGMENT_DESCRIPTORS",
    "MAX_TARGET_DESCRIPTORS",
    "CopyStatus",
    "peers",
    "register_device",
    "third_party_copy_descriptors",
]

logger = logging.getLogger(__name__)

EXTENDED_COPY_LID1 = 0x00
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03

MAX_TARGET_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 64
MAX_DESCRIPTOR_LIST_LENGTH = 2048
_MAX_SEGMENT_BLOCKS = 0xFFFF  # the B2B NUMBER OF BLOCKS field is 16 bits
_BOUNCE = 1 << 20  # bytes moved per back-end call
#: Bytes of copying from which the copy runs on a worker thread rather than the caller's.
BACKGROUND_THRESHOLD = 1 << 20
_KEPT_STATUSES = 64  # copy statuses remembered per LU (oldest dropped first)

_IDENTIFICATION_DESCRIPTOR = 0xE4
_BLOCK_TO_BLOCK = 0x02
_TARGET_DESCRIPTOR_LENGTH = 32
_B2B_LENGTH = 0x18  # DESCRIPTOR LENGTH of a block-to-block segment descriptor (bytes 4..27)

# Parameter list header (SPC-4 6.4.3.1, LID1): LIST IDENTIFIER, STR|LIST ID USAGE|PRIORITY,
# TARGET DESCRIPTOR LIST LENGTH, reserved, SEGMENT DESCRIPTOR LIST LENGTH, INLINE DATA LENGTH.
_HEADER = struct.Struct(">BBH4xII")
_HEADER_LENGTH = 16
# Block to block segment descriptor (6.4.5.5): type, DC|CAT, length, source and destination
# target descriptor index, reserved, NUMBER OF BLOCKS, source LBA, destination LBA.
_B2B = struct.Struct(">BBHHH2xHQQ")
# RECEIVE COPY RESULTS, COPY STATUS (6.18.3): AVAILABLE DATA, HDD|STATUS, SEGMENTS PROCESSED,
# TRANSFER COUNT UNITS, TRANSFER COUNT.
_COPY_STATUS = struct.Struct(">IBHBI")
# OPERATING PARAMETERS (6.18.5) through IMPLEMENTED DESCRIPTOR LIST LENGTH.
_OPERATING_PARAMETERS = struct.Struct(">IB3xHHIIIII2xHBBBB3xB")

_COPY_ABORTED_UNREACHABLE = (0x08, 0x04)  # UNREACHABLE COPY TARGET
_COPY_ABORTED_NOT_REACHABLE = (0x0D, 0x02)  # COPY TARGET DEVICE NOT REACHABLE
_COPY_ABORTED_NO_SENSE = (0x00, 0x00)
_TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
_UNSUPPORTED_TARGET_DESCRIPTOR = (0x26, 0x07)
_TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
_UNSUPPORTED_SEGMENT_DESCRIPTOR = (0x26, 0x09)

_STATUS_COMPLETE = 0x01
_STATUS_COMPLETE_WITH_ERRORS = 0x02


class CopySenseError(CommandError):
    """A copy error whose ASC/ASCQ has no `Asc` member: the sense is built from raw codes."""

    def __init__(self, key: SenseKey, code: tuple[int, int], segment: int | None = None) -> None:
        super().__init__(key, Asc.NO_ADDITIONAL_SENSE_INFORMATION)
        self.raw = code
        self.segment = segment

    def response(self, descriptor: bool = False, residual: int = 0) -> Response:
        asc, ascq = self.raw
        sense = SenseData(key=self.key, asc=asc, ascq=ascq).to_bytes(descriptor)
        return Response(Status.CHECK_CONDITION, sense, residual)


def _aborted(code: tuple[int, int], segment: int) -> CopySenseError:
    # SPC-4 6.4.3.3: errors while processing segments end in COPY ABORTED.
    return CopySenseError(SenseKey.COPY_ABORTED, code, segment)


def _illegal(code: tuple[int, int]) -> CopySenseError:
    return CopySenseError(SenseKey.ILLEGAL_REQUEST, code)


_PARAMETER_LIST_LENGTH_ERROR = CommandError(
    SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR
)


# -- peers -----------------------------------------------------------------------------------

_DEVICES: weakref.WeakSet[BlockDevice] = weakref.WeakSet()


def register_device(device: BlockDevice) -> None:
    """Make ``device`` reachable as a copy source or destination (called by `BlockDevice`)."""
    _DEVICES.add(device)


def peers(device: BlockDevice) -> list[BlockDevice]:
    """The devices of ``device``'s target (including itself)."""
    found = [d for d in _DEVICES if d is device or d.lister == device.lister]
    return found if device in found else [device, *found]


def _find(device: BlockDevice, code_set: int, kind: int, value: bytes) -> BlockDevice | None:
    for peer in peers(device):
        for d_code_set, d_kind, d_value in designators(peer.lun, peer.options):
            if (d_code_set, d_kind, d_value) == (code_set, kind, value):
                return peer
    return None


# -- copy status ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyStatus:
    """What RECEIVE COPY RESULTS, COPY STATUS reports for one EXTENDED COPY command."""

    status: int
    segments_processed: int
    bytes_transferred: int


_StatusMap = OrderedDict[tuple[Hashable, int], CopyStatus]
_STATUSES: weakref.WeakKeyDictionary[BlockDevice, _StatusMap] = weakref.WeakKeyDictionary()


def _remember(device: BlockDevice, nexus: Hashable, list_id: int, status: CopyStatus) -> None:
    kept = _STATUSES.setdefault(device, OrderedDict())
    kept.pop((nexus, list_id), None)
    kept[(nexus, list_id)] = status
    while len(kept) > _KEPT_STATUSES:
        kept.popitem(last=False)


# -- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    offset: int  # of the descriptor in the parameter list, for field pointers
    null: bool
    peripheral: int
    designator: tuple[int, int, bytes]
    block_size: int


@dataclass(frozen=True, slots=True)
class _Segment:
    source: int
    destination: int
    blocks: int
    source_lba: int
    destination_lba: int


def _parse_targets(params: bytes, start: int, length: int) -> list[_Target]:
    if length % _TARGET_DESCRIPTOR_LENGTH:
        raise invalid_field_in_parameter_list(2)
    targets: list[_Target] = []
    for offset in range(start, start + length, _TARGET_DESCRIPTOR_LENGTH):
        kind = params[offset]
        if kind != _IDENTIFICATION_DESCRIPTOR:
            raise _illegal(_UNSUPPORTED_TARGET_DESCRIPTOR)
        if len(targets) == MAX_TARGET_DESCRIPTORS:
            raise _illegal(_TOO_MANY_TARGET_DESCRIPTORS)
        # Byte 1 bits 7..6 (SPC-3's LU ID TYPE) are ignored: obsolete in SPC-4, which our
        # INQUIRY VERSION claims (libiscsi's ValidTgtDescr checks exactly that).
        flags = params[offset + 1]
        size = min(params[offset + 7], 20)
        designator = (
            params[offset + 4] & 0x0F,
            params[offset + 5] & 0x3F,  # association (bits 5..4) and designator type
            bytes(params[offset + 8 : offset + 8 + size]),
        )
        block_size = int.from_bytes(params[offset + 29 : offset + 32], "big")
        targets.append(_Target(offset, bool(flags & 0x20), flags & 0x1F, designator, block_size))
    return targets


def _parse_segments(params: bytes, start: int, length: int) -> list[_Segment]:
    segments: list[_Segment] = []
    offset, end = start, start + length
    while offset < end:
        if end - offset < 4:
            raise invalid_field_in_parameter_list(offset)
        if params[offset] != _BLOCK_TO_BLOCK:
            raise _illegal(_UNSUPPORTED_SEGMENT_DESCRIPTOR)
        if len(segments) == MAX_SEGMENT_DESCRIPTORS:
            raise _illegal(_TOO_MANY_SEGMENT_DESCRIPTORS)
        size = int.from_bytes(params[offset + 2 : offset + 4], "big")
        if size != _B2B_LENGTH or offset + 4 + size > end:
            raise invalid_field_in_parameter_list(offset + 2)
        _, _, _, src, dst, blocks, src_lba, dst_lba = _B2B.unpack_from(params, offset)
        segments.append(_Segment(src, dst, blocks, src_lba, dst_lba))
        offset += 4 + size
    return segments


# -- the copy ------------------------------------------------------------------------------


def _resolve(device: BlockDevice, targets: list[_Target], index: int, n: int) -> BlockDevice:
    if index >= len(targets):
        raise _aborted(_COPY_ABORTED_UNREACHABLE, n)
    t = targets[index]
    if t.null or t.peripheral != 0:
        raise _aborted(_COPY_ABORTED_UNREACHABLE, n)
    code_set, assoc_kind, value = t.designator
    if assoc_kind >> 4:  # only logical-unit designators name a copy target here
        raise _aborted(_COPY_ABORTED_UNREACHABLE, n)
    peer = _find(device, code_set, assoc_kind & 0x0F, value)
    if peer is None:
        raise _aborted(_COPY_ABORTED_UNREACHABLE, n)
    if not peer.medium_present or getattr(peer, "sanitizing", False):
        raise _aborted(_COPY_ABORTED_NOT_REACHABLE, n)
    if t.block_size != peer.block_size:
        raise invalid_field_in_parameter_list(t.offset + 29)
    return peer


def _move(src: BlockDevice, dst: BlockDevice, seg: _Segment) -> int:
    """Copy the segment's blocks; overlapping ranges on one LU copy like ``memmove``."""
    total = seg.blocks << src.shift
    src_off, dst_off = seg.source_lba << src.shift, seg.destination_lba << dst.shift
    bounce = bytearray(min(total, _BOUNCE))
    view = memoryview(bounce)
    backwards = src is dst and src_off < dst_off < src_off + total
    done = 0
    while done < total:
        n = min(len(bounce), total - done)
        at = total - done - n if backwards else done
        src.backend.read(src_off + at, [view[:n]], n)
        dst.backend.write(dst_off + at, [view[:n]], n, dst.durable)
        done += n
    return total


@dataclass(frozen=True, slots=True)
class _Plan:
    """The checked segments, in order, and the error of the first one that failed (if any:
    the copy stops there, reporting it once the segments before it were copied)."""

    steps: list[tuple[BlockDevice, BlockDevice, _Segment]]
    error: CommandError | None

    @property
    def total(self) -> int:
        return sum(seg.blocks << src.shift for src, _, seg in self.steps)


def _plan(device: BlockDevice, targets: list[_Target], segments: list[_Segment]) -> _Plan:
    steps: list[tuple[BlockDevice, BlockDevice, _Segment]] = []
    for n, seg in enumerate(segments):
        try:
            src = _resolve(device, targets, seg.source, n)
            dst = _resolve(device, targets, seg.destination, n)
            for peer, lba in ((src, seg.source_lba), (dst, seg.destination_lba)):
                if lba + seg.blocks > peer.nblocks:
                    # SPC-4 6.4.3.3: COPY ABORTED; the suite expects one of the copy ASCs here.
                    raise _aborted(_COPY_ABORTED_NO_SENSE, n)
            if dst.read_only:
                raise CommandError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        except CommandError as e:
            return _Plan(steps, e)
        steps.append((src, dst, seg))
    return _Plan(steps, None)


def _process(plan: _Plan) -> int:
    """Move the planned segments; raises the plan's error (or a segment's I/O error) after."""
    moved = 0
    for n, (src, dst, seg) in enumerate(plan.steps):
        try:
            moved += _move(src, dst, seg)
        except BackendError as e:
            logger.warning("extended copy segment %d failed: %s", n, e)
            raise _aborted(_COPY_ABORTED_NOT_REACHABLE, n) from e
    if plan.error is not None:
        raise plan.error
    return moved


def extended_copy(dev: BlockDevice, request: Request, complete: Completion) -> Response | None:
    """EXTENDED COPY (LID1): validate the whole parameter list and every segment, then copy
    segment by segment (on a worker thread from `BACKGROUND_THRESHOLD` bytes on)."""
    length = int.from_bytes(request.cdb[10:14], "big")
    if length == 0:
        return GOOD  # no parameter list: nothing to copy (SPC-4 6.4.1)
    if length < _HEADER_LENGTH:
        raise _PARAMETER_LIST_LENGTH_ERROR
    params = receive_parameters(request, length)
    list_id, flags, tdl, sdl, inline = _HEADER.unpack_from(params)
    usage = (flags >> 3) & 0x03
    if usage == 0b01:
        raise invalid_field_in_parameter_list(1, 4)
    if usage == 0b11 and list_id:
        raise invalid_field_in_parameter_list(0)
    if _HEADER_LENGTH + tdl + sdl + inline > length or tdl + sdl > MAX_DESCRIPTOR_LIST_LENGTH:
        raise _PARAMETER_LIST_LENGTH_ERROR
    if inline:  # MAXIMUM INLINE DATA LENGTH is 0
        raise _PARAMETER_LIST_LENGTH_ERROR
    targets = _parse_targets(params, _HEADER_LENGTH, tdl)
    segments = _parse_segments(params, _HEADER_LENGTH + tdl, sdl)
    keep = usage != 0b11
    nexus = request.nexus
    plan = _plan(dev, targets, segments)

    def work() -> None:
        try:
            moved = _process(plan)
        except CommandError as e:
            if keep:
                done = e.segment if isinstance(e, CopySenseError) and e.segment is not None else 0
                failed = CopyStatus(_STATUS_COMPLETE_WITH_ERRORS, done, 0)
                _remember(dev, nexus, list_id, failed)
            raise
        if keep:
            _remember(dev, nexus, list_id, CopyStatus(_STATUS_COMPLETE, len(segments), moved))

    good = data_out_residual(request)
    if plan.total < BACKGROUND_THRESHOLD:
        work()
        return good
    busy = [peer for step in plan.steps for peer in step[:2]]
    return dev.run_in_background(
        request, complete, work, good, name="extended-copy", also_busy=busy
    )


def _scaled(count: int) -> tuple[int, int]:
    """TRANSFER COUNT UNITS and TRANSFER COUNT (bytes, KiB, MiB, ... so it fits 32 bits)."""
    units = 0
    while count > 0xFFFFFFFF:
        count >>= 10
        units += 1
    return units, count


def receive_copy_status(dev: BlockDevice, request: Request) -> Response:
    """RECEIVE COPY RESULTS, COPY STATUS (LID1) for this nexus's LIST IDENTIFIER."""
    list_id = request.cdb[2]
    status = _STATUSES.get(dev, OrderedDict()).get((request.nexus, list_id))
    if status is None:
        raise invalid_field_in_cdb(2)  # no EXTENDED COPY known with this list identifier
    units, count = _scaled(status.bytes_transferred)
    data = _COPY_STATUS.pack(8, status.status, status.segments_processed, units, count)
    return send_data(request, data, int.from_bytes(request.cdb[10:14], "big"))


def _implemented_descriptors() -> bytes:
    return bytes((_BLOCK_TO_BLOCK, _IDENTIFICATION_DESCRIPTOR))


def receive_operating_parameters(dev: BlockDevice, request: Request) -> Response:
    """RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.5)."""
    codes = _implemented_descriptors()
    body = _OPERATING_PARAMETERS.pack(
        0,  # AVAILABLE DATA, patched below
        0,  # SNLID: list identifiers are per I_T nexus
        MAX_TARGET_DESCRIPTORS,
        MAX_SEGMENT_DESCRIPTORS,
        MAX_DESCRIPTOR_LIST_LENGTH,
        _MAX_SEGMENT_BLOCKS * dev.block_size,  # MAXIMUM SEGMENT LENGTH
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
        1,  # TOTAL CONCURRENT COPIES: advertised, not enforced (large copies use a worker)
        1,  # MAXIMUM CONCURRENT COPIES
        dev.shift,  # DATA SEGMENT GRANULARITY (log2 bytes)
        0,  # INLINE DATA GRANULARITY
        0,  # HELD DATA GRANULARITY
        len(codes),
    )
    data = bytearray(body + codes)
    data[0:4] = (len(data) - 4).to_bytes(4, "big")
    return send_data(request, bytes(data), int.from_bytes(request.cdb[10:14], "big"))


# -- Third-party Copy VPD page (SPC-4 7.8.17) ----------------------------------------------


def _descriptor(kind: int, body: bytes) -> bytes:
    body = body.ljust((len(body) + 4 + 3) // 4 * 4 - 4, b"\0")  # whole descriptor: 4n bytes
    return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def _supported_commands(commands: Iterable[tuple[int, tuple[int, ...]]]) -> bytes:
    entries = b"".join(bytes((op, len(sas), *sas)) for op, sas in commands)
    return bytes((len(entries),)) + entries


def third_party_copy_descriptors(block_size: int) -> bytes:
    """The descriptors of VPD page 8Fh: supported commands, parameter data, supported
    descriptors and general copy operations."""
    commands = (
        (Opcode.EXTENDED_COPY, (EXTENDED_COPY_LID1,)),
        (Opcode.RECEIVE_COPY_RESULTS, (COPY_STATUS, OPERATING_PARAMETERS)),
    )
    parameter_data = struct.pack(
        ">4xHHII12x", MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS, MAX_DESCRIPTOR_LIST_LENGTH, 0
    )
    codes = _implemented_descriptors()
    granularity = block_size.bit_length() - 1  # log2 of the logical block size
    general = struct.pack(">IIIBB14x", 1, 1, _MAX_SEGMENT_BLOCKS * block_size, granularity, 0)
    return b"".join(
        (
            _descriptor(0x0001, _supported_commands(commands)),
            _descriptor(0x0004, bytes((len(codes),)) + codes),
            _descriptor(0x0008, parameter_data),
            _descriptor(0x8001, general),
        )
    )


CommandFunction = Callable[["BlockDevice", Request], Response]

COPY_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.RECEIVE_COPY_RESULTS, COPY_STATUS): receive_copy_status,
    (Opcode.RECEIVE_COPY_RESULTS, OPERATING_PARAMETERS): receive_operating_parameters,
}

WorkerCommand = Callable[["BlockDevice", Request, Completion], "Response | None"]

#: The commands that may complete later: `BlockDevice` passes them ``complete``.
COPY_WORKER_COMMANDS: dict[tuple[int, int | None], WorkerCommand] = {
    (Opcode.EXTENDED_COPY, EXTENDED_COPY_LID1): extended_copy,
}
