"""The NBD client against real servers: nbdkit (memory, over TCP and a unix socket) and
qemu-nbd: every command, block status, many requests in flight, server errors, a server that
goes away mid-request; cross-checked with libnbd where its binding imports."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from scsi_emulation import testing
from scsi_emulation.backend import BackendError
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd import NbdBackend
from scsi_emulation.backends.nbd_connection import NbdConnection

from tests.backends.servers import NbdServer

pytestmark = pytest.mark.backends

Start = Callable[..., NbdServer]
MiB = 1 << 20


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_every_command(nbd_server: NbdServer) -> None:
    backend = NbdBackend.connect(nbd_server.uri)
    try:
        e = backend.export
        assert backend.size == 64 * MiB and not backend.read_only
        assert e.structured_replies and e.allocation_context is not None
        for flag in (
            p.FLAG_SEND_FLUSH,
            p.FLAG_SEND_FUA,
            p.FLAG_SEND_TRIM,
            p.FLAG_SEND_WRITE_ZEROES,
        ):
            assert e.has(flag)
        assert backend.supports_discard
        data = pattern(256 * 1024, 1)
        view = memoryview(data)
        backend.write(MiB, [view[:4096], view[4096:100_000], view[100_000:]], len(data), True)
        backend.write(8 * MiB, [view[:4096]], 4096, False)
        backend.flush()
        out = bytearray(len(data))
        o = memoryview(out)
        backend.read(MiB, [o[:1], o[1:77777], o[77777:]], len(out))
        assert out == data
        # allocation: the written range is data, far beyond is a hole
        mapped, length = backend.allocation(MiB)
        assert mapped and length >= 4096
        mapped, length = backend.allocation(32 * MiB)
        assert not mapped and length > 0
        # write zeroes (kept allocated) and discard (deallocating): both read as zeros
        backend.write_zeroes(MiB, 65536)
        backend.discard(MiB + 65536, 65536)
        backend.read(MiB, [o[:131072]], 131072)
        assert out[:131072] == bytes(131072) and out[131072:] == data[131072:]
        backend.trim(8 * MiB, 4096)  # contents undefined afterwards: only no error
        # reads of never-written space come back as zeros (holes)
        hole = bytearray(b"\xff" * 65536)
        backend.read(40 * MiB, [memoryview(hole)], len(hole))
        assert hole == bytes(65536)
    finally:
        backend.close()


def test_many_requests_in_flight(nbd_server: NbdServer) -> None:
    backend = NbdBackend.connect(nbd_server.uri)
    try:
        n, size = 64, 4096
        blocks = [pattern(size, i) for i in range(n)]
        left = threading.Semaphore(0)
        errors: list[BackendError | None] = []
        lock = threading.Lock()

        def done(error: BackendError | None) -> None:
            with lock:
                errors.append(error)
            left.release()

        for i, b in enumerate(blocks):
            backend.submit_write(i * size, [memoryview(b)], size, i % 2 == 0, done)
        for _ in range(n):
            assert left.acquire(timeout=20)
        outs = [bytearray(size) for _ in range(n)]
        for i, out in enumerate(outs):
            backend.submit_read(i * size, [memoryview(out)], size, done)
        for _ in range(n):
            assert left.acquire(timeout=20)
        assert errors == [None] * (2 * n)
        assert [bytes(o) for o in outs] == blocks
    finally:
        backend.close()


def test_cross_check_with_libnbd(nbd_server: NbdServer) -> None:
    nbd = pytest.importorskip("nbd", reason="libnbd's binding imports only under Debian's python3")
    if not hasattr(nbd, "NBD"):
        pytest.skip("an unrelated module named nbd is installed")
    backend = NbdBackend.connect(nbd_server.uri)
    h = nbd.NBD()
    try:
        data = pattern(65536, 9)
        backend.write(4096, [memoryview(data)], len(data), True)
        h.connect_uri(nbd_server.uri)
        assert h.get_size() == backend.size
        assert h.pread(len(data), 4096) == data
        h.pwrite(b"L" * 512, 0, nbd.CMD_FLAG_FUA)
        out = bytearray(512)
        backend.read(0, [memoryview(out)], 512)
        assert out == b"L" * 512
    finally:
        h.shutdown()
        backend.close()


def test_multi_conn(nbdkit_memory: NbdServer) -> None:
    backend = NbdBackend.connect(nbdkit_memory.uri, connections=3)
    try:
        assert backend.export.has(p.FLAG_CAN_MULTI_CONN) and backend.connection_count == 3
        for i in range(6):  # round-robin: each connection sees writes the others read
            backend.write(i * 4096, [memoryview(pattern(4096, i))], 4096, True)
        for i in range(6):
            out = bytearray(4096)
            backend.read(i * 4096, [memoryview(out)], 4096)
            assert out == pattern(4096, i)
    finally:
        backend.close()


def test_server_errors_become_backend_errors(nbdkit_custom: Start) -> None:
    full = nbdkit_custom("full", "1M")  # every write fails with ENOSPC
    backend = NbdBackend.connect(full.uri)
    try:
        with pytest.raises(BackendError) as info:
            backend.write(0, [memoryview(bytes(512))], 512)
        assert info.value.errno == errno.ENOSPC
    finally:
        backend.close()
    failing = nbdkit_custom(
        "memory", "1M", "error-pread=EIO", "error-pread-rate=1", filters=("error",)
    )
    backend = NbdBackend.connect(failing.uri)
    try:
        with pytest.raises(BackendError) as info:
            backend.read(0, [memoryview(bytearray(512))], 512)
        assert info.value.errno == errno.EIO
        backend.write(0, [memoryview(b"w" * 512)], 512)  # writes still work
    finally:
        backend.close()


def test_read_only_export(nbdkit_custom: Start) -> None:
    server = nbdkit_custom("-r", "memory", "1M")
    backend = NbdBackend.connect(server.uri)
    try:
        assert backend.read_only
        with pytest.raises(BackendError) as info:
            backend.write(0, [memoryview(bytes(512))], 512)
        assert info.value.errno == errno.EROFS
    finally:
        backend.close()


def test_missing_export_is_a_clear_error(qemu_nbd: NbdServer) -> None:
    uri = qemu_nbd.uri.rsplit("/", 1)[0] + "/nope"
    with pytest.raises(BackendError, match="nope"):
        NbdBackend.connect(uri)


def test_server_restarted_mid_request(nbdkit_custom: Start) -> None:
    """A read in flight when the server dies completes after the server comes back."""
    server = nbdkit_custom("memory", "1M", "rdelay=1", filters=("delay",))
    backend = NbdBackend.connect(server.uri, reconnect_timeout=20)
    try:
        result: list[BackendError | None] = []
        finished = threading.Event()

        def done(error: BackendError | None) -> None:
            result.append(error)
            finished.set()

        backend.submit_read(0, [memoryview(bytearray(512))], 512, done)
        time.sleep(0.2)
        server.restart()  # kill -9 and start again on the same port
        assert finished.wait(20)
        assert result == [None]
    finally:
        backend.close()


def test_server_gone_is_an_error_not_a_hang(nbdkit_memory: NbdServer) -> None:
    backend = NbdBackend.connect(nbdkit_memory.uri, reconnect_timeout=1)
    try:
        nbdkit_memory.stop()
        start = time.monotonic()
        with pytest.raises(BackendError) as info:
            backend.read(0, [memoryview(bytearray(512))], 512)
        assert info.value.errno == errno.ENOTCONN
        assert time.monotonic() - start < 10
    finally:
        backend.close()


# -- polled mode (StorageBackend.start_polling / service / plug) ------------------------------


def poll_until(backend: NbdBackend, finished: Callable[[], bool], timeout: float = 30) -> None:
    """`scsi_emulation.testing.poll_until` with this module's default bound."""
    testing.poll_until(backend, finished, timeout)


