"""SANITIZE: OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE, field checks, IMMED with the
NOT READY, SANITIZE IN PROGRESS rule, write protection and reservations."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Callable

import pytest
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.command_builders import A, B, assert_check, read10, ready, write10
from scsi_emulation.testing import run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]

OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE = 0x01, 0x02, 0x03, 0x1F
BLOCKS = 2048


def sanitize(sa: int, length: int = 0, immed: bool = False) -> bytes:
    return (
        bytes((0x48, (0x80 if immed else 0) | sa, 0, 0, 0, 0, 0))
        + length.to_bytes(2, "big")
        + b"\0"
    )


def overwrite_params(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | count, 0)) + len(pattern).to_bytes(2, "big") + pattern


def read_all(target: EmulatedTarget, nexus: object = 0) -> bytes:
    cdb = b"\x88\0" + (0).to_bytes(8, "big") + BLOCKS.to_bytes(4, "big") + b"\0\0"
    r = run_command(target, cdb, data_in=BLOCKS * 512, nexus=nexus)
    assert r.status == Status.GOOD
    return r.data


def fill(target: EmulatedTarget) -> None:
    cdb = b"\x8a\0" + (0).to_bytes(8, "big") + BLOCKS.to_bytes(4, "big") + b"\0\0"
    assert run_command(target, cdb, data_out=b"a" * BLOCKS * 512).status == Status.GOOD


def test_overwrite_with_full_block_pattern(disk: Disk) -> None:
    target, _ = disk
    fill(target)
    pattern = bytes(range(256)) * 2
    params = overwrite_params(pattern)
    r = run_command(target, sanitize(OVERWRITE, len(params)), data_out=params)
    assert r.status == Status.GOOD
    assert read_all(target) == pattern * BLOCKS


def test_overwrite_repeats_a_short_pattern_and_inverts(disk: Disk) -> None:
    target, _ = disk
    params = overwrite_params(b"\x0f\xf0\x55", count=2, invert=True)
    assert run_command(target, sanitize(OVERWRITE, len(params)), data_out=params).status == 0
    block = (b"\xf0\x0f\xaa" * 171)[:512]  # the second pass wrote the inverted pattern
    assert read_all(target) == block * BLOCKS


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 512 + 5])
def test_overwrite_parameter_list_length(disk: Disk, length: int) -> None:
    target, _ = disk
    r = run_command(target, sanitize(OVERWRITE, length), data_out=bytes(length))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 7)


@pytest.mark.parametrize(
    ("params", "byte"),
    [
        (bytes((0, 0, 2, 0)) + bytes(512), 0),  # OVERWRITE COUNT 0
        (bytes((1, 0, 0, 0)) + bytes(512), 2),  # INITIALIZATION PATTERN LENGTH 0
        (bytes((1, 0, 2, 4)) + bytes(512), 2),  # pattern longer than a block
        (bytes((1, 0, 0, 9)) + bytes(8), 2),  # pattern longer than the list
        (bytes((0x21, 0, 0, 4)) + bytes(4), 0),  # TEST field
    ],
)
def test_overwrite_parameter_errors(disk: Disk, params: bytes, byte: int) -> None:
    target, _ = disk
    r = run_command(target, sanitize(OVERWRITE, len(params)), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, byte)


@pytest.mark.parametrize(("byte", "value"), [(1, 0x41), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)])
def test_reserved_cdb_fields(disk: Disk, byte: int, value: int) -> None:
    target, _ = disk
    params = overwrite_params(b"\xaa" * 512)
    cdb = bytearray(sanitize(OVERWRITE, len(params)))
    cdb[byte] |= value
    r = run_command(target, bytes(cdb), data_out=params)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, byte)


def test_block_erase_deallocates_everything(disk: Disk) -> None:
    target, _ = disk
    fill(target)
    assert run_command(target, sanitize(BLOCK_ERASE)).status == Status.GOOD
    assert read_all(target) == bytes(BLOCKS * 512)
    lba_status = b"\x9e\x12" + bytes(8) + (256).to_bytes(4, "big") + b"\0\0"
    d = run_command(target, lba_status, data_in=256).data
    assert int.from_bytes(d[:4], "big") == 20  # one descriptor
    assert d[8:16] == bytes(8) and int.from_bytes(d[16:20], "big") == BLOCKS and d[20] == 1
    r = run_command(target, sanitize(BLOCK_ERASE, 8), data_out=bytes(8))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 7)


def test_exit_failure_mode(disk: Disk) -> None:
    target, _ = disk
    assert run_command(target, sanitize(EXIT_FAILURE)).status == Status.GOOD
    r = run_command(target, sanitize(EXIT_FAILURE, 8), data_out=bytes(8))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 7)


@pytest.mark.parametrize("sa", [0, CRYPTO_ERASE, 4, 0x10, 0x1E])
def test_unsupported_service_actions(disk: Disk, sa: int) -> None:
    target, _ = disk
    assert_check(
        run_command(target, sanitize(sa)), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1
    )


def _rsoc_sanitize(target: EmulatedTarget) -> set[int]:
    rsoc = b"\xa3\x0c\x00" + bytes(3) + (8192).to_bytes(4, "big") + b"\0\0"
    d = run_command(target, rsoc, data_in=8192).data
    return {
        int.from_bytes(d[i + 2 : i + 4], "big")
        for i in range(4, 4 + int.from_bytes(d[:4], "big"), 8)
        if d[i] == 0x48
    }


def test_block_erase_only_on_thin_lus(make_disk: MakeDisk) -> None:
    target, _ = make_disk()
    assert _rsoc_sanitize(target) == {OVERWRITE, BLOCK_ERASE, EXIT_FAILURE}
    b1 = run_command(target, b"\x12\x01\xb1\0\xff\0", data_in=255).data
    assert b1[7] >> 6 == 1  # WABEREQ 01b
    target, _ = make_disk(thin_provisioning=False)
    assert _rsoc_sanitize(target) == {OVERWRITE, EXIT_FAILURE}
    assert_check(
        run_command(target, sanitize(BLOCK_ERASE)),
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_CDB,
        1,
    )
    b1 = run_command(target, b"\x12\x01\xb1\0\xff\0", data_in=255).data
    assert b1[7] >> 6 == 0


def test_read_only_lu(make_disk: MakeDisk) -> None:
    target, _ = make_disk(read_only=True)
    params = overwrite_params(b"\xaa")
    for cdb, data in ((sanitize(OVERWRITE, len(params)), params), (sanitize(BLOCK_ERASE), None)):
        r = run_command(target, cdb, data_out=data)
        assert_check(r, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def test_reservation_conflict(disk: Disk) -> None:
    target, _ = disk
    ready(target, A, B)
    assert run_command(target, b"\x16" + bytes(5), nexus=B).status == Status.GOOD
    r = run_command(target, sanitize(BLOCK_ERASE), nexus=A)
    assert r.status == Status.RESERVATION_CONFLICT


class GatedBackend(FileBackend):
    """A FileBackend whose discard waits for a gate: an IMMED sanitize stays in progress."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def discard(self, offset: int, length: int) -> None:
        self.gate.wait(10)
        super().discard(offset, length)


