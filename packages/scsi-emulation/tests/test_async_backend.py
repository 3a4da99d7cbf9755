"""BlockDevice over an asynchronous back-end: READ/WRITE/WRITE AND VERIFY/SYNCHRONIZE CACHE go
through ``submit_*``; ``execute`` returns None and ``complete`` runs once, from the back-end's
completion, or the response comes back inline when the back-end finished first.

The fake back-end (`FakeAsyncBackend`) keeps its data in memory and completes each request
in one of three ways: inline inside ``submit_*``, held until the test releases it (then from
another thread), or at once from a new thread (racing with ``submit_*`` returning).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_core.cdb import BlockCdb, encode_block_cdb
from scsi_core.opcodes import Opcode
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_core.target import (
    BytesReader,
    BytesWriter,
    Request,
    Response,
    TaskManagementFunction,
    TmfResponse,
)
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget
from scsi_emulation.backend import BackendError, Buffers, Done, StorageBackend
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.testing import run_command

BLOCKS = 256
BLOCK = 512

INLINE = "inline"  # done() runs inside submit_*
HOLD = "hold"  # done() runs when the test calls release(), from another thread
THREAD = "thread"  # done() runs on a new thread, racing with submit_* returning


@dataclass
class Submitted:
    kind: str  # "read", "write", "flush"
    offset: int
    length: int
    durable: bool
    run: Callable[[], None]


class FakeAsyncBackend(StorageBackend):
    """In-memory storage whose ``submit_*`` complete as `mode` says; records every call."""

    def __init__(self, mode: str = INLINE, size: int = BLOCKS * BLOCK) -> None:
        self.data = bytearray(size)
        self.mode = mode
        self.submitted: list[Submitted] = []
        self.held: list[Submitted] = []
        self.fail: BackendError | None = None
        self.blocking_calls = 0
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def asynchronous(self) -> bool:
        return True

    def in_flight(self) -> int:
        with self._lock:
            return len(self.held)

    # -- the asynchronous calls ---------------------------------------------------------

    def _start(self, kind: str, offset: int, length: int, durable: bool, work: Callable[[], None],
               done: Done) -> None:  # fmt: skip
        error = self.fail

        def run() -> None:
            if error is not None:
                done(error)
                return
            work()
            done(None)

        item = Submitted(kind, offset, length, durable, run)
        with self._lock:
            self.submitted.append(item)
            if self.mode == HOLD:
                self.held.append(item)
                return
        if self.mode == INLINE:
            run()
        else:
            # Every other request waits a little on its thread, so that both orders happen:
            # done() before and after submit_*() returned.
            def later() -> None:
                time.sleep(0.0005)
                run()

            thread = threading.Thread(target=later if len(self.submitted) % 2 else run)
            self.threads.append(thread)
            thread.start()

    def release(self) -> None:
        """Complete every held request, each from its own thread, and wait for them."""
        with self._lock:
            held, self.held = self.held, []
        threads = [threading.Thread(target=item.run) for item in held]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        def work() -> None:
            pos = offset
            for view in buffers:
                view[:] = self.data[pos : pos + len(view)]
                pos += len(view)

        self._start("read", offset, length, False, work, done)

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        def work() -> None:
            pos = offset
            for view in buffers:
                self.data[pos : pos + len(view)] = view
                pos += len(view)

        self._start("write", offset, length, durable, work, done)

    def submit_flush(self, done: Done) -> None:
        self._start("flush", 0, 0, False, lambda: None, done)

    # -- the blocking calls (the commands that do not submit use them) -------------------

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        self.blocking_calls += 1
        pos = offset
        for view in buffers:
            view[:] = self.data[pos : pos + len(view)]
            pos += len(view)

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        self.blocking_calls += 1
        pos = offset
        for view in buffers:
            self.data[pos : pos + len(view)] = view
            pos += len(view)

    def flush(self) -> None:
        self.blocking_calls += 1

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        self.blocking_calls += 1
        self.data[offset : offset + length] = bytes(length)


class Completions:
    """A `complete` callback that counts and keeps what it was given (thread-safe)."""

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self._lock = threading.Lock()

    def __call__(self, response: Response) -> None:
        with self._lock:
            self.responses.append(response)


def cdb(op: int, lba: int, n: int, **flags: bool | int) -> bytes:
    return encode_block_cdb(BlockCdb(op, lba, n, **flags))  # type: ignore[arg-type]


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


Made = tuple[EmulatedTarget, BlockDevice, FakeAsyncBackend]


@pytest.fixture
def make() -> Iterator[Callable[..., Made]]:
    targets: list[EmulatedTarget] = []

    def build(mode: str = INLINE, **options: object) -> Made:
        backend = FakeAsyncBackend(mode)
        device = BlockDevice(backend, BlockDeviceOptions(**options))  # type: ignore[arg-type]
        target = EmulatedTarget({0: device})
        run_command(target, bytes(6))  # consume the power-on unit attention
        targets.append(target)
        return target, device, backend

    yield build
    for t in targets:
        t.close()


def execute(target: EmulatedTarget, request: Request, complete: Completions) -> Response | None:
    return target.execute(request, complete)


# -- the three ways a request completes -------------------------------------------------


def test_inline_completion_returns_the_response(make: Callable[..., Made]) -> None:
    target, device, backend = make(INLINE)
    assert device.asynchronous
    backend.data[10 * BLOCK : 12 * BLOCK] = pattern(2 * BLOCK)
    writer = BytesWriter(2 * BLOCK)
    done = Completions()
    response = execute(target, Request(0, cdb(Opcode.READ_10, 10, 2), data_in=writer), done)
    assert response is not None and response.status == Status.GOOD and response.residual == 0
    assert writer.getvalue() == pattern(2 * BLOCK)
    assert done.responses == []  # delivered inline, never through complete
    assert [s.kind for s in backend.submitted] == ["read"]
    assert backend.blocking_calls == 0


def test_later_completion_calls_complete_once(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD)
    backend.data[0:BLOCK] = pattern(BLOCK, 7)
    writer = BytesWriter(BLOCK)
    done = Completions()
    assert execute(target, Request(0, cdb(Opcode.READ_16, 0, 1), data_in=writer), done) is None
    assert done.responses == [] and backend.in_flight() == 1
    backend.release()
    assert len(done.responses) == 1 and done.responses[0].status == Status.GOOD
    assert writer.getvalue() == pattern(BLOCK, 7) and writer.written == BLOCK


def test_write_completes_later_and_lands(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD)
    reader = BytesReader(pattern(3 * BLOCK, 3))
    done = Completions()
    request = Request(0, cdb(Opcode.WRITE_12, 5, 3), data_out=reader)
    assert execute(target, request, done) is None
    assert backend.data[5 * BLOCK : 8 * BLOCK] == bytes(3 * BLOCK)  # not yet
    backend.release()
    assert [r.status for r in done.responses] == [Status.GOOD]
    assert backend.data[5 * BLOCK : 8 * BLOCK] == pattern(3 * BLOCK, 3)
    assert reader.remaining() == 0


@pytest.mark.parametrize("repeat", range(3))
def test_racing_completions_deliver_exactly_once(make: Callable[..., Made], repeat: int) -> None:
    """done() on another thread at once: either inline or complete(), never both or neither."""
    target, _, backend = make(THREAD)
    backend.data[:] = pattern(len(backend.data), 5)
    inline = 0
    writers: list[BytesWriter] = []
    for i in range(300):
        writer = BytesWriter(BLOCK)
        done = Completions()
        op = Opcode.READ_10 if i % 2 else Opcode.WRITE_10
        if op == Opcode.READ_10:
            request = Request(0, cdb(op, 100 + i % 50, 1), data_in=writer)
        else:
            request = Request(0, cdb(op, i % 50, 1), data_out=BytesReader(pattern(BLOCK, i)))
        response = execute(target, request, done)
        backend.join()
        if response is not None:
            inline += 1
            assert response.status == Status.GOOD
            assert done.responses == []
        else:
            assert [r.status for r in done.responses] == [Status.GOOD]
        writers.append(writer)
    assert 0 < inline < 300  # both orders happened
    for i, writer in enumerate(writers):
        if i % 2:
            lba = 100 + i % 50
            assert writer.getvalue() == backend.data[lba * BLOCK : (lba + 1) * BLOCK]
    assert len(backend.submitted) == 300


def test_32_commands_back_to_back_are_all_in_flight(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD)
    backend.data[:] = pattern(len(backend.data), 9)
    done = Completions()
    writers = []
    for i in range(32):
        writer = BytesWriter(2 * BLOCK)
        writers.append(writer)
        if i % 4 == 3:
            reader = BytesReader(pattern(2 * BLOCK, i))
            request = Request(0, cdb(Opcode.WRITE_10, 100 + 2 * i, 2), data_out=reader, tag=i)
        else:
            request = Request(0, cdb(Opcode.READ_10, 2 * i, 2), data_in=writer, tag=i)
        assert execute(target, request, done) is None
    assert backend.in_flight() == 32
    assert done.responses == []
    backend.release()
    assert len(done.responses) == 32
    assert all(r.status == Status.GOOD for r in done.responses)
    for i, writer in enumerate(writers):
        if i % 4 != 3:
            assert writer.getvalue() == bytes(
                pattern(len(backend.data), 9)[2 * i * BLOCK :][: 2 * BLOCK]
            )
        else:
            assert backend.data[(100 + 2 * i) * BLOCK :][: 2 * BLOCK] == pattern(2 * BLOCK, i)


# -- durability -------------------------------------------------------------------------


def test_fua_and_write_cache_off_make_writes_durable(make: Callable[..., Made]) -> None:
    target, device, backend = make(INLINE)
    data = pattern(BLOCK)
    run_command(target, cdb(Opcode.WRITE_10, 1, 1), data_out=data)
    run_command(target, cdb(Opcode.WRITE_16, 2, 1, fua=True), data_out=data)
    run_command(target, cdb(Opcode.WRITE_6, 3, 1), data_out=data)
    assert [s.durable for s in backend.submitted] == [False, True, False]
    device.set_write_cache(False)
    run_command(target, cdb(Opcode.WRITE_12, 4, 1), data_out=data)
    assert backend.submitted[-1].durable is True
    target2, _, backend2 = make(INLINE, write_cache=False)
    run_command(target2, cdb(Opcode.WRITE_10, 1, 1), data_out=data)
    assert [s.durable for s in backend2.submitted] == [True]


def test_write_and_verify_is_a_durable_submitted_write(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD)
    done = Completions()
    request = Request(
        0, cdb(Opcode.WRITE_AND_VERIFY_10, 8, 1), data_out=BytesReader(pattern(BLOCK, 4))
    )
    assert execute(target, request, done) is None
    backend.release()
    assert [r.status for r in done.responses] == [Status.GOOD]
    assert [(s.kind, s.durable) for s in backend.submitted] == [("write", True)]
    assert backend.data[8 * BLOCK : 9 * BLOCK] == pattern(BLOCK, 4)
    # BYTCHK 10b is reserved: refused before any I/O.
    r = run_command(target, cdb(Opcode.WRITE_AND_VERIFY_16, 8, 1, bytchk=2), data_out=bytes(BLOCK))
    assert r.sense is not None and r.sense.code == Asc.INVALID_FIELD_IN_CDB
    assert len(backend.submitted) == 1


@pytest.mark.parametrize("op", [Opcode.SYNCHRONIZE_CACHE_10, Opcode.SYNCHRONIZE_CACHE_16])
def test_synchronize_cache_submits_a_flush(make: Callable[..., Made], op: int) -> None:
    target, _, backend = make(HOLD)
    done = Completions()
    assert execute(target, Request(0, cdb(op, 0, 0)), done) is None
    assert [s.kind for s in backend.submitted] == ["flush"]
    backend.release()
    assert [r.status for r in done.responses] == [Status.GOOD]
    assert backend.blocking_calls == 0
    r = run_command(target, cdb(op, BLOCKS, 1))  # range checked before any I/O
    assert r.sense is not None and r.sense.code == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    assert len(backend.submitted) == 1


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [INLINE, HOLD])
@pytest.mark.parametrize(
    ("op", "err", "key", "code"),
    [
        (Opcode.READ_10, errno.EIO, SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR),
        (Opcode.WRITE_10, errno.EIO, SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR),
        (Opcode.WRITE_10, errno.ENOSPC, SenseKey.DATA_PROTECT,
         Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        (Opcode.WRITE_AND_VERIFY_10, errno.EIO, SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR),
        (Opcode.SYNCHRONIZE_CACHE_10, errno.EIO, SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR),
    ],
)  # fmt: skip
def test_backend_errors_become_sense(
    make: Callable[..., Made], mode: str, op: int, err: int, key: SenseKey, code: Asc
) -> None:
    target, _, backend = make(mode)
    backend.fail = BackendError(err, "injected")
    done = Completions()
    writer = BytesWriter(BLOCK) if op == Opcode.READ_10 else None
    reader = BytesReader(bytes(BLOCK)) if writer is None else None
    n = 0 if op == Opcode.SYNCHRONIZE_CACHE_10 else 1
    request = Request(0, cdb(op, 3, n), data_out=reader, data_in=writer)
    response = execute(target, request, done)
    if mode == HOLD:
        assert response is None
        backend.release()
        assert len(done.responses) == 1
        response = done.responses[0]
    else:
        assert done.responses == []
    assert response is not None and response.status == Status.CHECK_CONDITION
    sense = parse_sense(response.sense)
    assert (sense.key, sense.code) == (key, code)
    if writer is not None:
        assert response.residual == BLOCK and writer.written == 0  # nothing transferred


def test_refusals_happen_before_any_submission(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD, read_only=True)
    r = run_command(target, cdb(Opcode.WRITE_10, 1, 1), data_out=bytes(BLOCK))
    assert r.sense is not None and r.sense.key == SenseKey.DATA_PROTECT
    r = run_command(target, cdb(Opcode.READ_10, BLOCKS, 1), data_in=BLOCK)
    assert r.sense is not None and r.sense.code == Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE
    assert r.residual == BLOCK
    r = run_command(target, cdb(Opcode.READ_10, 0, 0), data_in=BLOCK)  # nothing to move
    assert (r.status, r.residual) == (Status.GOOD, BLOCK)
    assert backend.submitted == []


def test_short_and_long_buffers(make: Callable[..., Made]) -> None:
    target, _, backend = make(HOLD)
    backend.data[:BLOCK] = pattern(BLOCK, 2)
    done = Completions()
    # A data-in buffer larger than the transfer: GOOD with the unfilled part as residual.
    writer = BytesWriter(3 * BLOCK)
    assert execute(target, Request(0, cdb(Opcode.READ_10, 0, 1), data_in=writer), done) is None
    # A data-in buffer shorter than the transfer gets what fits.
    short = BytesWriter(BLOCK // 2)
    assert execute(target, Request(0, cdb(Opcode.READ_10, 0, 2), data_in=short), done) is None
    # A data-out buffer longer than the transfer: the rest is residual.
    reader = BytesReader(pattern(2 * BLOCK, 8))
    request = Request(0, cdb(Opcode.WRITE_10, 9, 1), data_out=reader)
    assert execute(target, request, done) is None
    assert [s.length for s in backend.submitted] == [BLOCK, BLOCK // 2, BLOCK]
    backend.release()
    residuals = sorted(r.residual for r in done.responses)
    assert residuals == [0, BLOCK, 2 * BLOCK]
    assert writer.getvalue() == pattern(BLOCK, 2)
    assert short.getvalue() == pattern(BLOCK, 2)[: BLOCK // 2]
    # Short data-out: nothing written.
    r = run_command(target, cdb(Opcode.WRITE_10, 9, 2), data_out=bytes(BLOCK))
    assert r.sense is not None and r.sense.code == Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    assert len(backend.submitted) == 3


def test_no_worker_pool_for_an_asynchronous_backend() -> None:
    pool = IoWorkerPool(1)
    try:
        backend = FakeAsyncBackend(HOLD)
        device = BlockDevice(backend, io_pool=pool)
        target = EmulatedTarget({0: device})
        run_command(target, bytes(6))
        done = Completions()
        request = Request(0, cdb(Opcode.READ_10, 0, 1), data_in=BytesWriter(BLOCK))
        assert target.execute(request, done) is None
        assert [s.kind for s in backend.submitted] == ["read"]
        backend.release()
        assert len(done.responses) == 1
        target.close()
    finally:
        pool.close()


_RW_OPS = st.sampled_from(
    [
        (Opcode.READ_6, Opcode.WRITE_6),
        (Opcode.READ_10, Opcode.WRITE_10),
        (Opcode.READ_12, Opcode.WRITE_12),
        (Opcode.READ_16, Opcode.WRITE_16),
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(_RW_OPS, st.integers(0, BLOCKS - 1), st.integers(1, 8), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    mode=st.sampled_from([INLINE, THREAD]),
)
def test_reads_return_what_writes_stored(
    ops: list[tuple[tuple[int, int], int, int, int]], mode: str
) -> None:
    """Against a model bytearray: each write lands, each read returns the model's bytes."""
    backend = FakeAsyncBackend(mode)
    device = BlockDevice(backend)
    target = EmulatedTarget({0: device})
    run_command(target, bytes(6))
    model = bytearray(backend.size)
    try:
        for (read_op, write_op), lba, n, seed in ops:
            n = min(n, BLOCKS - lba)
            data = pattern(n * BLOCK, seed)
            r = run_command(target, cdb(write_op, lba, n), data_out=data)
            assert r.status == Status.GOOD
            model[lba * BLOCK : (lba + n) * BLOCK] = data
            r = run_command(target, cdb(read_op, lba, n), data_in=n * BLOCK)
            assert r.status == Status.GOOD and r.data == model[lba * BLOCK : (lba + n) * BLOCK]
        assert backend.data == model
    finally:
        backend.join()
        target.close()


