"""EXTENDED COPY (LID1) between LUs of one target, RECEIVE COPY RESULTS and the Third-party
Copy VPD page."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.command_builders import assert_check, ready
from scsi_emulation.testing import run_command

BLOCKS = 2048
HOLD, DISCARD, DISABLE = 0, 2, 3


@pytest.fixture
def target(tmp_path: pathlib.Path) -> Iterator[EmulatedTarget]:
    luns = {}
    for lun in (0, 1):
        path = tmp_path / f"lu{lun}.img"
        path.write_bytes(b"")
        with path.open("r+b") as f:
            f.truncate(BLOCKS * 512)
        luns[lun] = BlockDevice(FileBackend(path), BlockDeviceOptions())
    t = EmulatedTarget(luns)
    for lun in (0, 1):
        ready(t, 0, lun=lun)
    yield t
    t.close()


def naa(target: EmulatedTarget, lun: int = 0) -> bytes:
    d = run_command(target, b"\x12\x01\x83\0\xff\0", data_in=255, lun=lun).data
    assert d[4:6] == b"\x01\x03"  # binary NAA first
    return d[8 : 8 + d[7]]


def target_descriptor(
    designator: bytes, *, kind: int = 0xE4, lu_id_type: int = 0, nul: int = 0, block: int = 512
) -> bytes:
    head = bytes((kind, (lu_id_type << 6) | (nul << 5), 0, 0, 0x01, 0x03, 0, len(designator)))
    return (head + designator).ljust(28, b"\0") + b"\0" + block.to_bytes(3, "big")


def b2b(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, kind: int = 0x02) -> bytes:
    return (
        bytes((kind, 0))
        + (0x18).to_bytes(2, "big")
        + src.to_bytes(2, "big")
        + dst.to_bytes(2, "big")
        + bytes(2)
        + blocks.to_bytes(2, "big")
        + src_lba.to_bytes(8, "big")
        + dst_lba.to_bytes(8, "big")
    )


def parameter_list(
    targets: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = HOLD
) -> bytes:
    tdl, sdl = sum(map(len, targets)), sum(map(len, segments))
    header = (
        bytes((list_id, usage << 3)) + tdl.to_bytes(2, "big") + bytes(4) + sdl.to_bytes(4, "big")
    )
    return header + bytes(4) + b"".join(targets) + b"".join(segments)


def xcopy(target: EmulatedTarget, params: bytes, length: int | None = None, lun: int = 0):  # type: ignore[no-untyped-def]
    n = len(params) if length is None else length
    cdb = b"\x83\x00" + bytes(8) + n.to_bytes(4, "big") + b"\0\0"
    return run_command(target, cdb, data_out=params, lun=lun)


def receive(target: EmulatedTarget, sa: int, list_id: int = 0, lun: int = 0):  # type: ignore[no-untyped-def]
    cdb = bytes((0x84, sa, list_id)) + bytes(7) + (1024).to_bytes(4, "big") + b"\0\0"
    return run_command(target, cdb, data_in=1024, lun=lun)


def write(target: EmulatedTarget, lba: int, data: bytes, lun: int = 0) -> None:
    cdb = b"\x8a\0" + lba.to_bytes(8, "big") + (len(data) // 512).to_bytes(4, "big") + b"\0\0"
    assert run_command(target, cdb, data_out=data, lun=lun).status == Status.GOOD


def read(target: EmulatedTarget, lba: int, blocks: int, lun: int = 0) -> bytes:
    cdb = b"\x88\0" + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"
    r = run_command(target, cdb, data_in=blocks * 512, lun=lun)
    assert r.status == Status.GOOD
    return r.data


def test_copy_within_one_lu_and_copy_status(target: EmulatedTarget) -> None:
    data = bytes(range(256)) * 2 * 64
    write(target, 0, data)
    params = parameter_list([target_descriptor(naa(target))], [b2b(0, 0, 64, 0, BLOCKS - 64)])
    r = receive(target, 0x00, list_id=1)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)  # nothing known yet
    assert xcopy(target, params).status == Status.GOOD
    assert read(target, BLOCKS - 64, 64) == data
    status = receive(target, 0x00, list_id=1).data
    assert status[:4] == (8).to_bytes(4, "big") and status[4] == 0x01  # completed
    assert int.from_bytes(status[5:7], "big") == 1  # segments processed
    assert status[7] == 0 and int.from_bytes(status[8:12], "big") == 64 * 512  # bytes


def test_copy_between_lus(target: EmulatedTarget) -> None:
    data = b"\x5a" * 512 * 8
    write(target, 10, data, lun=1)
    descriptors = [target_descriptor(naa(target, 0)), target_descriptor(naa(target, 1))]
    params = parameter_list(descriptors, [b2b(1, 0, 8, 10, 100)], usage=DISCARD)
    assert xcopy(target, params, lun=0).status == Status.GOOD
    assert read(target, 100, 8, lun=0) == data
    assert read(target, 100, 8, lun=1) == bytes(8 * 512)


def test_overlapping_copy_moves_like_memmove(target: EmulatedTarget) -> None:
    data = b"".join(bytes((i,)) * 512 for i in range(16))
    write(target, 0, data)
    params = parameter_list([target_descriptor(naa(target))], [b2b(0, 0, 12, 0, 4)])
    assert xcopy(target, params).status == Status.GOOD
    assert read(target, 4, 12) == data[: 12 * 512]


def test_parameter_list_lengths(target: EmulatedTarget) -> None:
    params = parameter_list([target_descriptor(naa(target))], [b2b(0, 0, 8, 0, 100)])
    assert xcopy(target, b"", 0).status == Status.GOOD
    for length in (8, 16 + 31, len(params) - 1):
        r = xcopy(target, params[:length], length)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_descriptor_limits(target: EmulatedTarget) -> None:
    op = receive(target, 0x03).data
    max_targets = int.from_bytes(op[8:10], "big")
    max_segments = int.from_bytes(op[10:12], "big")
    max_list = int.from_bytes(op[12:16], "big")
    assert int.from_bytes(op[:4], "big") == len(op) - 4 and op[43] == len(op) - 44
    assert set(op[44:]) == {0x02, 0xE4}
    td = target_descriptor(naa(target))
    seg = b2b(0, 0, 1, 0, 100)
    r = xcopy(target, parameter_list([td] * (max_targets + 1), [seg]))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x2606)  # TOO MANY TARGET DESCRIPTORS
    r = xcopy(target, parameter_list([td], [seg] * (max_segments + 1)))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x2608)  # TOO MANY SEGMENT DESCRIPTORS
    both = parameter_list([td] * (max_targets + 1), [seg] * (max_segments + 1))
    assert len(both) - 16 > max_list
    assert_check(xcopy(target, both), SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_unsupported_descriptor_types(target: EmulatedTarget) -> None:
    designator = naa(target)
    r = xcopy(
        target, parameter_list([target_descriptor(designator, kind=0xE0)], [b2b(0, 0, 1, 0, 9)])
    )
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x2607)
    r = xcopy(target, parameter_list([target_descriptor(designator)], [b2b(0, 0, 1, 0, 9, kind=3)]))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, 0x2609)


def test_target_descriptor_fields(target: EmulatedTarget) -> None:
    designator = naa(target)
    seg = [b2b(0, 0, 8, 0, 100)]
    # SPC-4 makes the LU ID TYPE bits obsolete: they are ignored.
    r = xcopy(target, parameter_list([target_descriptor(designator, lu_id_type=2)], seg))
    assert r.status == Status.GOOD
    r = xcopy(target, parameter_list([target_descriptor(designator, nul=1)], seg))
    assert_check(r, SenseKey.COPY_ABORTED, 0x0804)  # UNREACHABLE COPY TARGET
    r = xcopy(target, parameter_list([target_descriptor(b"\x30" + bytes(7))], seg))
    assert_check(r, SenseKey.COPY_ABORTED, 0x0804)  # nobody has that name


def test_segment_descriptor_fields(target: EmulatedTarget) -> None:
    td = [target_descriptor(naa(target))]
    r = xcopy(target, parameter_list(td, [b2b(0, 1, 8, 0, 100)]))  # no descriptor 1
    assert_check(r, SenseKey.COPY_ABORTED, 0x0804)
    r = xcopy(target, parameter_list(td, [b2b(0, 0, 2048, 0, BLOCKS - 1)]))  # beyond the end
    assert r.status == Status.CHECK_CONDITION and r.sense is not None
    assert r.sense.key == SenseKey.COPY_ABORTED
    status = receive(target, 0x00, list_id=1).data
    assert status[4] == 0x02  # completed with errors


def test_list_identifier_usage(target: EmulatedTarget) -> None:
    td, seg = [target_descriptor(naa(target))], [b2b(0, 0, 1, 0, 9)]
    r = xcopy(target, parameter_list(td, seg, usage=1))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 1)
    r = xcopy(target, parameter_list(td, seg, list_id=5, usage=DISABLE))
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 0)
    assert xcopy(target, parameter_list(td, seg, list_id=0, usage=DISABLE)).status == 0
    assert receive(target, 0x00, list_id=0).status == Status.CHECK_CONDITION  # not held
    # LID4 and unknown RECEIVE COPY RESULTS service actions are not supported.
    cdb = b"\x83\x01" + bytes(8) + (0).to_bytes(4, "big") + b"\0\0"
    assert_check(run_command(target, cdb), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    assert_check(receive(target, 0x04), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)


def test_copy_to_a_read_only_lu(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(64 * 512))
    t = EmulatedTarget({0: BlockDevice(FileBackend(path), BlockDeviceOptions(read_only=True))})
    ready(t, 0)
    try:
        params = parameter_list([target_descriptor(naa(t))], [b2b(0, 0, 1, 0, 9)])
        assert_check(xcopy(t, params), SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    finally:
        t.close()


def test_another_targets_lu_is_unreachable(target: EmulatedTarget, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "other.img"
    path.write_bytes(bytes(64 * 512))
    other = EmulatedTarget({0: BlockDevice(FileBackend(path), BlockDeviceOptions())})
    ready(other, 0)
    try:
        # LU 1 of `target` is not in `other`, even though both live in this process.
        params = parameter_list(
            [target_descriptor(naa(other)), target_descriptor(naa(target, 1))],
            [b2b(1, 0, 1, 0, 9)],
        )
        assert_check(xcopy(other, params), SenseKey.COPY_ABORTED, 0x0804)
    finally:
        other.close()


def test_third_party_copy_vpd_page(target: EmulatedTarget) -> None:
    standard = run_command(target, b"\x12\0\0\0\xff\0", data_in=255).data
    assert standard[5] & 0x08  # 3PC
    pages = run_command(target, b"\x12\x01\x00\0\xff\0", data_in=255).data
    assert 0x8F in pages[4 : 4 + pages[3]]
    page = run_command(target, b"\x12\x01\x8f\x04\x00\0", data_in=1024).data
    assert page[1] == 0x8F and int.from_bytes(page[2:4], "big") == len(page) - 4
    descriptors = {}
    pos = 4
    while pos < len(page):
        kind = int.from_bytes(page[pos : pos + 2], "big")
        length = int.from_bytes(page[pos + 2 : pos + 4], "big")
        assert (length + 4) % 4 == 0
        descriptors[kind] = page[pos + 4 : pos + 4 + length]
        pos += 4 + length
    assert {0x0001, 0x0004, 0x0008, 0x8001} <= set(descriptors)
    supported = descriptors[0x0001]
    commands = {}
    i = 1
    while i < 1 + supported[0]:
        op, n = supported[i], supported[i + 1]
        commands[op] = set(supported[i + 2 : i + 2 + n])
        i += 2 + n
    assert commands == {0x83: {0x00}, 0x84: {0x00, 0x03}}
