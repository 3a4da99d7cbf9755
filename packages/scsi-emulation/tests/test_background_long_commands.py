"""Long commands run on a worker thread: a WRITE SAME with a non-zero pattern of 1 MiB or more,
UNMAP written as zeros, a large EXTENDED COPY. ``execute`` returns None and ``complete`` is
called exactly once (GOOD or the error's sense); the checks that refuse a command still answer
inline; small and zero-pattern cases stay inline; COMPARE AND WRITE waits for the worker."""

from __future__ import annotations

import errno
import pathlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_core.target import BytesReader, BytesWriter, Request, Response
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.backend import BackendError, Buffers
from scsi_emulation.command_builders import assert_check, ready
from scsi_emulation.testing import run_command

BLOCKS = 16384  # 8 MiB per LU
WAIT = 10.0
LARGE = 4096  # blocks: 2 MiB, over the 1 MiB threshold
SMALL = 8  # blocks: 4 KiB


class GatedBackend(FileBackend):
    """A FileBackend whose writes wait for ``release`` while ``gated``; ``fail`` makes the
    released write raise EIO. ``discards`` says whether holes can be punched."""

    def __init__(self, path: pathlib.Path, discards: bool = True) -> None:
        super().__init__(path)
        self.gated = False
        self.fail = False
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.discards = discards
        self.threads: set[str] = set()

    @property
    def supports_discard(self) -> bool:
        return self.discards and super().supports_discard

    def discard(self, offset: int, length: int) -> None:
        if self.discards:
            super().discard(offset, length)
        else:  # zeros written, as a back-end that cannot punch holes does
            zeros = memoryview(bytes(1 << 20))
            while length:
                n = min(length, len(zeros))
                self.write(offset, [zeros[:n]], n)
                offset += n
                length -= n

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        self.threads.add(threading.current_thread().name)
        if self.gated:
            self.blocked.set()
            assert self.release.wait(WAIT)
            if self.fail:
                raise BackendError(errno.EIO, "injected failure")
        super().write(offset, buffers, length, durable)


@dataclass
class Pending:
    """One command's deliveries: the inline response, and every ``complete`` call."""

    inline: Response | None
    late: list[Response] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def response(self) -> Response:
        if self.inline is not None:
            return self.inline
        assert self.done.wait(WAIT)
        return self.late[0]


def start(
    target: EmulatedTarget, cdb: bytes, data_out: bytes | None = None, lun: int = 0
) -> Pending:
    reader = BytesReader(data_out) if data_out is not None else None
    late: list[Response] = []
    done = threading.Event()

    def complete(response: Response) -> None:
        late.append(response)
        done.set()

    request = Request(lun=lun, cdb=cdb, data_out=reader, data_in=None, nexus=0)
    inline = target.execute(request, complete)
    return Pending(inline, late, done)