# -- waiting for what is in flight ----------------------------------------------------------


def test_in_flight_count_and_wait_idle(make: Callable[..., Made]) -> None:
    target, device, backend = make(HOLD)
    done = Completions()
    for i in range(3):
        request = Request(0, cdb(Opcode.READ_10, i, 1), data_in=BytesWriter(BLOCK))
        assert execute(target, request, done) is None
    assert device.in_flight == 3
    assert device.wait_idle(0.01) is False
    backend.release()
    assert device.in_flight == 0 and device.wait_idle(0.01) is True
    assert len(done.responses) == 3


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_compare_and_write_waits_for_submitted_writes(make: Callable[..., Made]) -> None:
    """Atomic read-modify-write (SBC-4 5.3): a write in flight must land before the compare."""
    target, _, backend = make(HOLD)
    done = Completions()
    new = pattern(BLOCK, 1)
    request = Request(0, cdb(Opcode.WRITE_10, 4, 1), data_out=BytesReader(new))
    assert execute(target, request, done) is None
    caw = bytes([Opcode.COMPARE_AND_WRITE, 0]) + (4).to_bytes(8, "big") + bytes([0, 0, 0, 1, 0, 0])
    thread, out = _in_thread(
        lambda: run_command(target, caw, data_out=new + pattern(BLOCK, 2))  # expects `new`
    )
    thread.join(0.2)
    assert thread.is_alive(), "COMPARE AND WRITE ran with a write still in flight"
    backend.release()
    thread.join(5)
    assert not thread.is_alive()
    result = out[0]
    assert getattr(result, "status", None) == Status.GOOD, result
    assert backend.data[4 * BLOCK : 5 * BLOCK] == pattern(BLOCK, 2)
    assert [r.status for r in done.responses] == [Status.GOOD]


