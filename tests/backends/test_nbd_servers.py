"""The NBD client against real servers: nbdkit (memory, over TCP and a unix socket) and
qemu-nbd: every command, block status, many requests in flight, server errors, a server that
goes away mid-request; cross-checked with libnbd where its binding imports."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

import pytest
from scsi_emulation.backend import BackendError
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd import NbdBackend

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
