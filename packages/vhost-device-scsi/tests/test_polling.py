"""BackendPoller: a pollable back-end's completions run on the trio thread, right after its
descriptor became readable, followed by one `on_serviced`; unwatching stops it; back-ends that
cannot be polled are left alone."""

from __future__ import annotations

import collections
import socket
import threading

import trio
from scsi_emulation.backend import BackendError, Buffers, Done, StorageBackend
from vhost_device_scsi.polling import BackendPoller


class _SocketBackend(StorageBackend):
    """Completes one submitted read per byte that arrives on a socket (the 'server' end)."""

    def __init__(self, pollable: bool = True) -> None:
        self.ours, self.server = socket.socketpair()
        self.ours.setblocking(False)
        self.pollable = pollable
        self.polled = False
        self.services = 0
        self.waiting: collections.deque[Done] = collections.deque()

    @property
    def size(self) -> int:
        return 1 << 20

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        raise BackendError(5, "not used")

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        raise BackendError(5, "not used")

    def flush(self) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        pass

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        self.waiting.append(done)

    def start_polling(self) -> bool:
        self.polled = self.pollable
        return self.pollable

    def poll_fileno(self) -> int | None:
        return self.ours.fileno()

    def service(self) -> None:
        self.services += 1
        try:
            data = self.ours.recv(4096)
        except BlockingIOError:
            return
        for _ in data:
            self.waiting.popleft()(None)

    def close(self) -> None:
        self.ours.close()
        self.server.close()


async def test_completions_run_on_the_trio_thread_then_on_serviced() -> None:
    events: list[str] = []
    backend = _SocketBackend()
    poller = BackendPoller(lambda: events.append("serviced"))
    assert poller.watch(backend)  # before run, as the daemon does at start-up
    assert backend.polled and backend in poller
    threads: list[int] = []

    def done(error: BackendError | None) -> None:
        threads.append(threading.get_ident())
        events.append("done")

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            for _ in range(3):
                backend.submit_read(0, [], 0, done)
            # The 'server' answers from another thread, as a real one would.
            await trio.to_thread.run_sync(backend.server.send, b"\x01\x01\x01")
            with trio.fail_after(5):
                while "serviced" not in events:
                    await trio.sleep(0.001)
            assert events[:4] == ["done", "done", "done", "serviced"]
            assert set(threads) == {threading.get_ident()}
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def test_unwatch_stops_polling_and_later_watch_starts_again() -> None:
    served: list[int] = []
    backend = _SocketBackend()
    poller = BackendPoller(lambda: served.append(1))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            assert poller.watch(backend)  # while running: a task starts at once
            backend.submit_read(0, [], 0, lambda e: None)
            backend.server.send(b"\x01")
            with trio.fail_after(5):
                while not served:
                    await trio.sleep(0.001)
            poller.unwatch(backend)
            assert backend not in poller
            await trio.sleep(0.05)
            before = backend.services
            backend.submit_read(0, [], 0, lambda e: None)
            backend.server.send(b"\x01")
            await trio.sleep(0.1)
            assert backend.services == before  # nobody polls it any more
            assert len(backend.waiting) == 1
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def test_back_ends_that_cannot_be_polled_are_left_alone() -> None:
    backend = _SocketBackend(pollable=False)
    poller = BackendPoller(lambda: None)
    try:
        assert not poller.watch(backend)
        assert backend not in poller
        poller.unwatch(backend)  # harmless
    finally:
        backend.close()


async def test_a_failing_service_is_logged_and_polling_goes_on(
    caplog: object,
) -> None:
    served: list[int] = []

    class Flaky(_SocketBackend):
        def service(self) -> None:
            super().service()
            if self.services == 1:
                raise RuntimeError("back-end bug")

    backend = Flaky()
    poller = BackendPoller(lambda: served.append(1))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            poller.watch(backend)
            backend.submit_read(0, [], 0, lambda e: None)
            backend.submit_read(0, [], 0, lambda e: None)
            backend.server.send(b"\x01")
            with trio.fail_after(5):
                while len(served) < 1:
                    await trio.sleep(0.001)
            backend.server.send(b"\x01")
            with trio.fail_after(5):
                while backend.waiting:
                    await trio.sleep(0.001)
            assert backend.services >= 2
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def test_an_idle_back_end_is_still_serviced_every_poll_interval() -> None:
    """Timeouts need `service` calls even when nothing arrives on the descriptor."""
    served: list[int] = []
    backend = _SocketBackend()
    backend.poll_interval = 0.02
    poller = BackendPoller(lambda: served.append(1))
    poller.watch(backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            await trio.sleep(0.3)
            assert 5 <= backend.services <= 30, backend.services
            assert len(served) == backend.services
            # ...and a reply still wakes it at once after such a tick.
            backend.submit_read(0, [], 0, lambda e: served.append(-1))
            backend.server.send(b"\x01")
            with trio.fail_after(0.015):  # well under the tick
                while -1 not in served:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def test_a_failing_on_serviced_is_logged_and_polling_goes_on() -> None:
    calls: list[int] = []

    def on_serviced() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a completion that cannot be written")

    backend = _SocketBackend()
    poller = BackendPoller(on_serviced)
    poller.watch(backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            for _ in range(2):
                backend.submit_read(0, [], 0, lambda e: None)
                backend.server.send(b"\x01")
                with trio.fail_after(5):
                    while backend.waiting:
                        await trio.sleep(0.001)
            assert len(calls) >= 2  # the task survived the first failure
            nursery.cancel_scope.cancel()
    finally:
        backend.close()


async def test_a_new_socket_on_the_old_descriptor_number_is_watched_itself() -> None:
    """A reconnection's socket often gets the number of the one it replaces. Busy polling
    watches through a duplicate, so the poller must notice the file changed, not just the
    number: else the spinner would watch the dead socket and the new one nobody."""
    import os

    from vhost_user.busy_poll import BusyPoll

    busy = BusyPoll(0)
    backend = _SocketBackend()
    backend.poll_interval = 0.02
    poller = BackendPoller(lambda: None, busy_poll=busy)
    assert poller.watch(backend)
    completed: list[BackendError | None] = []
    number = backend.ours.fileno()
    old_server = backend.server

    def watched_inode() -> int:
        return os.fstat(busy._watched[number]).st_ino

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            await nursery.start(poller.run)
            backend.submit_read(0, [], 0, completed.append)
            backend.server.send(b"x")
            with trio.fail_after(5):
                while not completed:
                    await trio.sleep(0.001)
            assert watched_inode() == os.fstat(number).st_ino
            # The server "restarts": the old connection stays half-open, the new one takes
            # its number.
            new_ours, new_server = socket.socketpair()
            new_ours.setblocking(False)  # O_NONBLOCK belongs to the file: dup2 keeps it
            os.dup2(new_ours.fileno(), number)
            new_ours.close()
            backend.server = new_server
            with trio.fail_after(5):
                while watched_inode() != os.fstat(number).st_ino:
                    await trio.sleep(0.005)
            backend.submit_read(0, [], 0, completed.append)
            new_server.send(b"x")
            with trio.fail_after(5):
                while len(completed) < 2:
                    await trio.sleep(0.001)
            assert completed == [None, None]
            nursery.cancel_scope.cancel()
    finally:
        poller.unwatch(backend)
        busy.close()
        backend.close()
        old_server.close()