@pytest.mark.parametrize(
    "function",
    [TaskManagementFunction.ABORT_TASK, TaskManagementFunction.LOGICAL_UNIT_RESET],
)
def test_abort_and_reset_wait_for_submitted_requests(
    make: Callable[..., Made], function: TaskManagementFunction
) -> None:
    target, _, backend = make(HOLD)
    done = Completions()
    request = Request(0, cdb(Opcode.WRITE_10, 4, 1), data_out=BytesReader(bytes(BLOCK)), tag=9)
    assert execute(target, request, done) is None
    thread, out = _in_thread(lambda: target.task_management(function, 0, tag=9))
    thread.join(0.2)
    assert thread.is_alive(), "the TMF answered with the request still in flight"
    assert done.responses == []
    backend.release()
    thread.join(5)
    assert out == [TmfResponse.FUNCTION_COMPLETE]
    assert len(done.responses) == 1  # completed (posted) before the TMF answered
    # With nothing in flight a TMF answers at once.
    assert target.task_management(function, 0, tag=9) == TmfResponse.FUNCTION_COMPLETE


@pytest.mark.parametrize(
    "op", [Opcode.READ_10, Opcode.READ_12, Opcode.READ_16, Opcode.WRITE_10, Opcode.WRITE_12,
           Opcode.WRITE_16],
)  # fmt: skip
def test_protect_fields_are_refused_before_submission(make: Callable[..., Made], op: int) -> None:
    """RDPROTECT/WRPROTECT without protection information: INVALID FIELD IN CDB (SBC-4 4.22)."""
    target, _, backend = make(HOLD)
    writing = op in (Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)
    data = {"data_out": bytes(BLOCK)} if writing else {"data_in": BLOCK}
    r = run_command(target, cdb(op, 1, 1, protect=1), **data)
    assert r.sense is not None
    assert (r.sense.key, r.sense.code) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert backend.submitted == []


