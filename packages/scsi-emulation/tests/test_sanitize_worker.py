"""SANITIZE runs on a worker thread: IMMED=0 returns None from execute and completes once
later; meanwhile every other command (but INQUIRY, REPORT LUNS, REQUEST SENSE) gets NOT
READY, SANITIZE IN PROGRESS, and REQUEST SENSE reports the progress (SBC-4 4.11, 5.30.1)."""

from __future__ import annotations

import errno
import pathlib
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_core.target import BytesReader, Request, Response
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.backend import BackendError, Buffers
from scsi_emulation.command_builders import A, B, assert_check, read10, ready
from scsi_emulation.sanitize import SanitizeProgress
from scsi_emulation.testing import CommandResult, run_command

OVERWRITE, BLOCK_ERASE = 0x01, 0x02
CHUNK = 1 << 20  # the overwrite's bytes per back-end write
BLOCKS = 4 * CHUNK // 512  # four overwrite chunks
WAIT = 10.0


def sanitize(sa: int, length: int = 0, immed: bool = False) -> bytes:
    return bytes((0x48, (0x80 if immed else 0) | sa)) + bytes(5) + length.to_bytes(2, "big") + b"\0"


def overwrite_params(pattern: bytes) -> bytes:
    return bytes((1, 0)) + len(pattern).to_bytes(2, "big") + pattern


