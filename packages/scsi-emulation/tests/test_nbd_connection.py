"""The NBD socket layer and back-end against an in-process fake server: many requests in
flight on one connection, reconnection after a drop mid-request, bounded failure."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator

import pytest
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
