"""The NBD socket layer and back-end against an in-process fake server: many requests in
flight on one connection, reconnection after a drop mid-request, bounded failure."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from scsi_emulation import testing
from scsi_emulation.backend import BackendError
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd import NbdBackend
from scsi_emulation.backends.uri import NbdLocation


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("client went away")
        data += part
    return data


class FakeServer:
    """A minimal fixed-newstyle NBD server over a bytearray (structured replies,
    base:allocation with everything allocated).

    ``batch``: hold replies until that many requests are outstanding on a connection (proves
    they are in flight together). ``drop_at``: close the connection, unanswered, when the
    request with that global number (1-based) arrives.
    """

    def __init__(
        self, size: int = 1 << 20, *, batch: int = 1, drop_at: int | None = None, port: int = 0
    ) -> None:
        self.data = bytearray(size)
        self.batch = batch
        self.drop_at = drop_at
        self.requests = 0
        self.connections = 0
        self.max_outstanding = 0
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def location(self) -> NbdLocation:
        return NbdLocation("", host="127.0.0.1", port=self.port)

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
        conn.sendall(
            p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, kind, len(data)) + data
        )

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self._negotiate(conn)
            self._transmit(conn)
        conn.close()

    def _negotiate(self, conn: socket.socket) -> None:
        conn.sendall(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
        _recv_exact(conn, 4)
        while True:
            _, option, length = p.OPTION_HEADER.unpack(_recv_exact(conn, 16))
            _recv_exact(conn, length)
            if option == p.OPT_STRUCTURED_REPLY:
                self._reply(conn, option, p.REP_ACK)
            elif option == p.OPT_SET_META_CONTEXT:
                self._reply(conn, option, p.REP_META_CONTEXT, p.U32.pack(1) + b"base:allocation")
                self._reply(conn, option, p.REP_ACK)
            elif option == p.OPT_GO:
                flags = 0x1 | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_WRITE_ZEROES
                body = p.INFO_EXPORT_BODY.pack(p.INFO_EXPORT, len(self.data), flags)
                self._reply(conn, option, p.REP_INFO, body)
                self._reply(conn, option, p.REP_ACK)
                return
            else:
                self._reply(conn, option, p.REP_ERR_UNSUP)

    def _transmit(self, conn: socket.socket) -> None:
        held: list[bytes] = []
        while True:
            _, flags, kind, cookie, offset, length = p.REQUEST.unpack(_recv_exact(conn, 28))
            payload = _recv_exact(conn, length) if kind == p.CMD_WRITE else b""
            if kind == p.CMD_DISC:
                return
            self.requests += 1
            if self.drop_at is not None and self.requests == self.drop_at:
                conn.shutdown(socket.SHUT_RDWR)
                return
            held.append(self._answer(flags, kind, cookie, offset, length, payload))
            self.max_outstanding = max(self.max_outstanding, len(held))
            if len(held) >= self.batch:
                conn.sendall(b"".join(held))
                held.clear()

    def _answer(
        self, flags: int, kind: int, cookie: int, offset: int, length: int, payload: bytes
    ) -> bytes:
        def chunk(ctype: int, body: bytes, done: bool = True) -> bytes:
            head = p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC, 1 if done else 0, ctype, cookie, len(body)
            )
            return head + body

        if offset + length > len(self.data):
            return chunk(p.REPLY_TYPE_ERROR, p.ERROR_BODY.pack(errno.EINVAL, 3) + b"eof")
        if kind == p.CMD_READ:
            return chunk(
                p.REPLY_TYPE_OFFSET_DATA,
                p.U64.pack(offset) + bytes(self.data[offset : offset + length]),
            )
        if kind == p.CMD_WRITE:
            self.data[offset : offset + length] = payload
        elif kind == p.CMD_WRITE_ZEROES:
            self.data[offset : offset + length] = bytes(length)
        elif kind == p.CMD_BLOCK_STATUS:
            body = p.U32.pack(1) + p.EXTENT.pack(length, 0)
            return chunk(p.REPLY_TYPE_BLOCK_STATUS, body)
        return chunk(p.REPLY_TYPE_NONE, b"")


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    yield s
    s.close()


def test_queue_depth_32_on_one_connection() -> None:
    """32 reads submitted at once are all outstanding at the server together."""
    server = FakeServer(batch=32)
    try:
        backend = NbdBackend.connect(server.location)
        for i in range(32):
            server.data[i * 512 : (i + 1) * 512] = bytes([i]) * 512
        outs = [bytearray(512) for _ in range(32)]
        finished = threading.Semaphore(0)
        errors: list[BackendError | None] = []

        def done(error: BackendError | None) -> None:
            errors.append(error)
            finished.release()

        for i, out in enumerate(outs):
            backend.submit_read(i * 512, [memoryview(out)], 512, done)
        for _ in range(32):
            assert finished.acquire(timeout=10)
        assert errors == [None] * 32
        assert all(out == bytes([i]) * 512 for i, out in enumerate(outs))
        assert server.max_outstanding == 32 and backend.connection_count == 1
        backend.close()
    finally:
        server.close()


def test_blocking_calls_and_errors(server: FakeServer) -> None:
    backend = NbdBackend.connect(server.location)
    assert backend.size == 1 << 20 and backend.asynchronous
    data = bytes(range(256)) * 16
    backend.write(8192, [memoryview(data)[:1000], memoryview(data)[1000:]], len(data), True)
    assert server.data[8192 : 8192 + len(data)] == data
    out = bytearray(len(data))
    backend.read(8192, [memoryview(out)], len(out))
    assert out == data
    backend.write_zeroes(8192, 512)
    assert server.data[8192 : 8192 + 512] == bytes(512)
    assert backend.allocation(0) == (True, 1 << 20)
    backend.flush()
    with pytest.raises(BackendError) as info:
        backend.read((1 << 20) - 512, [memoryview(bytearray(1024))], 1024)
    assert info.value.errno == errno.EINVAL and "eof" in str(info.value)
    backend.close()
    with pytest.raises(BackendError):
        backend.read(0, [memoryview(bytearray(512))], 512)


def test_dropped_mid_request_is_resent_after_reconnecting() -> None:
    server = FakeServer(drop_at=3)
    try:
        backend = NbdBackend.connect(server.location, reconnect_timeout=5)
        server.data[0:512] = b"z" * 512
        out = bytearray(512)
        for _ in range(4):  # the third request is dropped unanswered, then resent
            backend.read(0, [memoryview(out)], 512)
            assert out == b"z" * 512
        assert server.connections == 2
        backend.close()
    finally:
        server.close()


def test_server_gone_fails_within_the_bound_then_recovers() -> None:
    server = FakeServer(drop_at=1)
    port = server.port
    backend = NbdBackend.connect(server.location, reconnect_timeout=0.5)
    server.close()  # the drop happens and nobody listens any more
    start = time.monotonic()
    with pytest.raises(BackendError) as info:
        backend.read(0, [memoryview(bytearray(512))], 512)
    assert info.value.errno == errno.ENOTCONN
    assert time.monotonic() - start < 5
    # A server back on the same port: the next request reconnects by itself.
    revived = FakeServer(port=port)
    try:
        revived.data[:3] = b"abc"
        out = bytearray(3)
        backend.read(0, [memoryview(out)], 3)
        assert out == b"abc"
    finally:
        backend.close()
        revived.close()


def test_unreachable_server_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match=f"cannot reach NBD server nbd://127.0.0.1:{port}/"):
        NbdBackend.connect(f"nbd://127.0.0.1:{port}/")


def test_large_requests_are_split(server: FakeServer) -> None:
    backend = NbdBackend.connect(server.location)
    backend._max_payload = 4096  # as if the server's maximum block were 4 KiB
    data = bytes(range(256)) * 64  # 16 KiB
    backend.write(0, [memoryview(data)], len(data))
    out = bytearray(len(data))
    before = server.requests
    backend.read(0, [memoryview(out)[:5000], memoryview(out)[5000:]], len(out))
    assert out == data and server.requests - before == 4
    backend.close()


# -- polled mode ------------------------------------------------------------------------------


def poll_until(backend: NbdBackend, finished: Callable[[], bool], timeout: float = 20) -> None:
    """`scsi_emulation.testing.poll_until` with this module's default bound."""
    testing.poll_until(backend, finished, timeout)