def test_immed_sanitize_makes_the_lu_not_ready(image: pathlib.Path) -> None:
    backend = GatedBackend(image)
    target = EmulatedTarget({0: BlockDevice(backend, BlockDeviceOptions())})
    ready(target, A, B)
    try:
        run_command(target, write10(), data_out=b"x" * 512, nexus=A)
        assert run_command(target, read10(), data_in=512, nexus=B).status == Status.GOOD
        assert run_command(target, sanitize(BLOCK_ERASE, immed=True), nexus=A).status == 0
        # Both nexuses (B was on the fast path) now get NOT READY, SANITIZE IN PROGRESS.
        for nexus in (A, B):
            assert_check(
                run_command(target, read10(), data_in=512, nexus=nexus),
                SenseKey.NOT_READY,
                Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
            )
        assert_check(
            run_command(target, bytes(6), nexus=A),
            SenseKey.NOT_READY,
            Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
        )
        assert run_command(target, b"\x12\0\0\0\xff\0", data_in=255).status == Status.GOOD
        sense = run_command(target, b"\x03\0\0\0\xff\0", data_in=255, nexus=B).data
        parsed = parse_sense(sense)
        assert (parsed.key, parsed.code) == (
            SenseKey.NOT_READY,
            Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
        )
        backend.gate.set()
        deadline = time.monotonic() + 10
        while run_command(target, bytes(6), nexus=A).status != Status.GOOD:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = run_command(target, read10(), data_in=512, nexus=B)
        assert r.status == Status.GOOD and r.data == bytes(512)
    finally:
        backend.gate.set()
        target.close()
