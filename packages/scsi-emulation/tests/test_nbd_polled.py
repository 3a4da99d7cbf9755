"""Polled-mode pieces of the NBD back-end that need no server: the partial-send arithmetic,
plug/unplug nesting, the polling calls before `start_polling` and after `close`, and blocking
calls flushing a plugged batch first. (Against a fake server: test_nbd_connection.py; against
nbdkit and qemu-nbd: tests/backends/test_nbd_servers.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd import NbdBackend
from scsi_emulation.backends.nbd_connection import NbdConnection, _advance
from scsi_emulation.backends.nbd_protocol import ExportInfo
from scsi_emulation.backends.nbd_transmission import Command


@given(
    st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=50), max_size=10),
)
def test_advance_resumes_exactly_where_a_partial_send_stopped(
    parts: list[bytes], sends: list[int]
) -> None:
    """However sendmsg cuts the iovecs, what is left is the unsent tail, byte for byte."""
    whole = b"".join(parts)
    views = [memoryview(x) for x in parts]
    start = _advance(views, 0, 0)
    sent = 0
    for n in sends:
        n = min(n, len(whole) - sent)
        start = _advance(views, start, n)
        sent += n
        assert b"".join(bytes(v) for v in views[start:]) == whole[sent:]
        assert start == len(views) or len(views[start])  # never stops on an empty view


class StubConnection:
    """Records the calls NbdBackend makes on its connections."""

    def __init__(self) -> None:
        self.export = ExportInfo("", 1 << 20, p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH)
        self.calls: list[str] = []
        self.submitted: list[Command] = []
        self.generation = 0

    def plug(self) -> None:
        self.calls.append("plug")

    def unplug(self) -> None:
        self.calls.append("unplug")

    def send_held(self) -> None:
        self.calls.append("send_held")
        for command in self.submitted:  # the server answers once it has the batch
            assert command.on_done is not None
            command.on_done(command)
        self.submitted.clear()

    def submit(self, command: Command) -> None:
        self.calls.append("submit")
        self.submitted.append(command)

    def start_polling(self) -> None:
        self.calls.append("start_polling")

    def poll_fileno(self) -> int | None:
        return 7

    def service(self) -> None:
        self.calls.append("service")

    def close(self) -> None:
        self.calls.append("close")


def backend_of(*stubs: StubConnection) -> NbdBackend:
    return NbdBackend(cast(Sequence[NbdConnection], stubs))


def test_plug_nests_and_stray_unplugs_are_ignored() -> None:
    stub = StubConnection()
    backend = backend_of(stub)
    backend.unplug()  # without plug: ignored (logged), the depth stays at zero
    backend.plug()
    backend.plug()
    backend.unplug()
    assert stub.calls == ["plug"]
    backend.unplug()
    assert stub.calls == ["plug", "unplug"]
    backend.plug()
    assert stub.calls == ["plug", "unplug", "plug"]


def test_polling_calls_before_start_and_after_close() -> None:
    stub = StubConnection()
    backend = backend_of(stub)
    assert backend.poll_fileno() is None and backend.poll_filenos() == []
    backend.service()
    assert stub.calls == []  # not polled: a reader thread receives, service does nothing
    assert backend.start_polling()
    assert backend.poll_fileno() == 7 and backend.poll_filenos() == [7]
    backend.service()
    assert stub.calls == ["start_polling", "service"]
    backend.close()
    closed = backend_of(StubConnection())
    closed.close()
    assert not closed.start_polling()


def test_a_blocking_call_while_plugged_sends_the_held_batch_first() -> None:
    """Otherwise it would wait for a command that never left (a held one)."""
    stub = StubConnection()
    backend = backend_of(stub)
    backend.plug()
    backend.flush()  # completes only once send_held ran
    assert stub.calls == ["plug", "submit", "send_held"]
    backend.unplug()
    assert stub.calls[-1] == "unplug"