Tally = testing.CompletionTally


class CountingSocket:
    """Wraps a connection's socket to count ``sendmsg``/``send`` calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def sendmsg(self, *args: Any) -> int:
        self.sends += 1
        return self.sock.sendmsg(*args)

    def send(self, *args: Any) -> int:
        self.sends += 1
        return self.sock.send(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_polled_many_in_flight_single_thread(nbd_server: NbdServer) -> None:
    """64 writes then 64 reads in flight, all completed by one thread's poll loop, plugged
    in one batch each; the data reads back."""
    backend = NbdBackend.connect(nbd_server.uri)
    try:
        assert backend.start_polling()
        n, size = 64, 8192
        blocks = [pattern(size, i) for i in range(n)]
        tally = Tally()
        backend.plug()
        for i, b in enumerate(blocks):
            backend.submit_write(i * size, [memoryview(b)], size, i % 3 == 0, tally)
        backend.unplug()
        poll_until(backend, lambda: tally.count() == n)
        outs = [bytearray(size) for _ in range(n)]
        backend.plug()
        for i, out in enumerate(outs):
            o = memoryview(out)
            backend.submit_read(i * size, [o[:100], o[100:]], size, tally)
        backend.unplug()
        poll_until(backend, lambda: tally.count() == 2 * n)
        assert tally.errors == [None] * (2 * n)
        assert tally.threads == {threading.get_ident()}
        assert [bytes(o) for o in outs] == blocks
    finally:
        backend.close()


def test_polled_plug_sends_a_batch_in_one_call(nbdkit_memory: NbdServer) -> None:
    backend = NbdBackend.connect(nbdkit_memory.uri)
    try:
        assert backend.start_polling()
        connection = backend._connections[0]
        counting = CountingSocket(connection._sock)
        connection._sock = counting  # type: ignore[assignment]
        tally = Tally()
        outs = [bytearray(4096) for _ in range(32)]
        backend.plug()
        backend.plug()  # nested: only the outer unplug sends
        for i, out in enumerate(outs):
            backend.submit_read(i * 4096, [memoryview(out)], 4096, tally)
        backend.unplug()
        assert counting.sends == 0
        backend.unplug()
        assert counting.sends == 1
        poll_until(backend, lambda: tally.count() == 32)
        assert tally.errors == [None] * 32
        # Not plugged: one send per request.
        backend.submit_read(0, [memoryview(outs[0])], 4096, tally)
        backend.submit_read(0, [memoryview(outs[1])], 4096, tally)
        assert counting.sends == 3
        poll_until(backend, lambda: tally.count() == 34)
    finally:
        backend.close()


def test_polled_blocking_calls_from_the_poller_and_a_worker(nbd_server: NbdServer) -> None:
    """Blocking calls work on the polling thread (nobody else services) and on a worker
    thread while the poller runs, even while the poller holds a plugged batch."""
    backend = NbdBackend.connect(nbd_server.uri)
    try:
        assert backend.start_polling()
        data = pattern(65536, 3)
        backend.write(0, [memoryview(data)], len(data), True)  # on the polling thread
        out = bytearray(len(data))
        backend.read(0, [memoryview(out)], len(out))
        assert out == data
        backend.flush()
        mapped, _ = backend.allocation(0)
        assert mapped
        # plugged: the blocking call sends the held batch first, then its own command
        tally = Tally()
        backend.plug()
        backend.submit_read(0, [memoryview(bytearray(512))], 512, tally)
        backend.read(0, [memoryview(out)], 512)
        backend.unplug()
        poll_until(backend, lambda: tally.count() == 1)

        results: list[bytes | BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            try:
                for i in range(50):
                    chunk = pattern(4096, i)
                    backend.write(MiB + i * 4096, [memoryview(chunk)], 4096)
                    got = bytearray(4096)
                    backend.read(MiB + i * 4096, [memoryview(got)], 4096)
                    results.append(b"ok" if bytes(got) == chunk else b"mismatch")
                backend.write_zeroes(MiB, 4096)
            except BaseException as e:
                results.append(e)
            finally:
                stop.set()

        thread = threading.Thread(target=worker)
        thread.start()
        # The poller keeps its own I/O going meanwhile.
        tally = Tally()
        submitted = 0
        while not stop.is_set():
            backend.submit_read(2 * MiB, [memoryview(bytearray(4096))], 4096, tally)
            submitted += 1
            poll_until(backend, tally.reached(submitted))
        thread.join(30)
        assert results == [b"ok"] * 50
        assert tally.errors == [None] * submitted
    finally:
        backend.close()


def test_polled_large_writes_and_reads_do_not_deadlock(
    nbd_server: NbdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 x 8 MiB reads and 8 x 8 MiB writes in one plugged batch: far more than the socket
    buffers hold both ways, sent by the polling thread, which must keep receiving."""
    backend = NbdBackend.connect(nbd_server.uri)
    try:
        assert backend.start_polling()
        size = 8 * MiB
        writes = [os.urandom(size) for _ in range(8)]
        reads = [bytearray(size) for _ in range(8)]
        waits = 0
        wait_to_send = NbdConnection._wait_to_send

        def counting_wait(self: NbdConnection, sock: socket.socket) -> bool:
            nonlocal waits
            waits += 1
            return wait_to_send(self, sock)

        monkeypatch.setattr(NbdConnection, "_wait_to_send", counting_wait)
        tally = Tally()
        backend.plug()
        for i in range(8):
            backend.submit_read(i * size, [memoryview(reads[i])], size, tally)
        for i, w in enumerate(writes):
            backend.submit_write(i * size, [memoryview(w)], size, False, tally)
        backend.unplug()
        poll_until(backend, lambda: tally.count() == 16, timeout=60)
        assert tally.errors == [None] * 16
        assert waits  # the socket did fill up: the send waited (and received meanwhile)
        out = bytearray(size)
        backend.read(7 * size, [memoryview(out)], size)
        assert out == writes[7]
    finally:
        backend.close()