Tally = testing.CompletionTally


@contextlib.contextmanager
def poller(backend: NbdBackend) -> Iterator[None]:
    """The daemon's polling loop on a thread of its own while the block runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            fd = backend.poll_fileno()
            if fd is not None:
                with contextlib.suppress(OSError, ValueError):
                    select.select([fd], [], [], 0.02)
            else:
                time.sleep(0.02)
            backend.service()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_polled_queue_depth_32_in_one_batch() -> None:
    """32 plugged reads are outstanding at the server together and complete on the one
    polling thread, with no reader thread."""
    server = FakeServer(batch=32)
    try:
        backend = NbdBackend.connect(server.location)
        assert backend.start_polling()
        threads_before = threading.active_count()
        for i in range(32):
            server.data[i * 512 : (i + 1) * 512] = bytes([i]) * 512
        outs = [bytearray(512) for _ in range(32)]
        tally = Tally()
        backend.plug()
        for i, out in enumerate(outs):
            backend.submit_read(i * 512, [memoryview(out)], 512, tally)
        backend.unplug()
        poll_until(backend, lambda: tally.count() == 32)
        assert tally.errors == [None] * 32 and tally.threads == {threading.get_ident()}
        assert all(out == bytes([i]) * 512 for i, out in enumerate(outs))
        assert server.max_outstanding == 32
        assert threading.active_count() == threads_before  # no reader thread started
        backend.close()
    finally:
        server.close()


def test_polled_send_receives_while_the_socket_is_full() -> None:
    """The fake server answers each request before reading the next (blocking sendall):
    with 8 MiB read replies backed up, our 8 MiB writes only get out if the sender receives
    while it waits. Without that: no progress until the request timeout, then errors."""
    size = 8 << 20
    server = FakeServer(size=8 * size)
    try:
        backend = NbdBackend.connect(server.location, request_timeout=10)
        assert backend.start_polling()
        writes = [os.urandom(size) for _ in range(4)]
        for i in range(4, 8):
            server.data[i * size : (i + 1) * size] = writes[i - 4]
        reads = [bytearray(size) for _ in range(4)]
        tally = Tally()
        for i in range(4):
            backend.submit_read((i + 4) * size, [memoryview(reads[i])], size, tally)
        for i in range(4):  # each sent at once (not plugged): the socket fills up
            backend.submit_write(i * size, [memoryview(writes[i])], size, False, tally)
        poll_until(backend, lambda: tally.count() == 8, timeout=30)
        assert tally.errors == [None] * 8
        assert [bytes(r) for r in reads] == writes
        assert all(server.data[i * size : (i + 1) * size] == writes[i] for i in range(4))
        assert server.connections == 1
        backend.close()
    finally:
        server.close()


def test_polled_dropped_mid_request_is_resent_after_reconnecting() -> None:
    server = FakeServer(drop_at=3)
    try:
        backend = NbdBackend.connect(server.location, reconnect_timeout=5)
        assert backend.start_polling()
        server.data[0:512] = b"z" * 512
        out = bytearray(512)
        for _ in range(4):  # blocking calls on the polling thread; the third is resent
            backend.read(0, [memoryview(out)], 512)
            assert out == b"z" * 512
        assert server.connections == 2
        tally = Tally()
        backend.submit_read(0, [memoryview(out)], 512, tally)
        poll_until(backend, lambda: tally.count() == 1)  # the poller found the new socket
        assert tally.errors == [None]
        backend.close()
    finally:
        server.close()


def test_polled_no_reply_times_out_and_gives_up_after_max_attempts() -> None:
    server = FakeServer(batch=1000)  # holds every reply
    try:
        backend = NbdBackend.connect(server.location, request_timeout=0.3, reconnect_timeout=5)
        assert backend.start_polling()
        tally = Tally()
        backend.submit_read(0, [memoryview(bytearray(512))], 512, tally)
        poll_until(backend, lambda: tally.count() == 1, timeout=15)
        error = tally.errors[0]
        assert error is not None and error.errno == errno.EIO and "3 attempts" in str(error)
        # sent three times; the fourth connection finds it out of attempts
        assert server.connections == 4
        backend.close()
    finally:
        server.close()


def test_polled_server_gone_fails_within_the_bound_then_recovers() -> None:
    server = FakeServer(drop_at=1)
    port = server.port
    backend = NbdBackend.connect(server.location, reconnect_timeout=0.5)
    assert backend.start_polling()
    server.close()
    start = time.monotonic()
    with pytest.raises(BackendError) as info:
        backend.read(0, [memoryview(bytearray(512))], 512)
    assert info.value.errno == errno.ENOTCONN
    assert time.monotonic() - start < 5
    assert backend.poll_fileno() is None
    revived = FakeServer(port=port)
    try:
        revived.data[:3] = b"abc"
        out = bytearray(3)
        backend.read(0, [memoryview(out)], 3)
        assert out == b"abc" and backend.poll_fileno() is not None
    finally:
        backend.close()
        revived.close()


def test_polled_blocking_calls_from_workers_while_the_poller_runs(server: FakeServer) -> None:
    backend = NbdBackend.connect(server.location)
    assert backend.start_polling()
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(30):
                data = bytes([n, i]) * 256
                offset = (n * 30 + i) * 512
                backend.write(offset, [memoryview(data)], 512, i % 2 == 0)
                out = bytearray(512)
                backend.read(offset, [memoryview(out)], 512)
                assert out == data
            backend.flush()
            assert backend.allocation(0) == (True, 1 << 20)
        except BaseException as e:
            failures.append(e)

    with poller(backend):
        workers = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
    assert failures == []
    backend.close()


def test_polled_close_fails_what_is_outstanding() -> None:
    server = FakeServer(batch=1000)
    try:
        backend = NbdBackend.connect(server.location)
        assert backend.start_polling()
        tally = Tally()
        for _ in range(3):
            backend.submit_read(0, [memoryview(bytearray(512))], 512, tally)
        backend.service()
        backend.close()
        assert [e.errno if e else None for e in tally.errors] == [errno.ESHUTDOWN] * 3
        assert backend.poll_fileno() is None
    finally:
        server.close()


def test_polled_workers_and_poller_share_a_full_socket() -> None:
    """Worker threads' blocking 1 MiB writes and the poller's batches of 256 KiB reads on
    one connection to a server that answers before it reads on: senders, leaders and the
    poller take turns receiving; everything completes and the data is right."""
    size = 16 << 20
    server = FakeServer(size=size)
    try:
        backend = NbdBackend.connect(server.location, request_timeout=10)
        assert backend.start_polling()
        failures: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(8):
                    data = os.urandom(1 << 20)
                    offset = (n * 8 + i) << 20
                    backend.write(offset, [memoryview(data)], len(data))
                    out = bytearray(len(data))
                    backend.read(offset, [memoryview(out)], len(out))
                    assert out == data
            except BaseException as e:
                failures.append(e)

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for w in workers:
            w.start()
        tally = Tally()
        submitted = 0
        reads = [bytearray(256 << 10) for _ in range(8)]
        while any(w.is_alive() for w in workers):
            backend.plug()
            for buffer in reads:
                backend.submit_read(size - len(buffer), [memoryview(buffer)], len(buffer), tally)
            backend.unplug()
            submitted += len(reads)
            poll_until(backend, tally.reached(submitted), timeout=30)
        for w in workers:
            w.join()
        assert failures == []
        assert tally.errors == [None] * submitted and submitted
        assert server.connections == 1
        backend.close()
    finally:
        server.close()


class DeafServer(FakeServer):
    """Negotiates, then never reads a request nor answers (until closed)."""

    def _transmit(self, conn: socket.socket) -> None:
        while not self._stop:
            time.sleep(0.05)


def test_polled_send_to_a_server_that_stops_reading_is_bounded() -> None:
    """A 16 MiB write cannot leave: the submit gives up after the request timeout, the loss
    is handed to reconnection, and after max_attempts the write fails: never a hang."""
    server = DeafServer(size=32 << 20)
    try:
        backend = NbdBackend.connect(server.location, request_timeout=0.3, reconnect_timeout=2)
        assert backend.start_polling()
        tally = Tally()
        start = time.monotonic()
        data = memoryview(bytes(16 << 20))
        backend.submit_write(0, [data], len(data), False, tally)
        assert time.monotonic() - start < 2  # the sender gave up within about the timeout
        poll_until(backend, lambda: tally.count() == 1, timeout=20)
        error = tally.errors[0]
        assert error is not None and error.errno == errno.EIO
        backend.close()
    finally:
        server.close()