def test_six_byte_commands_with_length_zero_move_256_blocks(make: Callable[..., Made]) -> None:
    """READ(6)/WRITE(6): a transfer length of 0 means 256 blocks (SBC-4 5.16, 5.48)."""
    target, _, backend = make(INLINE)
    data = pattern(256 * BLOCK, 7)
    raw_write = bytes([Opcode.WRITE_6, 0, 0, 0, 0, 0])
    assert run_command(target, raw_write, data_out=data).status == Status.GOOD
    raw_read = bytes([Opcode.READ_6, 0, 0, 0, 0, 0])
    r = run_command(target, raw_read, data_in=256 * BLOCK)
    assert r.status == Status.GOOD and r.data == data
    assert [(s.kind, s.length, s.durable) for s in backend.submitted] == [
        ("write", 256 * BLOCK, False),
        ("read", 256 * BLOCK, False),
    ]


def test_fua_on_each_write_cdb_makes_it_durable(make: Callable[..., Made]) -> None:
    target, _, backend = make(INLINE)
    for op in (Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16):
        for fua in (False, True):
            r = run_command(target, cdb(op, 2, 1, fua=fua), data_out=bytes(BLOCK))
            assert r.status == Status.GOOD
    assert [s.durable for s in backend.submitted] == [False, True] * 3