def test_polled_server_restarted_mid_request(nbdkit_custom: Start) -> None:
    """A read in flight when the server dies completes after the server comes back; the
    poll descriptor is None while reconnecting and a new one afterwards."""
    server = nbdkit_custom("memory", "1M", "rdelay=1", filters=("delay",))
    backend = NbdBackend.connect(server.uri, reconnect_timeout=20)
    try:
        assert backend.start_polling()
        first = backend.poll_fileno()
        assert first is not None
        tally = Tally()
        backend.submit_read(0, [memoryview(bytearray(512))], 512, tally)
        poll_until(backend, lambda: True)  # one service round
        time.sleep(0.2)
        server.restart()  # kill -9 and start again on the same port
        poll_until(backend, lambda: tally.count() == 1, timeout=30)
        assert tally.errors == [None]
        assert backend.poll_fileno() is not None
        assert backend._connections[0].generation == 1
    finally:
        backend.close()


def test_polled_server_gone_is_an_error_not_a_hang(nbdkit_memory: NbdServer) -> None:
    backend = NbdBackend.connect(nbdkit_memory.uri, reconnect_timeout=1)
    try:
        assert backend.start_polling()
        nbdkit_memory.stop()
        tally = Tally()
        start = time.monotonic()
        backend.submit_read(0, [memoryview(bytearray(512))], 512, tally)
        poll_until(backend, lambda: tally.count() == 1, timeout=15)
        error = tally.errors[0]
        assert error is not None and error.errno == errno.ENOTCONN
        # and a blocking call is bounded too (it reconnects, fails again)
        with pytest.raises(BackendError) as info:
            backend.read(0, [memoryview(bytearray(512))], 512)
        assert info.value.errno == errno.ENOTCONN
        assert time.monotonic() - start < 15
    finally:
        backend.close()


def test_polled_multi_conn_one_descriptor(nbdkit_memory: NbdServer) -> None:
    backend = NbdBackend.connect(nbdkit_memory.uri, connections=3)
    try:
        assert backend.start_polling() and backend.connection_count == 3
        assert len(backend.poll_filenos()) == 3
        tally = Tally()
        outs = [bytearray(4096) for _ in range(12)]
        for i in range(12):  # round-robin over the three connections
            backend.write(i * 4096, [memoryview(pattern(4096, i))], 4096)
        for i, out in enumerate(outs):
            backend.submit_read(i * 4096, [memoryview(out)], 4096, tally)
        poll_until(backend, lambda: tally.count() == 12)
        assert tally.errors == [None] * 12
        assert [bytes(o) for o in outs] == [pattern(4096, i) for i in range(12)]
    finally:
        backend.close()
