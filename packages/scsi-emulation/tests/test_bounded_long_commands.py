"""Commands that could turn into long work on the caller's thread are bounded: VERIFY and
ORWRITE refuse more than MAXIMUM TRANSFER LENGTH (SBC-4 6.6.4), and VERIFY compares the medium
a chunk at a time (a BYTCHK 11b compare over a long range never becomes one big buffer)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.command_builders import assert_check
from scsi_emulation.testing import run_command

BLOCKS = 2048 * 4  # 4 MiB: VERIFY then reads several 1 MiB chunks
MakeTarget = Callable[..., EmulatedTarget]


@pytest.fixture
def make_target(tmp_path: pathlib.Path) -> Iterator[MakeTarget]:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(BLOCKS * 512)
    targets: list[EmulatedTarget] = []

    def make(**options: object) -> EmulatedTarget:
        device = BlockDevice(FileBackend(path), BlockDeviceOptions(**options))  # type: ignore[arg-type]
        target = EmulatedTarget({0: device})
        run_command(target, bytes(6))  # the power-on unit attention
        targets.append(target)
        return target

    yield make
    for t in targets:
        t.close()


def verify16(lba: int, blocks: int, bytchk: int) -> bytes:
    return bytes((0x8F, bytchk << 1)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def write16(lba: int, blocks: int) -> bytes:
    return b"\x8a\0" + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


@pytest.mark.parametrize("bytchk", [0, 1, 3])
def test_verify_beyond_maximum_transfer_length(make_target: MakeTarget, bytchk: int) -> None:
    target = make_target(max_transfer_blocks=128)
    data = bytes(512 if bytchk == 3 else 129 * 512) if bytchk else None
    r = run_command(target, verify16(0, 129, bytchk), data_out=data)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10)
    ok = run_command(target, verify16(0, 128, bytchk), data_out=data and data[: 128 * 512])
    assert ok.status == Status.GOOD


def test_orwrite_beyond_maximum_transfer_length(make_target: MakeTarget) -> None:
    target = make_target(max_transfer_blocks=8)
    cdb = b"\x8b\0" + bytes(8) + (9).to_bytes(4, "big") + b"\0\0"
    r = run_command(target, cdb, data_out=bytes(9 * 512))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10)


def test_verify_one_block_pattern_over_many_chunks(make_target: MakeTarget) -> None:
    target = make_target()
    block = bytes(range(256)) * 2
    n = BLOCKS
    assert run_command(target, write16(0, n), data_out=block * n).status == Status.GOOD
    assert run_command(target, verify16(0, n, 3), data_out=block).status == Status.GOOD
    # One byte differs in the third 1 MiB chunk: INFORMATION is its offset in the range.
    bad_lba = 2 * 2048 + 7
    bad = bytearray(block)
    bad[100] ^= 0xFF
    assert run_command(target, write16(bad_lba, 1), data_out=bytes(bad)).status == Status.GOOD
    r = run_command(target, verify16(0, n, 3), data_out=block)
    assert_check(r, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY_OPERATION)
    assert r.sense is not None and r.sense.information == bad_lba * 512 + 100
    # BYTCHK 01b over the same range: the offset is counted the same way.
    expected = block * n
    r = run_command(target, verify16(0, n, 1), data_out=expected)
    assert r.sense is not None and r.sense.information == bad_lba * 512 + 100
    r = run_command(target, verify16(8, n - 8, 1), data_out=expected[8 * 512 :])
    assert r.sense is not None and r.sense.information == (bad_lba - 8) * 512 + 100
