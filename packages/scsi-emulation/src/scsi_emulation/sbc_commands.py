"""SBC commands of the emulated block device other than READ/WRITE: capacity, verify, cache,
provisioning (UNMAP, WRITE SAME, GET LBA STATUS), COMPARE AND WRITE and ORWRITE.

Holds one function per command, ``(device, request) -> Response``, and the `SBC_COMMANDS`
table; WRITE SAME and UNMAP also take ``complete`` (`SBC_WORKER_COMMANDS`): their large cases
(a non-zero pattern over 1 MiB or more; zeros written where the back-end cannot punch holes)
run on a worker thread through `BlockDevice.run_in_background`, after every check, while the
cheap ones (zeros written or holes punched by the back-end, small patterns) stay inline.
Payloads here are compared or combined, so they are copied (these are not hot-path
commands); plain writes go through `BlockDevice.write` without copies. Knows nothing about
transports.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.cdb import BlockCdb, decode_block_cdb
from scsi_core.opcodes import Opcode, ServiceActionIn16
from scsi_core.sense import Asc, SenseKey
from scsi_core.target import Completion, Request, Response

from scsi_emulation.backend import BackendError
from scsi_emulation.errors import (
    GOOD,
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from scsi_emulation.transfer import data_out_residual, receive_parameters, send_data

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = ["BACKGROUND_THRESHOLD", "SBC_COMMANDS", "SBC_WORKER_COMMANDS"]

_READ_CAPACITY_10 = struct.Struct(">II")
_READ_CAPACITY_16 = struct.Struct(">QIBBH16x")
_LBA_STATUS_HEADER = struct.Struct(">I4x")
_LBA_STATUS_DESCRIPTOR = struct.Struct(">QIB3x")
_UNMAP_HEADER = struct.Struct(">HH4x")
_UNMAP_DESCRIPTOR = struct.Struct(">QI4x")

_PATTERN_CHUNK = 1 << 20  # WRITE SAME writes its pattern in chunks of this many bytes
#: Bytes of writing from which WRITE SAME / UNMAP run on a worker thread, not the caller's.
BACKGROUND_THRESHOLD = 1 << 20
_VERIFY_CHUNK = 1 << 20  # VERIFY reads the medium in chunks of this many bytes
# The TRANSFER LENGTH / VERIFICATION LENGTH byte of each size of CDB (field pointers).
_LENGTH_BYTE = {10: 7, 12: 6, 16: 10}
_MAX_LBA_STATUS_DESCRIPTORS = 256


def _protect_check(c: BlockCdb) -> None:
    if c.protect:  # no protection information on this LU (SBC-4 4.22)
        raise invalid_field_in_cdb(1 if c.opcode != Opcode.VARIABLE_LENGTH else 10, 7)


def _read_blocks(dev: BlockDevice, lba: int, n: int) -> bytearray:
    length = n << dev.shift
    buf = bytearray(length)
    if length:
        try:
            dev.backend.read(lba << dev.shift, [memoryview(buf)], length)
        except BackendError as e:
            raise CommandError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR) from e
    return buf


def _write_error(e: BackendError) -> CommandError:
    if e.errno == 28:  # ENOSPC (thin provisioning, SBC-4 4.7.3.7)
        return CommandError(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    return CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)


def _write_blocks(dev: BlockDevice, lba: int, data: bytes | bytearray, durable: bool) -> None:
    try:
        dev.backend.write(lba << dev.shift, [memoryview(data)], len(data), durable)
    except BackendError as e:
        raise _write_error(e) from e


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    if a == b:
        return None
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def _miscompare(offset: int) -> CommandError:
    # SBC-4 5.3 / 5.35: INFORMATION holds the offset of the first byte that did not match.
    return CommandError(
        SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION, information=offset
    )


def read_capacity_10(dev: BlockDevice, request: Request) -> Response:
    """READ CAPACITY(10) (SBC-4 5.20): 0xFFFFFFFF when the capacity needs READ CAPACITY(16)."""
    cdb = request.cdb
    if not cdb[8] & 0x01 and any(cdb[2:6]):  # LBA without PMI (SBC-3 5.16)
        raise invalid_field_in_cdb(2)
    last = max(dev.nblocks - 1, 0)
    data = _READ_CAPACITY_10.pack(min(last, 0xFFFFFFFF), dev.block_size)
    return send_data(request, data, len(data))


def read_capacity_16(dev: BlockDevice, request: Request) -> Response:
    """READ CAPACITY(16) (SBC-4 5.21): LBPPBE from the physical block size, LBPME/LBPRZ."""
    cdb = request.cdb
    allocation = int.from_bytes(cdb[10:14], "big")
    physical = dev.options.physical_block_size or max(
        dev.backend.allocation_granularity, dev.block_size
    )
    exponent = max((physical // dev.block_size).bit_length() - 1, 0)
    provisioning = 0xC000 if dev.options.thin_provisioning else 0  # LBPME, LBPRZ
    data = _READ_CAPACITY_16.pack(
        max(dev.nblocks - 1, 0), dev.block_size, 0, exponent & 0x0F, provisioning
    )
    return send_data(request, data, allocation)


def _check_transfer_length(dev: BlockDevice, request: Request, c: BlockCdb) -> None:
    """INVALID FIELD IN CDB when the length exceeds MAXIMUM TRANSFER LENGTH (SBC-4 6.6.4):
    what keeps one command to a bounded amount of work on the caller's thread."""
    if c.length > dev.options.max_transfer_blocks:
        raise invalid_field_in_cdb(_LENGTH_BYTE.get(len(request.cdb), 7))


