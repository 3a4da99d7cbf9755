"""One NBD connection's I/O: a socket, a reader thread and a send lock, with reconnection.

Holds `NbdConnection`: it negotiates with `nbd_handshake.ClientHandshake`, then sends requests
from any thread (under a lock; a WRITE's data goes out with ``sendmsg`` straight from the
caller's buffers) and runs one reader thread that feeds replies to
`nbd_transmission.TransmissionClient` (read data is received straight into the caller's
buffers) and calls each command's ``on_done`` from that thread. No trio, no event loop.

A lost connection (EOF, socket error, protocol violation, or no reply for
``request_timeout`` seconds while commands are outstanding) is re-established for up to
``reconnect_timeout`` seconds and the outstanding commands are sent again (each at most
``max_attempts`` times); when that fails every outstanding command completes with an error
(ENOTCONN), never hangs, and the next command tries again. Knows nothing about SCSI.
"""

from __future__ import annotations

import contextlib
import errno
import logging
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


def _send_all(sock: socket.socket, parts: Sequence[memoryview | bytes]) -> None:
    """sendmsg until every byte of ``parts`` is out (a signal can cut a send short)."""
    views = [memoryview(x) for x in parts]
    while views:
        n = sock.sendmsg(views)
        while n:
            first = views[0]
            if n >= len(first):
                n -= len(first)
                views.pop(0)
            else:
                views[0] = first[n:]
                n = 0
        while views and not len(views[0]):
            views.pop(0)


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
        self._lock = threading.Lock()
        self._queued: list[Command] = []
        self._progress = time.monotonic()
        sock, export = self._connect()
        self.export = export
        self._sock = sock
        self._client = self._new_client(export)
        self._state = _CONNECTED
        self._thread = self._start_reader(reconnect_first=False)

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

    def _start_reader(self, reconnect_first: bool) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, args=(reconnect_first,), name=f"nbd-{self.location}", daemon=True
        )
        thread.start()
        return thread

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._state == _CONNECTED

    # -- sending -----------------------------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Send ``command``; its ``on_done`` runs exactly once, on the reader thread (or on
        this one when the connection is closed)."""
        with self._lock:
            state = self._state
            if state == _CONNECTED:
                self._send_locked(command)
                return
            if state != _CLOSED:
                self._queued.append(command)
                if state == _FAILED:  # try again, bounded as always
                    self._state = _RECONNECTING
                    self._thread = self._start_reader(reconnect_first=True)
                return
        command.error = errno.ESHUTDOWN
        command.message = "the NBD connection is closed"
        self._complete(command)

    def _send_locked(self, command: Command) -> None:
        client = self._client
        if not client.pending:
            self._progress = time.monotonic()
        header = client.request(command)
        try:
            if command.kind == p.CMD_WRITE:
                _send_all(self._sock, [header, *command.buffers])
            else:
                self._sock.sendall(header)
        except OSError as e:
            # The command is registered: the reader sees the loss and sends it again.
            logger.debug("send to %s failed: %s", self.location, e)
            self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _complete(command: Command) -> None:
        callback = command.on_done
        if callback is None:
            return
        try:
            callback(command)
        except Exception:
            logger.exception("NBD completion callback failed")

    # -- the reader thread -------------------------------------------------------------------

    def _run(self, reconnect_first: bool) -> None:
        if reconnect_first and not self._reconnect("previous reconnection failed"):
            return
        while True:
            with self._lock:
                sock, client = self._sock, self._client
            reason = self._read_until_lost(sock, client)
            with self._lock:
                closed = self._state == _CLOSED
                if not closed:
                    self._state = _RECONNECTING
                    self._queued[:0] = client.take_pending()
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

    def _read_until_lost(self, sock: socket.socket, client: TransmissionClient) -> str:
        buffer = bytearray(_RECV_BUFFER)
        view = memoryview(buffer)
        while True:
            dest = client.payload_buffers()
            try:
                n = sock.recvmsg_into(dest)[0] if dest else sock.recv_into(view)
            except (BlockingIOError, TimeoutError):
                if self._state == _CLOSED:
                    return "closed"
                if client.pending and time.monotonic() - self._progress > self.request_timeout:
                    return f"no reply for {self.request_timeout:g} s"
                continue
            except InterruptedError:
                continue
            except OSError as e:
                return e.strerror or str(e)
            if not n:
                return "server closed the connection"
            self._progress = time.monotonic()
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
        deadline = time.monotonic() + self.reconnect_timeout
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
            if time.monotonic() + delay > deadline:
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
            self._client = self._new_client(export)
            self._state = _CONNECTED
            queued, self._queued = self._queued, []
            for command in queued:
                if command.attempts >= self.max_attempts:
                    give_up.append(command)
                else:
                    self._send_locked(command)
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
            if was_connected:
                with contextlib.suppress(OSError):
                    self._sock.sendall(TransmissionClient.disconnect_request())
                self._shutdown_socket()
            thread = self._thread
        if thread is not threading.current_thread():
            thread.join(timeout=self.connect_timeout + 1)
        self._fail_queued(errno.ESHUTDOWN, "the NBD connection was closed")