def write_same16(lba: int, blocks: int, unmap: bool = False, ndob: bool = False) -> bytes:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return bytes((0x93, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def unmap_cdb(ranges: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    body = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    params = (len(body) + 6).to_bytes(2, "big") + len(body).to_bytes(2, "big") + bytes(4) + body
    return b"\x42\0" + bytes(5) + len(params).to_bytes(2, "big") + b"\0", params


def read_blocks(target: EmulatedTarget, lba: int, blocks: int, lun: int = 0) -> bytes:
    cdb = b"\x88\0" + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"
    writer = BytesWriter(blocks * 512)
    request = Request(lun=lun, cdb=cdb, data_out=None, data_in=writer, nexus=0)
    response = target.execute(request, lambda r: None)
    assert response is not None and response.status == Status.GOOD
    return writer.getvalue()


def sense_of(response: Response) -> tuple[int, int, int]:
    assert response.status == Status.CHECK_CONDITION
    s = parse_sense(response.sense)
    return s.key, s.asc, s.ascq


MakeTarget = Callable[..., tuple[EmulatedTarget, list[GatedBackend]]]


@pytest.fixture
def make_target(tmp_path: pathlib.Path) -> Iterator[MakeTarget]:
    made: list[EmulatedTarget] = []

    def make(
        discards: bool = True, luns: int = 1, **options: object
    ) -> tuple[EmulatedTarget, list[GatedBackend]]:
        backends = []
        devices = {}
        for lun in range(luns):
            path = tmp_path / f"lu{lun}.img"
            path.write_bytes(b"\xaa" * BLOCKS * 512)
            backend = GatedBackend(path, discards)
            backends.append(backend)
            devices[lun] = BlockDevice(backend, BlockDeviceOptions(**options))  # type: ignore[arg-type]
        target = EmulatedTarget(devices)
        for lun in range(luns):
            ready(target, 0, lun=lun)
        made.append(target)
        return target, backends

    yield make
    for target in made:
        target.close()


def test_large_write_same_completes_once_on_a_worker(make_target: MakeTarget) -> None:
    target, (backend,) = make_target()
    backend.gated = True
    pattern = bytes(range(256)) * 2
    pending = start(target, write_same16(16, LARGE), pattern)
    assert pending.inline is None  # returned while the back-end still blocks
    assert backend.blocked.wait(WAIT)
    assert not pending.done.is_set()
    backend.gated = False
    backend.release.set()
    assert pending.done.wait(WAIT)
    assert pending.late[0].status == Status.GOOD
    assert pending.late[0].residual == 0
    assert read_blocks(target, 16, LARGE) == pattern * LARGE
    assert read_blocks(target, 15, 1) == b"\xaa" * 512  # nothing outside the range
    assert read_blocks(target, 16 + LARGE, 1) == b"\xaa" * 512
    assert any(name.startswith("write-same") for name in backend.threads)
    assert len(pending.late) == 1


def test_write_same_error_completes_with_medium_error(make_target: MakeTarget) -> None:
    target, (backend,) = make_target()
    backend.gated = True
    backend.fail = True
    pending = start(target, write_same16(0, LARGE), b"\x01" * 512)
    assert pending.inline is None
    backend.release.set()
    assert pending.done.wait(WAIT)
    assert sense_of(pending.late[0]) == (
        SenseKey.MEDIUM_ERROR,
        Asc.WRITE_ERROR.asc,
        Asc.WRITE_ERROR.ascq,
    )
    assert len(pending.late) == 1
    backend.gated = backend.fail = False
    # The LU is idle again: COMPARE AND WRITE does not wait.
    cdb = b"\x89\0" + bytes(8) + bytes(3) + b"\x01\0\0"
    assert run_command(target, cdb, data_out=b"\xaa" * 512 + b"\x55" * 512).status == Status.GOOD


def test_small_and_zero_write_same_stay_inline(make_target: MakeTarget) -> None:
    target, (backend,) = make_target()
    small = start(target, write_same16(0, SMALL), b"\x07" * 512)
    assert small.inline is not None and small.inline.status == Status.GOOD
    assert read_blocks(target, 0, SMALL) == b"\x07" * 512 * SMALL
    zeros = start(target, write_same16(0, BLOCKS), bytes(512))
    assert zeros.inline is not None and zeros.inline.status == Status.GOOD
    ndob = start(target, write_same16(0, LARGE, ndob=True))
    assert ndob.inline is not None and ndob.inline.status == Status.GOOD
    assert read_blocks(target, 0, SMALL) == bytes(512 * SMALL)
    assert not backend.threads - {threading.current_thread().name}
    assert not small.late and not zeros.late and not ndob.late


def test_refusals_answer_inline_before_any_work(make_target: MakeTarget) -> None:
    target, (backend,) = make_target(read_only=True)
    refused = start(target, write_same16(0, LARGE), b"\x01" * 512)
    assert refused.inline is not None
    assert sense_of(refused.inline) == (
        SenseKey.DATA_PROTECT,
        Asc.WRITE_PROTECTED.asc,
        Asc.WRITE_PROTECTED.ascq,
    )
    out_of_range = start(target, write_same16(BLOCKS - 1, LARGE), b"\x01" * 512)
    assert out_of_range.inline is not None
    assert out_of_range.inline.status == Status.CHECK_CONDITION
    assert not backend.threads


def test_unit_attention_comes_before_the_work(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ua.img"
    path.write_bytes(bytes(BLOCKS * 512))
    backend = GatedBackend(path)
    target = EmulatedTarget({0: BlockDevice(backend, BlockDeviceOptions())})
    try:
        first = start(target, write_same16(0, LARGE), b"\x01" * 512)
        assert first.inline is not None
        assert sense_of(first.inline)[0] == SenseKey.UNIT_ATTENTION
        assert not backend.threads
    finally:
        target.close()


def test_compare_and_write_waits_for_the_worker(make_target: MakeTarget) -> None:
    target, (backend,) = make_target()
    backend.gated = True
    pending = start(target, write_same16(0, LARGE), b"\x33" * 512)
    assert pending.inline is None
    assert backend.blocked.wait(WAIT)
    # COMPARE AND WRITE expects what the WRITE SAME writes: it matches only if it ran after.
    cdb = b"\x89\0" + bytes(8) + bytes(3) + b"\x01\0\0"
    result: list[int] = []
    caw = threading.Thread(
        target=lambda: result.append(
            run_command(target, cdb, data_out=b"\x33" * 512 + b"\x44" * 512).status
        )
    )
    caw.start()
    caw.join(0.3)
    assert caw.is_alive() and not result  # still waiting for the worker
    backend.gated = False
    backend.release.set()
    caw.join(WAIT)
    assert result == [Status.GOOD]
    assert pending.done.wait(WAIT) and pending.late[0].status == Status.GOOD
    assert read_blocks(target, 0, 2) == b"\x44" * 512 + b"\x33" * 512


def test_unmap_written_as_zeros_runs_on_a_worker(make_target: MakeTarget) -> None:
    target, (backend,) = make_target(discards=False, thin_provisioning=True)
    backend.gated = True
    cdb, params = unmap_cdb([(0, LARGE), (LARGE * 2, 1)])
    pending = start(target, cdb, params)
    assert pending.inline is None
    backend.gated = False
    backend.release.set()
    assert pending.done.wait(WAIT)
    assert pending.late[0].status == Status.GOOD
    assert read_blocks(target, 0, LARGE) == bytes(LARGE * 512)
    assert read_blocks(target, LARGE * 2, 2) == bytes(512) + b"\xaa" * 512
    assert len(pending.late) == 1


def test_unmap_punching_holes_or_small_stays_inline(make_target: MakeTarget) -> None:
    target, _ = make_target(thin_provisioning=True)
    cdb, params = unmap_cdb([(0, BLOCKS)])
    punched = start(target, cdb, params)
    assert punched.inline is not None and punched.inline.status == Status.GOOD
    target2, _ = make_target(discards=False, thin_provisioning=True)
    cdb, params = unmap_cdb([(0, SMALL)])
    small = start(target2, cdb, params)
    assert small.inline is not None and small.inline.status == Status.GOOD
    assert read_blocks(target2, 0, SMALL) == bytes(SMALL * 512)


def test_failing_zero_writes_complete_with_medium_error(make_target: MakeTarget) -> None:
    target, (backend,) = make_target(discards=False, thin_provisioning=True)
    backend.gated = backend.fail = True
    backend.release.set()
    cdb, params = unmap_cdb([(0, LARGE)])
    response = start(target, cdb, params).response()
    assert sense_of(response) == (SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR.asc, Asc.WRITE_ERROR.ascq)


def _naa(target: EmulatedTarget, lun: int) -> bytes:
    d = run_command(target, b"\x12\x01\x83\0\xff\0", data_in=255, lun=lun).data
    return d[8 : 8 + d[7]]


def _xcopy(target: EmulatedTarget, blocks: int) -> tuple[bytes, bytes]:
    targets = b""
    for lun in (0, 1):
        designator = _naa(target, lun)
        head = bytes((0xE4, 0, 0, 0, 0x01, 0x03, 0, len(designator)))
        targets += (head + designator).ljust(28, b"\0") + b"\0" + (512).to_bytes(3, "big")
    segment = (
        bytes((0x02, 0, 0, 0x18, 0, 0, 0, 1, 0, 0))
        + blocks.to_bytes(2, "big")
        + (0).to_bytes(8, "big")
        + (100).to_bytes(8, "big")
    )
    params = (
        bytes((1, 0))
        + len(targets).to_bytes(2, "big")
        + bytes(4)
        + len(segment).to_bytes(4, "big")
        + bytes(4)
        + targets
        + segment
    )
    return b"\x83\0" + bytes(8) + len(params).to_bytes(4, "big") + b"\0\0", params


def test_large_extended_copy_runs_on_a_worker(make_target: MakeTarget) -> None:
    target, (_, destination) = make_target(luns=2)
    run_command(target, write_same16(0, LARGE), data_out=b"\x5a" * 512)
    destination.gated = True
    cdb, params = _xcopy(target, LARGE)
    pending = start(target, cdb, params)
    assert pending.inline is None
    assert destination.blocked.wait(WAIT)
    # The destination LU counts the copy in flight: its COMPARE AND WRITE waits too.
    cdb_caw = b"\x89\0" + (100).to_bytes(8, "big") + bytes(3) + b"\x01\0\0"
    result: list[int] = []
    caw = threading.Thread(
        target=lambda: result.append(
            run_command(target, cdb_caw, data_out=b"\x5a" * 512 + b"\x11" * 512, lun=1).status
        )
    )
    caw.start()
    caw.join(0.3)
    assert caw.is_alive()
    destination.gated = False
    destination.release.set()
    caw.join(WAIT)
    assert result == [Status.GOOD]
    assert pending.done.wait(WAIT) and pending.late[0].status == Status.GOOD
    assert read_blocks(target, 101, LARGE - 1, lun=1) == b"\x5a" * 512 * (LARGE - 1)
    assert len(pending.late) == 1


def test_small_extended_copy_stays_inline(make_target: MakeTarget) -> None:
    target, _ = make_target(luns=2)
    cdb, params = _xcopy(target, SMALL)
    pending = start(target, cdb, params)
    assert pending.inline is not None and pending.inline.status == Status.GOOD
    assert read_blocks(target, 100, SMALL, lun=1) == b"\xaa" * 512 * SMALL


def test_extended_copy_to_write_protected_lu_refused_inline(tmp_path: pathlib.Path) -> None:
    devices = {}
    for lun in (0, 1):
        path = tmp_path / f"wp{lun}.img"
        path.write_bytes(bytes(BLOCKS * 512))
        devices[lun] = BlockDevice(GatedBackend(path), BlockDeviceOptions(read_only=lun == 1))
    target = EmulatedTarget(devices)
    try:
        for lun in (0, 1):
            ready(target, 0, lun=lun)
        cdb, params = _xcopy(target, LARGE)
        pending = start(target, cdb, params)
        assert pending.inline is not None
        assert_check(
            run_command(target, cdb, data_out=params), SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED
        )
    finally:
        target.close()


def test_work_that_ends_first_is_delivered_once(make_target: MakeTarget) -> None:
    """Whether the worker finishes before execute returns or after, exactly one delivery."""
    target, _ = make_target()
    for i in range(20):
        pending = start(target, write_same16(0, LARGE), bytes((i + 1,)) * 512)
        if pending.inline is None:
            assert pending.done.wait(WAIT)
            assert len(pending.late) == 1
        else:
            assert not pending.done.wait(0.05)
        assert pending.response().status == Status.GOOD