class BlockingBackend(FileBackend):
    """A FileBackend whose second overwrite write and every discard wait until released,
    so a sanitize stays in progress (with 1/4 of an overwrite done) for as long as a test
    wants; ``fail`` makes the released call raise instead."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.fail = False
        self.writes = 0

    def _gate(self) -> None:
        self.blocked.set()
        assert self.release.wait(WAIT)
        if self.fail:
            raise BackendError(errno.EIO, "injected failure")

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        self.writes += 1
        if self.writes == 2:
            self._gate()
        super().write(offset, buffers, length, durable)

    def discard(self, offset: int, length: int) -> None:
        self._gate()
        super().discard(offset, length)


Disk = tuple[EmulatedTarget, BlockingBackend]


@pytest.fixture
def blocking(tmp_path: pathlib.Path) -> Iterator[Disk]:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.write(b"a" * BLOCKS * 512)
    backend = BlockingBackend(path)
    target = EmulatedTarget({0: BlockDevice(backend, BlockDeviceOptions())})
    ready(target, A, B)
    # B takes the hot path (fast list) before the sanitize starts.
    assert run_command(target, read10(), data_in=512, nexus=B).status == Status.GOOD
    try:
        yield target, backend
    finally:
        backend.release.set()
        target.close()


class Completions:
    """A ``complete`` callback that records every call."""

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.called = threading.Event()

    def __call__(self, response: Response) -> None:
        self.responses.append(response)
        self.called.set()


def start(
    target: EmulatedTarget, cdb: bytes, data_out: bytes | None
) -> tuple[Response | None, Completions]:
    done = Completions()
    reader = BytesReader(data_out) if data_out is not None else None
    request = Request(lun=0, cdb=cdb, data_out=reader, nexus=A)
    return target.execute(request, done), done


def assert_sanitizing(r: CommandResult) -> None:
    assert_check(r, SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)


def assert_refused_meanwhile(target: EmulatedTarget) -> None:
    for nexus in (A, B):  # B was on the fast path
        assert_sanitizing(run_command(target, read10(), data_in=512, nexus=nexus))
        assert_sanitizing(run_command(target, bytes(6), nexus=nexus))
    params = overwrite_params(b"\x55")
    r = run_command(target, sanitize(OVERWRITE, len(params)), data_out=params, nexus=B)
    assert_sanitizing(r)  # a second sanitize too
    assert run_command(target, b"\x12\0\0\0\xff\0", data_in=255).status == Status.GOOD
    luns = b"\xa0" + bytes(5) + (64).to_bytes(4, "big") + b"\0\0"
    assert run_command(target, luns, data_in=64).status == Status.GOOD


def request_sense(target: EmulatedTarget, nexus: object = B) -> bytes:
    r = run_command(target, b"\x03\0\0\0\xff\0", data_in=255, nexus=nexus)
    assert r.status == Status.GOOD
    return r.data


def test_immed0_overwrite_completes_later_exactly_once(blocking: Disk) -> None:
    target, backend = blocking
    params = overwrite_params(b"\x5a\xa5")
    response, done = start(target, sanitize(OVERWRITE, len(params)), params)
    assert response is None  # pending: the caller's thread is free
    assert backend.blocked.wait(WAIT)
    assert not done.called.is_set()
    assert_refused_meanwhile(target)
    # REQUEST SENSE: the state, with PROGRESS INDICATION = 1/4 done (SKSV set).
    sense = request_sense(target)
    assert sense[2] & 0x0F == SenseKey.NOT_READY and sense[12:14] == b"\x04\x1b"
    assert sense[15] & 0x80 and int.from_bytes(sense[16:18], "big") == 0x4000
    # A command refused meanwhile carries the progress too, in descriptor format as well.
    r = run_command(target, bytes(6), nexus=A)
    assert r.sense is not None and r.sense.sks == 0x80_4000
    backend.release.set()
    assert done.called.wait(WAIT)
    assert len(done.responses) == 1 and done.responses[0].status == Status.GOOD
    assert done.responses[0].sense == b""
    # Ready before GOOD was delivered: no polling needed.
    assert run_command(target, bytes(6), nexus=A).status == Status.GOOD
    r = run_command(target, read10(0, 8), data_in=8 * 512, nexus=B)
    assert r.status == Status.GOOD and r.data == b"\x5a\xa5" * (8 * 256)
    sense = request_sense(target)
    assert parse_sense(sense).key == SenseKey.NO_SENSE
    threading.Event().wait(0.05)  # a second call would come from the (ended) worker
    assert len(done.responses) == 1


def test_immed0_failure_completes_with_write_error(blocking: Disk) -> None:
    target, backend = blocking
    backend.fail = True
    response, done = start(target, sanitize(BLOCK_ERASE), None)
    assert response is None
    assert backend.blocked.wait(WAIT)
    assert_sanitizing(run_command(target, bytes(6), nexus=A))
    backend.release.set()
    assert done.called.wait(WAIT)
    assert len(done.responses) == 1
    (failed,) = done.responses
    assert failed.status == Status.CHECK_CONDITION
    sense = parse_sense(failed.sense)
    assert (sense.key, sense.code) == (SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
    assert run_command(target, bytes(6), nexus=A).status == Status.GOOD


def test_immed1_answers_good_at_once_and_never_calls_complete(blocking: Disk) -> None:
    target, backend = blocking
    response, done = start(target, sanitize(BLOCK_ERASE, immed=True), None)
    assert response is not None and response.status == Status.GOOD
    assert backend.blocked.wait(WAIT)
    assert_refused_meanwhile(target)
    sense = request_sense(target, A)
    assert sense[12:14] == b"\x04\x1b" and int.from_bytes(sense[16:18], "big") == 0
    backend.release.set()
    pause = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if run_command(target, bytes(6), nexus=A).status == Status.GOOD:
            break
        pause.wait(0.01)
    else:
        pytest.fail("the LU never became ready")
    r = run_command(target, read10(0, 4), data_in=2048, nexus=B)
    assert r.status == Status.GOOD and r.data == bytes(2048)
    assert not done.responses


def test_unit_attention_first_then_progress(blocking: Disk) -> None:
    """REQUEST SENSE reports (and clears) a pending unit attention before the progress."""
    target, backend = blocking
    response, done = start(target, sanitize(BLOCK_ERASE), None)
    assert response is None and backend.blocked.wait(WAIT)
    c = "iqn.2026-11.test:c,i,0x000000000003"  # a new nexus: power-on unit attention
    assert parse_sense(request_sense(target, c)).key == SenseKey.UNIT_ATTENTION
    assert (
        parse_sense(request_sense(target, c)).code
        == Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS
    )
    backend.release.set()
    assert done.called.wait(WAIT) and done.responses[0].status == Status.GOOD


@given(st.integers(0, 1 << 50), st.integers(0, 1 << 50))
def test_progress_indication_is_a_fraction_of_65536(done: int, extra: int) -> None:
    total = done + extra
    p = SanitizeProgress(total)
    p.done = done
    value = p.indication()
    assert 0 <= value <= 0xFFFF
    if total:
        assert value == min(done * 65536 // total, 0xFFFF)
        assert value <= done * 65536 / total
    else:
        assert value == 0