def _verify(dev: BlockDevice, request: Request) -> Response:
    """VERIFY(10/12/16) (SBC-4 5.35): BYTCHK 00b medium only, 01b compare, 11b one block.

    The medium is read a chunk at a time: a BYTCHK 11b compare sends one block for a range
    as long as MAXIMUM TRANSFER LENGTH, which must not become one buffer that size.
    """
    c = decode_block_cdb(request.cdb)
    _protect_check(c)
    if c.bytchk == 0b10:
        raise invalid_field_in_cdb(1, 2)
    _check_transfer_length(dev, request, c)
    dev.check_range(c.lba, c.length)
    if c.bytchk == 0 or c.length == 0:
        return GOOD
    block = dev.block_size
    expected_len = block if c.bytchk == 0b11 else c.length * block
    dev.require_data_out(request, expected_len)
    expected = receive_parameters(request, expected_len)
    per_chunk = max(_VERIFY_CHUNK // block, 1)
    if c.bytchk == 0b11:
        expected = expected * min(per_chunk, c.length)
    done = 0
    while done < c.length:
        n = min(per_chunk, c.length - done)
        medium = _read_blocks(dev, c.lba + done, n)
        at = done * block
        want = expected[: n * block] if c.bytchk == 0b11 else expected[at : at + n * block]
        diff = _first_difference(want, medium)
        if diff is not None:
            raise _miscompare(at + diff)
        done += n
    return data_out_residual(request)


def _write_and_verify(dev: BlockDevice, request: Request) -> Response:
    """WRITE AND VERIFY(10/12/16) (SBC-4 5.43): the written data is what the medium holds."""
    c = decode_block_cdb(request.cdb)
    _protect_check(c)
    if c.bytchk & 0b10:
        raise invalid_field_in_cdb(1, 2)
    return dev.write(request, c.lba, c.length, True)


def _synchronize_cache(dev: BlockDevice, request: Request) -> Response:
    """SYNCHRONIZE CACHE(10/16) (SBC-4 5.28): NUMBER OF LOGICAL BLOCKS 0 means to the end."""
    c = decode_block_cdb(request.cdb)
    dev.check_range(c.lba, c.length)
    try:
        dev.backend.flush()
    except BackendError as e:
        raise CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from e
    return GOOD


def _pre_fetch(dev: BlockDevice, request: Request) -> Response:
    """PRE-FETCH(10/16) (SBC-4 5.9): nothing to stage for a file; GOOD after the range check."""
    c = decode_block_cdb(request.cdb)
    dev.check_range(c.lba, c.length)
    return GOOD


def _write_same_pattern(dev: BlockDevice, request: Request) -> bytes:
    """The one logical block a WRITE SAME writes, from a Data-Out buffer of exactly that size.

    SBC-4 WRITE SAME(10)/(16): the Data-Out Buffer holds a single logical block. The CDB has
    no transfer length, so the buffer's size is the only statement of what the client sent;
    any other size (shorter, or longer: data the command could not place) is a mismatch
    between the command and its information unit, answered like a short buffer elsewhere:
    ILLEGAL REQUEST, INVALID FIELD IN COMMAND INFORMATION UNIT, nothing written.
    """
    reader = request.data_out
    if reader is None or reader.remaining() != dev.block_size:
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
    return reader.read(dev.block_size)


def _write_same(dev: BlockDevice, request: Request, complete: Completion) -> Response | None:
    """WRITE SAME(10/16) (SBC-4 5.44) with UNMAP and NDOB.

    Zeros (the back-end's write_zeroes: a hole or a zeroed range) and small patterns are
    written inline; a non-zero pattern of `BACKGROUND_THRESHOLD` bytes or more (up to
    MAXIMUM WRITE SAME LENGTH: 2 GiB) is written by a worker thread.
    """
    c = decode_block_cdb(request.cdb)
    sixteen = c.opcode == Opcode.WRITE_SAME_16
    length_byte = 10 if sixteen else 7
    _protect_check(c)
    # A write-protected LU refuses every medium write (SBC-4 write protection), whichever
    # way it would change the medium: before the UNMAP and ANCHOR checks, so WRITE SAME with
    # UNMAP on a read-only LU is DATA PROTECT whether or not the LU could unmap.
    dev.check_writable()
    if c.anchor:  # ANC_SUP is 0
        raise invalid_field_in_cdb(1, 4)
    if c.unmap and not dev.options.thin_provisioning:
        raise invalid_field_in_cdb(1, 3)
    if c.length == 0:  # WSNZ is 1 in the Block Limits page
        raise invalid_field_in_cdb(length_byte)
    if c.length > dev.options.max_write_same_blocks:
        raise invalid_field_in_cdb(length_byte)
    dev.check_range(c.lba, c.length)
    block = dev.block_size
    pattern = bytes(block) if c.ndob else _write_same_pattern(dev, request)
    offset, total = c.lba << dev.shift, c.length << dev.shift
    good = data_out_residual(request)
    if not any(pattern):
        try:
            dev.backend.write_zeroes(offset, total, may_discard=c.unmap)
            if dev.durable:
                dev.backend.flush()
        except BackendError as e:
            raise _write_error(e) from e
        return good
    # A non-zero pattern cannot be unmapped (LBPRZ=1 reads zeros): write it.
    chunk_blocks = max(min(c.length, _PATTERN_CHUNK // block), 1)
    chunk = memoryview(pattern * chunk_blocks)
    durable = dev.durable

    def work() -> None:
        at, left = offset, total
        try:
            while left:
                n = min(left, len(chunk))
                dev.backend.write(at, [chunk[:n]], n, durable)
                at += n
                left -= n
        except BackendError as e:
            raise _write_error(e) from e

    if total < BACKGROUND_THRESHOLD:
        work()
        return good
    return dev.run_in_background(request, complete, work, good, name="write-same")


def unmap(dev: BlockDevice, request: Request, complete: Completion) -> Response | None:
    """UNMAP (SBC-4 5.32): validate every descriptor, then punch the holes.

    A back-end that cannot punch holes writes zeros instead: from `BACKGROUND_THRESHOLD`
    bytes on (up to 256 descriptors of 4 GiB each) that runs on a worker thread.
    """
    cdb = request.cdb
    dev.check_writable()  # DATA PROTECT first, as for WRITE SAME with UNMAP
    if cdb[1] & 0x01:  # ANCHOR without ANC_SUP
        raise invalid_field_in_cdb(1, 0)
    length = int.from_bytes(cdb[7:9], "big")
    if length == 0:
        return GOOD
    if length < 8:
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    params = receive_parameters(request, length)
    _, descriptor_bytes = _UNMAP_HEADER.unpack_from(params)
    # A trailing partial descriptor is ignored (SBC-4 5.32.2).
    count = min(descriptor_bytes, length - 8) // 16
    if count > dev.options.max_unmap_descriptors:
        raise invalid_field_in_parameter_list(2)
    ranges = [_UNMAP_DESCRIPTOR.unpack_from(params, 8 + 16 * i) for i in range(count)]
    total = 0
    for i, (lba, n) in enumerate(ranges):
        if lba + n > dev.nblocks:
            raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
        if n > dev.options.max_unmap_lba_count:
            raise invalid_field_in_parameter_list(8 + 16 * i + 8)
        total += n
    good = data_out_residual(request)
    shift, durable = dev.shift, dev.durable

    def work() -> None:
        try:
            for lba, n in ranges:
                if n:
                    dev.backend.discard(lba << shift, n << shift)
            if durable and total:
                dev.backend.flush()
        except BackendError as e:
            raise CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from e

    if dev.backend.supports_discard or total << shift < BACKGROUND_THRESHOLD:
        work()
        return good
    return dev.run_in_background(request, complete, work, good, name="unmap")


def compare_and_write(dev: BlockDevice, request: Request) -> Response:
    """COMPARE AND WRITE (SBC-4 5.3): verify NUMBER OF LOGICAL BLOCKS, then write them.

    Atomic with respect to other commands because every command of this LU runs on the
    caller's thread (pool reads never write) and `BlockDevice` runs it only once no
    submitted request or worker-thread write of this LU is in flight.
    """
    c = decode_block_cdb(request.cdb)
    _protect_check(c)
    if c.length > dev.options.max_compare_and_write_blocks:
        raise invalid_field_in_cdb(13)
    dev.check_writable()
    dev.check_range(c.lba, c.length)
    if c.length == 0:
        return GOOD
    half = c.length << dev.shift
    dev.require_data_out(request, 2 * half)
    data = receive_parameters(request, 2 * half)
    medium = _read_blocks(dev, c.lba, c.length)
    diff = _first_difference(data[:half], medium)
    if diff is not None:
        raise _miscompare(diff)
    _write_blocks(dev, c.lba, data[half:], c.fua or dev.durable)
    return data_out_residual(request)


def orwrite_16(dev: BlockDevice, request: Request) -> Response:
    """ORWRITE(16) (SBC-4 5.8): the medium becomes medium OR data-out."""
    c = decode_block_cdb(request.cdb)
    _protect_check(c)
    _check_transfer_length(dev, request, c)
    dev.check_writable()
    dev.check_range(c.lba, c.length)
    if c.length == 0:
        return GOOD
    length = c.length << dev.shift
    dev.require_data_out(request, length)
    data = receive_parameters(request, length)
    medium = _read_blocks(dev, c.lba, c.length)
    combined = (int.from_bytes(medium, "big") | int.from_bytes(data, "big")).to_bytes(length, "big")
    _write_blocks(dev, c.lba, combined, c.fua or dev.durable)
    return data_out_residual(request)


def get_lba_status(dev: BlockDevice, request: Request) -> Response:
    """GET LBA STATUS (SBC-4 5.6): mapped/deallocated extents from SEEK_DATA/SEEK_HOLE."""
    cdb = request.cdb
    lba = int.from_bytes(cdb[2:10], "big")
    allocation = int.from_bytes(cdb[10:14], "big")
    if lba >= dev.nblocks:
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
    limit = max(min((allocation - 8) // 16, _MAX_LBA_STATUS_DESCRIPTORS), 1)
    extents: list[list[int]] = []  # [lba, blocks, status]
    cur = lba
    block = dev.block_size
    while cur < dev.nblocks and len(extents) <= limit:
        if dev.options.thin_provisioning:
            try:
                mapped, length = dev.backend.allocation(cur << dev.shift)
            except BackendError as e:
                raise CommandError(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR) from e
        else:
            mapped, length = True, (dev.nblocks - cur) << dev.shift
        # A block with any data in it is mapped: round data up and holes down to blocks.
        blocks = -(-length // block) if mapped else length // block
        if blocks == 0:
            mapped, blocks = True, 1
        blocks = min(blocks, dev.nblocks - cur)
        status = 0 if mapped else 1
        if extents and extents[-1][2] == status:
            extents[-1][1] += blocks
        else:
            extents.append([cur, blocks, status])
        cur += blocks
    extents = extents[:limit]
    body = b"".join(
        _LBA_STATUS_DESCRIPTOR.pack(start, min(n, 0xFFFFFFFF), status)
        for start, n, status in extents
    )
    data = _LBA_STATUS_HEADER.pack(len(body) + 4) + body
    return send_data(request, data, allocation)


CommandFunction = Callable[["BlockDevice", Request], Response]

SBC_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.READ_CAPACITY_10, None): read_capacity_10,
    (Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16): read_capacity_16,
    (Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS): get_lba_status,
    (Opcode.VERIFY_10, None): _verify,
    (Opcode.VERIFY_12, None): _verify,
    (Opcode.VERIFY_16, None): _verify,
    (Opcode.WRITE_AND_VERIFY_10, None): _write_and_verify,
    (Opcode.WRITE_AND_VERIFY_12, None): _write_and_verify,
    (Opcode.WRITE_AND_VERIFY_16, None): _write_and_verify,
    (Opcode.SYNCHRONIZE_CACHE_10, None): _synchronize_cache,
    (Opcode.SYNCHRONIZE_CACHE_16, None): _synchronize_cache,
    (Opcode.PRE_FETCH_10, None): _pre_fetch,
    (Opcode.PRE_FETCH_16, None): _pre_fetch,
    (Opcode.COMPARE_AND_WRITE, None): compare_and_write,
    (Opcode.ORWRITE_16, None): orwrite_16,
}

WorkerCommand = Callable[["BlockDevice", Request, Completion], "Response | None"]

#: The commands that may complete later: `BlockDevice` passes them ``complete``.
SBC_WORKER_COMMANDS: dict[tuple[int, int | None], WorkerCommand] = {
    (Opcode.WRITE_SAME_10, None): _write_same,
    (Opcode.WRITE_SAME_16, None): _write_same,
    (Opcode.UNMAP, None): unmap,
}
