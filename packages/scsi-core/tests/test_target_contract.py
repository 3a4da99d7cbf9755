"""The bytes-backed DataReader/DataWriter and the Target contract types."""

import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_core.status import Status
from scsi_core.target import (
    BytesReader,
    BytesWriter,
    Completion,
    DataReader,
    DataWriter,
    Request,
    Response,
    Target,
    TaskManagementFunction,
    TmfResponse,
)


def test_reader_buffers_do_not_consume_and_feed_pwritev() -> None:
    r: DataReader = BytesReader(b"abcdefgh")
    bufs = r.buffers(5)
    assert [bytes(b) for b in bufs] == [b"abcde"] and r.remaining() == 8
    with tempfile.TemporaryFile() as f:
        n = os.pwritev(f.fileno(), bufs, 0)
        r.advance(n)
        assert os.pread(f.fileno(), 10, 0) == b"abcde"
    assert r.read(100) == b"fgh" and r.remaining() == 0 and r.buffers(4) == []
    with pytest.raises(ValueError):
        r.advance(1)


def test_writer_preadv_into_buffers() -> None:
    w: DataWriter = BytesWriter(6)
    with tempfile.TemporaryFile() as f:
        os.pwrite(f.fileno(), b"0123", 0)
        n = os.preadv(f.fileno(), w.buffers(4), 0)
        w.advance(n)
    assert w.write(b"xyz") == 2
    assert w.written == 6 and w.remaining() == 0
    assert isinstance(w, BytesWriter) and w.getvalue() == b"0123xy"
    with pytest.raises(ValueError):
        w.advance(1)


@given(st.binary(max_size=64), st.lists(st.integers(0, 20), max_size=8))
def test_reader_read_chunks_reassemble(data: bytes, chunks: list[int]) -> None:
    r = BytesReader(data)
    out = b"".join(r.read(n) for n in chunks) + r.read(len(data))
    assert out == data and r.remaining() == 0


class _Echo(Target):
    """A minimal Target to show the contract is implementable and both completion modes."""

    def __init__(self) -> None:
        self.pending: list[Completion] = []

    def execute(self, request: Request, complete: Completion) -> Response | None:
        if request.cdb[0] == 0:
            return Response(Status.GOOD)
        self.pending.append(complete)
        return None

    def task_management(
        self, function: TaskManagementFunction, lun: int, tag: int = 0, nexus: object = 0
    ) -> TmfResponse:
        return TmfResponse.FUNCTION_COMPLETE

    def luns(self) -> list[int]:
        return [0]


def test_inline_and_pending_completion() -> None:
    t = _Echo()
    done: list[Response] = []
    assert t.execute(Request(0, bytes(6)), done.append) == Response(Status.GOOD)
    assert done == []
    assert t.execute(Request(0, b"\x28" + bytes(9)), done.append) is None
    t.pending.pop()(Response(Status.CHECK_CONDITION, b"x"))
    assert done == [Response(Status.CHECK_CONDITION, b"x")]
