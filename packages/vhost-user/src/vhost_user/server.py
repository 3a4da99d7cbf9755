"""The trio driver of the back-end: listen, accept one front-end at a time, move bytes and fds.

All protocol decisions are ``BackendConnection``'s; this module only reads exactly what it asks
for (``recvmsg`` with SCM_RIGHTS), sends its replies, and runs one task per live queue that
sleeps on the kick eventfd (``trio.lowlevel.wait_readable``), drains it, lets the device handle
every available chain and signals the call eventfd once per batch. With busy polling the kick's
handler does the same where the loop waits (`BusyPoll`), and the task only stands by. QEMU
reconnects with ``-chardev socket,...,reconnect=1``: when a front-end goes, the next one is
accepted.

Knows nothing about any device type.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable

# trio 0.22 (installed here) ships no type information; newer trio does.
import trio

from .backend import VhostUserBackend
from .busy_poll import BusyPoll
from .connection import BackendConnection, QueueStarted, QueueStopped, SendMessage
from .errors import ProtocolError
from .framing import close_fds
from .vring import Vring

__all__ = ["run_queue", "serve", "serve_connection"]

log = logging.getLogger(__name__)

# Room for more fds than any request carries (SET_MEM_TABLE: 8), so an excess is seen and
# refused by the protocol layer instead of being silently truncated by the kernel.
_MAX_FDS = 16
_ANCILLARY_SIZE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


async def send_message(
    sock: trio.socket.SocketType, data: bytes, fds: tuple[int, ...] = ()
) -> None:
    """Send one message with ``fds`` attached to its first byte."""
    ancdata = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    view = memoryview(data)
    while view:
        sent = await sock.sendmsg([view], ancdata)
        view = view[sent:]
        ancdata = []


async def run_queue(
    backend: VhostUserBackend, vring: Vring, kick_fd: int, scope: trio.CancelScope
) -> None:
    """Serve one live queue until its scope is cancelled or its kick fd is closed.

    The hot path: one wake-up (~8 µs) drains the eventfd and every available chain, then one
    call notification for the whole batch.
    """
    index = vring.index
    handle = backend.handle_kick
    eventfd_read = os.eventfd_read
    busy = backend.busy_poll
    # With busy polling the kick is its handler's while the loop waits in the spinner's epoll
    # (BusyPoll.wait_readable parks this task then): trio must not wait on it too.
    wait_readable = busy.wait_readable if busy is not None else trio.lowlevel.wait_readable
    if busy is not None:

        def kicked() -> None:
            """A kick a spin found: served as the loop below would (it stays parked)."""
            if scope.cancel_called:
                return  # stopped: the ring is not ours now
            try:
                eventfd_read(kick_fd)
            except BlockingIOError:
                return
            except OSError:  # closed under us: the task below sees it and ends
                return
            try:
                _drain(handle, index, vring)
            except Exception as exc:  # as below: stop this queue only
                log.error("vring %d: queue processing stopped: %r", index, exc)
                scope.cancel()
                busy.unwatch(kick_fd)
                return
            busy.activity()

        busy.watch(kick_fd, kicked)
        probe = _PolledRing(handle, vring, scope, busy) if backend.spin_on_ring(index) else None
    else:
        probe = None
    with scope:
        try:
            # Chains made available before the ring went live (or resubmitted after a
            # reconnection) get no new kick: look once straight away.
            handle(index, vring)
            vring.notify()
            if probe is not None and busy is not None:
                probe.seen = vring.queue.avail_idx()  # what the first look covered, at least
                busy.poll_ring(probe)
            while True:
                await wait_readable(kick_fd)
                if scope.cancel_called:
                    return  # stopped while this wake-up was pending: the ring is not ours now
                try:
                    eventfd_read(kick_fd)
                except BlockingIOError:
                    continue
                _drain(handle, index, vring)
                if busy is not None:
                    busy.activity()
        except trio.ClosedResourceError:
            return
        except Exception as exc:  # a device bug or a broken ring: stop this queue only
            log.error("vring %d: queue processing stopped: %r", index, exc)
        finally:
            if busy is not None:
                busy.unwatch(kick_fd)
                if probe is not None:
                    busy.unpoll_ring(probe)


class _PolledRing:
    """A live queue as the spinner polls it (`BusyPoll.poll_ring`): kicks off while it spins,
    served when the avail idx moves, kicks on again before it parks."""

    __slots__ = ("busy", "handle", "index", "scope", "seen", "vring")

    def __init__(
        self,
        handle: Callable[[int, Vring], None],
        vring: Vring,
        scope: trio.CancelScope,
        busy: BusyPoll,
    ) -> None:
        self.handle = handle
        self.vring = vring
        self.index = vring.index
        self.scope = scope
        self.busy = busy
        #: The avail idx the last serve covered (read before it: a buffer added while the
        #: device worked is seen as a move, never lost).
        self.seen = -1

    def quiet(self) -> None:
        if not self.scope.cancel_called:
            self.vring.queue.disable_notification()

    def moved(self) -> bool:
        # The queue is looked up each time: a memory remap replaces it.
        return not self.scope.cancel_called and self.vring.queue.avail_idx() != self.seen

    def serve(self) -> None:
        if self.scope.cancel_called:
            return  # stopped: the ring is not ours now
        vring = self.vring
        self.seen = vring.queue.avail_idx()
        try:
            self.handle(self.index, vring)
            vring.notify()
        except Exception as exc:  # as run_queue does: stop this queue only
            log.error("vring %d: queue processing stopped: %r", self.index, exc)
            self.scope.cancel()
            self.busy.unpoll_ring(self)
            return
        self.busy.activity()

    def loud(self) -> None:
        if not self.scope.cancel_called:
            # Its result (buffers waiting) is not enough: an event queue keeps buffers
            # without using them. The spinner looks at `moved` next.
            self.vring.queue.enable_notification()


def _drain(handle: Callable[[int, Vring], None], index: int, vring: Vring) -> None:
    """Handle a kicked ring with kicks suppressed, until no buffer came in meanwhile.

    virtio 1.2 2.7.7 / 2.7.10: while we work the driver need not kick (VIRTQ_USED_F_NO_NOTIFY,
    or avail_event left behind with EVENT_IDX); before sleeping we ask for kicks again and look
    once more, so a buffer added in between is served now instead of waiting for a kick that
    was never sent. A device need not consume every buffer (an event queue keeps them): we
    go round again only when the avail idx moved, never because buffers are merely waiting.
    """
    queue = vring.queue
    queue.disable_notification()
    while True:
        before = queue.avail_idx()
        handle(index, vring)
        vring.notify()
        queue.enable_notification()
        if queue.avail_idx() == before:
            return
        queue = vring.queue
        queue.disable_notification()


async def serve_connection(sock: trio.socket.SocketType, backend: VhostUserBackend) -> None:
    """Serve one front-end on a connected socket until it goes away or breaks the protocol."""
    busy = backend.busy_poll

    def fd_closing(fd: int) -> None:
        # Its queue's task may wait through trio or be parked by the busy poller.
        trio.lowlevel.notify_closing(fd)
        if busy is not None:
            busy.notify_closing(fd)

    conn = BackendConnection(backend, fd_closing=fd_closing)
    scopes: dict[int, trio.CancelScope] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_backend, backend)
            try:
                await _read_loop(sock, conn, nursery, scopes)
            finally:
                for scope in scopes.values():
                    scope.cancel()
                conn.close()
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
        try:
            backend.reset()
        except Exception as exc:
            log.error("device reset after disconnect failed: %r", exc)


async def _run_backend(backend: VhostUserBackend) -> None:
    try:
        await backend.run()
    except Exception as exc:
        log.error("device background task failed: %r", exc)


async def _read_loop(
    sock: trio.socket.SocketType,
    conn: BackendConnection,
    nursery: trio.Nursery,
    scopes: dict[int, trio.CancelScope],
) -> None:
    backend = conn.backend
    while True:
        try:
            data, ancdata, flags, _addr = await sock.recvmsg(
                conn.bytes_needed(), _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:
            log.info("front-end connection lost: %s", exc)
            return
        fds = _fds_from_ancillary(ancdata)
        if not data:
            close_fds(fds)
            log.info("front-end disconnected")
            return
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            log.error("front-end sent more file descriptors than any request carries; closing")
            return
        try:
            events = conn.receive_data(data, fds)
        except ProtocolError as exc:
            log.error("closing the front-end connection: %s", exc)
            if exc.reply is not None:
                with contextlib.suppress(OSError):
                    await send_message(sock, exc.reply)
            return
        for event in events:
            if isinstance(event, SendMessage):
                try:
                    await send_message(sock, event.data, event.fds)
                except OSError as exc:
                    log.info("front-end connection lost while replying: %s", exc)
                    return
                finally:
                    close_fds(event.fds)
            elif isinstance(event, QueueStarted):
                index = event.vring.index
                old = scopes.pop(index, None)
                if old is not None:
                    old.cancel()
                scope = trio.CancelScope()
                scopes[index] = scope
                nursery.start_soon(run_queue, backend, event.vring, event.kick_fd, scope)
            elif isinstance(event, QueueStopped):
                stopped = scopes.pop(event.vring.index, None)
                if stopped is not None:
                    stopped.cancel()


def _listening_socket(socket_path: str | None, listen_fd: int | None) -> trio.socket.SocketType:
    if (socket_path is None) == (listen_fd is None):
        raise ValueError("give exactly one of socket_path and listen_fd")
    if listen_fd is not None:
        return trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd))
    assert socket_path is not None
    try:
        if stat.S_ISSOCK(os.stat(socket_path).st_mode):
            os.unlink(socket_path)  # a stale socket left by a previous (killed) instance
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(socket_path)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def serve(
    backend_factory: Callable[[], VhostUserBackend],
    *,
    socket_path: str | None = None,
    listen_fd: int | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve front-ends one at a time, forever (or until SIGINT/SIGTERM with
    ``handle_signals``, which needs the main thread).

    ``backend_factory()`` is called for each connection. ``listen_fd`` is an inherited
    listening socket (socket activation, ``--fd``). ``task_status.started()`` is called once
    the socket listens.
    """
    listener = _listening_socket(socket_path, listen_fd)
    try:
        with trio.CancelScope() as stop:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(_stop_on_signals, stop)
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    log.info("front-end connected")
                    try:
                        await serve_connection(sock, backend_factory())
                    except Exception:
                        # A bug, not a protocol error (those are handled inside): keep the
                        # daemon up for the next front-end, and keep the traceback for the bug.
                        log.exception("front-end connection failed")
                        sock.close()
    finally:
        listener.close()
        if socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)


async def _stop_on_signals(
    stop: trio.CancelScope, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            stop.cancel()
            return
