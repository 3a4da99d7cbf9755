"""One NBD connection's I/O: a socket, sends under a lock, replies received by a reader
thread or by whoever polls, with reconnection.

Holds `NbdConnection`: it negotiates with `nbd_handshake.ClientHandshake`, then sends requests
from any thread (under a lock; a WRITE's data goes out with ``sendmsg`` straight from the
caller's buffers) and feeds replies to `nbd_transmission.TransmissionClient` (read data is
received straight into the caller's buffers), calling each command's ``on_done``. No trio,
no event loop.

Two ways to receive:

- threaded (the default): a reader thread, started with the first request, receives and
  runs the completions;
- polled (`start_polling`): no reader thread; the caller waits until `poll_fileno` is readable
  and calls `service`, which receives without blocking and runs the completions on the
  caller's thread. Sends never block either (MSG_DONTWAIT): a send that cannot finish
  because the server waits for us to read its replies receives while it waits. Any thread may
  receive: whoever takes the receive lock (``acquire(blocking=False)``) is the leader, so a
  blocking call on any thread makes progress by itself (`pump`) and never depends on someone
  else calling `service`.

Submissions between `plug` and `unplug` are held back and go out together in as few
``sendmsg`` calls as possible (IOV_MAX iovecs each).

A lost connection (EOF, socket error, protocol violation, or no reply for
``request_timeout`` seconds while commands are outstanding) is re-established on a thread for
up to ``reconnect_timeout`` seconds and the outstanding commands are sent again (each at most
``max_attempts`` times); when that fails every outstanding command completes with an error
(ENOTCONN), never hangs, and the next command tries again. Knows nothing about SCSI.

Lock order: the receive lock may be taken (blocking) only by a thread not holding the send
lock; a sender holding the send lock only ever *tries* the receive lock; a receiver takes the
send lock only to hand a lost connection over, after telling any waiting sender to give up.
Completions never run under a lock (they may submit again).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence

from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd_handshake import ClientHandshake
from scsi_emulation.backends.nbd_protocol import ExportInfo, NbdError, NbdHandshakeError
from scsi_emulation.backends.nbd_transmission import Command, TransmissionClient
from scsi_emulation.backends.uri import NbdLocation

__all__ = ["NbdConnection", "negotiate", "open_socket"]

logger = logging.getLogger(__name__)

_CONNECTED = "connected"
_RECONNECTING = "reconnecting"
_FAILED = "failed"
_CLOSED = "closed"

#: How often the reader wakes up with nothing received, to check for a stalled server.
POLL_INTERVAL = 0.5
_TIMEVAL = struct.Struct("@ll")
_RECV_BUFFER = 256 * 1024
#: Receives per `service` call at most, so one busy connection cannot starve the caller.
_RECEIVE_ROUNDS = 16
#: sendmsg takes at most this many iovecs (Linux UIO_MAXIOV).
_IOV_MAX = 1024
#: How long a sender whose socket is full waits for it, per round, while another thread
#: holds the receive lock (it has nothing else to do; short, since it holds the send lock).
_SEND_WAIT = 0.005
#: ... and while it holds the receive lock itself (it wakes up as soon as a reply arrives).
_SEND_RECEIVE_WAIT = 0.05
_DONTWAIT = socket.MSG_DONTWAIT

_monotonic = time.monotonic


def open_socket(location: NbdLocation, timeout: float) -> socket.socket:
    """A connected stream socket to the server of ``location`` (OSError when unreachable)."""
    if location.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(location.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock
    assert location.host is not None
    sock = socket.create_connection((location.host, location.port), timeout=timeout)
    # Small requests must not wait for Nagle's algorithm: latency is per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def negotiate(sock: socket.socket, export: str, timeout: float) -> ExportInfo:
    """Run the fixed-newstyle handshake on ``sock`` (blocking, ``timeout`` per step)."""
    handshake = ClientHandshake(export)
    sock.settimeout(timeout)
    while not handshake.done:
        out = handshake.data_to_send()
        if out:
            sock.sendall(out)
        # Ask for exactly what the next step needs: nothing of the transmission phase.
        data = sock.recv(handshake.bytes_wanted())
        if not data:
            raise NbdHandshakeError("server closed the connection during negotiation")
        handshake.receive_data(data)
    sock.settimeout(None)
    return handshake.export


def _advance(views: list[memoryview], start: int, n: int) -> int:
    """Consume ``n`` sent bytes of ``views`` from index ``start``; the new start index (a
    partly sent view is replaced by its unsent rest)."""
    while n:
        first = views[start]
        if n >= len(first):
            n -= len(first)
            start += 1
        else:
            views[start] = first[n:]
            n = 0
    while start < len(views) and not len(views[start]):
        start += 1
    return start


def _send_all(sock: socket.socket, parts: Sequence[memoryview | bytes]) -> None:
    """Blocking sendmsg until every byte of ``parts`` is out (a signal can cut a send
    short), IOV_MAX iovecs per call."""
    views = [memoryview(x) for x in parts]
    start = 0
    while start < len(views):
        n = sock.sendmsg(views[start : start + _IOV_MAX])
        start = _advance(views, start, n)


class NbdConnection:
    """A connection to one export, re-established when lost. Construction connects and
    negotiates (raising `OSError` or `NbdHandshakeError` for the caller to report)."""

    def __init__(
        self,
        location: NbdLocation,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        reconnect_timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.location = location
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.max_attempts = max_attempts
        #: Guards sending, the state, the socket/client pair and the queued/held lists.
        self._lock = threading.Lock()
        #: Held by the one thread receiving (polled mode): see the module docstring.
        self._rlock = threading.Lock()
        self._queued: list[Command] = []
        #: Request headers and write payloads held back by `plug`.
        self._held: list[bytes | memoryview] = []
        self._plugged = False
        #: Completions a sender received while waiting for room to send, run once it let go
        #: of the send lock (they may submit), on its thread (or by `service` / `pump`).
        self._deferred: list[Command] = []
        #: Guards `_deferred` and `_retired` only, and is never held while taking another
        #: lock: a receiver must not wait for the send lock (the sender may wait for it).
        self._side_lock = threading.Lock()
        #: Lost sockets not closed yet: in polled mode the poller may be waiting on the
        #: descriptor, so only `service` (on the poller's thread) or `close` closes them.
        self._retired: list[socket.socket] = []
        #: Why the socket is unusable, when a sender found out (a receiver acts on it).
        self._broken: str | None = None
        self._polled = False
        self._progress = _monotonic()
        buffer = bytearray(_RECV_BUFFER)
        self._view = memoryview(buffer)
        sock, export = self._connect()
        self.export = export
        self._sock = sock
        self._fd = sock.fileno()
        self._client = self._new_client(export)
        self._state = _CONNECTED
        #: The reader thread (threaded mode, started by the first request) or the
        #: reconnecting thread.
        self._thread: threading.Thread | None = None
        #: Counts sockets: changes whenever a new one replaces a lost one.
        self.generation = 0

    def __repr__(self) -> str:
        return f"NbdConnection({self.location}, {self._state})"

    def _connect(self) -> tuple[socket.socket, ExportInfo]:
        sock = open_socket(self.location, self.connect_timeout)
        try:
            export = negotiate(sock, self.location.export, self.connect_timeout)
            tv = _TIMEVAL.pack(int(POLL_INTERVAL), int((POLL_INTERVAL % 1) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        except BaseException:
            sock.close()
            raise
        return sock, export

    @staticmethod
    def _new_client(export: ExportInfo) -> TransmissionClient:
        return TransmissionClient(
            structured=export.structured_replies, allocation_context=export.allocation_context
        )

    def _start_thread(self, reconnect_reason: str | None) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, args=(reconnect_reason,), name=f"nbd-{self.location}", daemon=True
        )
        thread.start()
        return thread

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._state == _CONNECTED

    @property
    def polled(self) -> bool:
        """Whether `start_polling` was called."""
        return self._polled

    # -- polled mode -------------------------------------------------------------------------

    def start_polling(self) -> None:
        """From now on replies are received only by `service` and `pump` callers. A reader
        thread that already runs is told to stop and joined (it notices within
        POLL_INTERVAL); a reconnecting thread stops once reconnected."""
        with self._lock:
            self._polled = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def poll_fileno(self) -> int | None:
        """The socket's descriptor while connected (readable: `service` has work)."""
        return self._fd if self._state == _CONNECTED else None

    def service(self) -> None:
        """Receive what arrived without blocking, check the request timeout, and run the
        completions on this thread. Does nothing when another thread is receiving."""
        if self._retired:
            self._close_retired()
        if not self._rlock.acquire(blocking=False):
            return
        done = self._take_deferred() if self._deferred else []
        try:
            if self._state == _CONNECTED:
                sock, client = self._sock, self._client
                reason = self._receive_into(sock, client, done)
                if reason is not None:
                    self._lost_polled(sock, client, reason)
        finally:
            self._rlock.release()
        for command in done:
            self._complete(command)

    def pump(self, timeout: float) -> bool:
        """Receive as the leader: wait up to ``timeout`` s for data, receive it and run the
        completions. False (nothing done) when another thread is receiving or the connection
        is not up: wait for your completion some other way, then try again."""
        if not self._rlock.acquire(blocking=False):
            return False
        done = self._take_deferred() if self._deferred else []
        led = True
        try:
            if self._state != _CONNECTED:
                led = bool(done)  # only what a sender received before the loss
            else:
                sock, client = self._sock, self._client
                if self._broken is None:
                    with contextlib.suppress(OSError, ValueError):
                        select.select([sock], [], [], timeout)
                reason = self._receive_into(sock, client, done)
                if reason is not None:
                    self._lost_polled(sock, client, reason)
        finally:
            self._rlock.release()
        for command in done:
            self._complete(command)
        return led

    def _receive_into(
        self, sock: socket.socket, client: TransmissionClient, done: list[Command]
    ) -> str | None:
        """Receive without blocking and decode (the caller holds the receive lock); completed
        commands go to ``done``. Returns why the connection is lost, or None."""
        if self._broken is not None:
            return self._broken
        view = self._view
        for _ in range(_RECEIVE_ROUNDS):
            dest = client.payload_buffers()
            try:
                if dest:
                    n = sock.recvmsg_into(dest, 0, _DONTWAIT)[0]
                else:
                    n = sock.recv_into(view, 0, _DONTWAIT)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                return e.strerror or str(e)
            if not n:
                return "server closed the connection"
            self._progress = _monotonic()
            try:
                if dest:
                    done += client.payload_received(n)
                else:
                    done += client.receive_data(view[:n])
            except NbdError as e:
                logger.error("NBD %s: %s", self.location, e)
                return f"protocol error: {e}"
            if not dest and n < len(view):
                break  # the socket is drained: spare the receive that says EAGAIN
        if client.pending and _monotonic() - self._progress > self.request_timeout:
            return f"no reply for {self.request_timeout:g} s"
        return None

    def _lost_polled(self, sock: socket.socket, client: TransmissionClient, reason: str) -> None:
        """Hand a lost connection over to a reconnecting thread (the caller holds the receive
        lock, so no one decodes while the outstanding commands are taken back)."""
        # A sender may hold the send lock, waiting for room on this socket: make it give up
        # at once rather than after its own timeout (the caller may be the event loop).
        if self._broken is None:
            self._broken = reason
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            if self._state != _CONNECTED or self._sock is not sock:
                return  # closed meanwhile (close fails the commands)
            self._state = _RECONNECTING
            self._queued[:0] = client.take_pending()
            self._held.clear()  # their commands are among those taken back
            self._broken = None
            with self._side_lock:
                self._retired.append(sock)  # shut down above: readable (EOF) for a poller
            self._thread = self._start_thread(reason)
        logger.warning("NBD %s: connection lost (%s); reconnecting", self.location, reason)

    def _close_retired(self) -> None:
        with self._side_lock:
            retired, self._retired = self._retired, []
        for sock in retired:
            sock.close()

    # -- sending -----------------------------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Send ``command`` (or hold it while plugged); its ``on_done`` runs exactly once, on
        the thread that receives its reply (or on this one when the connection is closed)."""
        with self._lock:
            state = self._state
            if state == _CONNECTED:
                if self._thread is None and not self._polled:
                    self._thread = self._start_thread(None)
                self._send_locked(command)
            elif state != _CLOSED:
                self._queued.append(command)
                if state == _FAILED:  # try again, bounded as always
                    self._state = _RECONNECTING
                    self._thread = self._start_thread("previous reconnection failed")
        if self._deferred:
            self._run_deferred()
        if state == _CLOSED:
            command.error = errno.ESHUTDOWN
            command.message = "the NBD connection is closed"
            self._complete(command)

    def plug(self) -> None:
        """Hold submissions back until `unplug`."""
        with self._lock:
            self._plugged = True

    def unplug(self) -> None:
        """Send every held submission (as few sendmsg calls as IOV_MAX allows)."""
        with self._lock:
            self._plugged = False
            if self._held:
                self._send_held_locked()
        if self._deferred:
            self._run_deferred()

    def send_held(self) -> None:
        """Send what `plug` held back, staying plugged (a blocking call waits for its
        command: it must be on the wire)."""
        with self._lock:
            if self._held:
                self._send_held_locked()
        if self._deferred:
            self._run_deferred()

    def _send_held_locked(self) -> None:
        held, self._held = self._held, []
        if self._state != _CONNECTED:
            return  # lost meanwhile: the commands were taken back for resending
        if self._polled:
            self._send_nowait(held)
        else:
            try:
                _send_all(self._sock, held)
            except OSError as e:
                self._send_failed(e)

    def _send_locked(self, command: Command) -> None:
        client = self._client
        if not client.pending:
            self._progress = _monotonic()
        header = client.request(command)
        if self._plugged:
            self._held.append(header)
            if command.kind == p.CMD_WRITE:
                self._held += command.buffers
            return
        if self._polled:
            if command.kind == p.CMD_WRITE:
                self._send_nowait([header, *command.buffers])
                return
            try:
                n = self._sock.send(header, _DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._send_failed(e)
                return
            if n != len(header):
                self._send_nowait([memoryview(header)[n:]])
            return
        try:
            if command.kind == p.CMD_WRITE:
                _send_all(self._sock, [header, *command.buffers])
            else:
                self._sock.sendall(header)
        except OSError as e:
            self._send_failed(e)

    def _send_failed(self, error: OSError | str) -> None:
        # The commands are registered: whoever receives sees the loss and sends them again.
        reason = error if isinstance(error, str) else (error.strerror or str(error))
        logger.debug("send to %s failed: %s", self.location, reason)
        self._broken = reason
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _send_nowait(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send all of ``parts`` (send lock held) without ever blocking on a full socket:
        while waiting for room, receive replies if no one else is (the server may be waiting
        for us to read before it reads more). Gives up (the connection is then lost) when
        neither direction moves for ``request_timeout``."""
        sock = self._sock
        views = [memoryview(x) for x in parts]
        start = 0
        moved = _monotonic()
        while start < len(views):
            try:
                n = sock.sendmsg(views[start : start + _IOV_MAX], (), _DONTWAIT)
            except BlockingIOError:
                n = 0
            except InterruptedError:
                continue
            except OSError as e:
                self._send_failed(e)
                return
            if n:
                start = _advance(views, start, n)
                moved = _monotonic()
                continue
            if not self._wait_to_send(sock):
                return
            if _monotonic() - max(moved, self._progress) > self.request_timeout:
                self._send_failed(f"could not send for {self.request_timeout:g} s")
                return

    def _wait_to_send(self, sock: socket.socket) -> bool:
        """Wait (briefly) until ``sock`` can take more, receiving meanwhile when this thread
        can lead; False when the connection turned out lost."""
        if not self._rlock.acquire(blocking=False):
            with contextlib.suppress(OSError, ValueError):
                select.select([], [sock], [], _SEND_WAIT)
            return self._broken is None
        try:
            try:
                readable = select.select([sock], [sock], [], _SEND_RECEIVE_WAIT)[0]
            except (OSError, ValueError):
                readable = [sock]
            if readable:
                done: list[Command] = []
                reason = self._receive_into(sock, self._client, done)
                if done:
                    with self._side_lock:
                        self._deferred += done
                if reason is not None:
                    if self._broken is None:
                        self._send_failed(reason)
                    return False
        finally:
            self._rlock.release()
        return True

    def _take_deferred(self) -> list[Command]:
        with self._side_lock:
            done, self._deferred = self._deferred, []
        return done

    def _run_deferred(self) -> None:
        for command in self._take_deferred():
            self._complete(command)

    @staticmethod
    def _complete(command: Command) -> None:
        callback = command.on_done
        if callback is None:
            return
        try:
            callback(command)
        except Exception:
            logger.exception("NBD completion callback failed")

    # -- the reader / reconnecting thread ----------------------------------------------------

    def _run(self, reconnect_reason: str | None) -> None:
        if reconnect_reason is not None and not self._reconnect(reconnect_reason):
            return
        while not self._polled:
            with self._lock:
                sock, client = self._sock, self._client
            reason = self._read_until_lost(sock, client)
            if reason is None:
                return  # polled from now on: the poller receives
            with self._lock:
                closed = self._state == _CLOSED
                if not closed:
                    self._state = _RECONNECTING
                    self._queued[:0] = client.take_pending()
                    self._held.clear()
                    self._broken = None
                    pending = []
                else:
                    pending = client.take_pending()
            sock.close()
            if closed:
                for command in pending:
                    command.error = errno.ESHUTDOWN
                    command.message = "the NBD connection was closed"
                    self._complete(command)
                return
            logger.warning("NBD %s: connection lost (%s); reconnecting", self.location, reason)
            if not self._reconnect(reason):
                return

    def _read_until_lost(self, sock: socket.socket, client: TransmissionClient) -> str | None:
        """The reader thread's loop: why the connection was lost, or None when polling
        started (the decoder is left between two receives, for the poller to go on)."""
        view = self._view
        while True:
            dest = client.payload_buffers()
            try:
                n = sock.recvmsg_into(dest)[0] if dest else sock.recv_into(view)
            except (BlockingIOError, TimeoutError):
                if self._state == _CLOSED:
                    return "closed"
                if self._polled:
                    return None
                if client.pending and _monotonic() - self._progress > self.request_timeout:
                    return f"no reply for {self.request_timeout:g} s"
                continue
            except InterruptedError:
                continue
            except OSError as e:
                return e.strerror or str(e)
            if not n:
                return "server closed the connection"
            self._progress = _monotonic()
            try:
                done = client.payload_received(n) if dest else client.receive_data(view[:n])
            except NbdError as e:
                logger.error("NBD %s: %s", self.location, e)
                return f"protocol error: {e}"
            for command in done:
                self._complete(command)

    def _reconnect(self, reason: str) -> bool:
        """Re-establish the connection and resend what was outstanding; False (everything
        failed with ENOTCONN) when it cannot be done within ``reconnect_timeout``."""
        deadline = _monotonic() + self.reconnect_timeout
        delay = 0.05
        last = reason
        while True:
            if self._state == _CLOSED:
                self._fail_queued(errno.ESHUTDOWN, "the NBD connection was closed")
                return False
            try:
                sock, export = self._connect()
            except (OSError, NbdError) as e:
                last = (e.strerror if isinstance(e, OSError) else None) or str(e)
            else:
                self._resume(sock, export)
                return True
            if _monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        logger.error(
            "NBD %s: cannot reconnect within %g s (%s)", self.location, self.reconnect_timeout, last
        )
        with self._lock:
            if self._state != _CLOSED:
                self._state = _FAILED
        self._fail_queued(errno.ENOTCONN, f"connection lost and not re-established: {last}")
        return False

    def _resume(self, sock: socket.socket, export: ExportInfo) -> None:
        give_up: list[Command] = []
        with self._lock:
            if self._state == _CLOSED:
                sock.close()
                return
            if export.size != self.export.size:
                logger.warning(
                    "NBD %s: export size changed from %d to %d",
                    self.location,
                    self.export.size,
                    export.size,
                )
            self.export = export
            self._sock = sock
            self._fd = sock.fileno()
            self._client = self._new_client(export)
            self._broken = None
            self.generation += 1
            self._state = _CONNECTED
            queued, self._queued = self._queued, []
            for command in queued:
                if command.attempts >= self.max_attempts:
                    give_up.append(command)
                elif self._state == _CONNECTED:
                    self._send_locked(command)
                else:  # lost again while resending: the receiver took the sent ones back
                    self._queued.append(command)
        if self._deferred:
            self._run_deferred()
        logger.info("NBD %s: reconnected, %d commands resent", self.location, len(queued))
        for command in give_up:
            command.error = errno.EIO
            command.message = f"no reply after {command.attempts} attempts"
            self._complete(command)

    def _fail_queued(self, error: int, message: str) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
        for command in queued:
            command.error = error
            command.message = message
            self._complete(command)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC), drop the connection; outstanding commands fail."""
        with self._lock:
            if self._state == _CLOSED:
                return
            was_connected = self._state == _CONNECTED
            self._state = _CLOSED
            self._held.clear()
            if was_connected:
                with contextlib.suppress(OSError):  # best effort: never wait for the server
                    self._sock.send(TransmissionClient.disconnect_request(), _DONTWAIT)
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.connect_timeout + 1)
        if self._polled or thread is None:
            # No reader thread fails what is outstanding: do it here.
            with self._rlock:
                pending = self._client.take_pending()
                self._sock.close()
            for command in pending:
                command.error = errno.ESHUTDOWN
                command.message = "the NBD connection was closed"
                self._complete(command)
        self._close_retired()
        for command in self._take_deferred():  # answered before the close
            self._complete(command)
        self._fail_queued(errno.ESHUTDOWN, "the NBD connection was closed")
