"""Ceph RBD images as back-ends (librbd through ctypes), on a single-node cluster: data in both
directions (blocking, asynchronous with a completion thread, and polled from one thread at
queue depth 32), zero-copy reads into mmap-backed memory, blocking calls while polled, flush,
write zeroes and discard, allocation from diff_iterate, a resize noticed, errors mapped to
BackendError, SCSI on top, and the daemon serving an RBD LU in polled mode.

The cluster is conftest's ``ceph_cluster``; it needs librbd (Debian librbd1), not Ceph's Python
bindings, so any interpreter runs these tests."""

from __future__ import annotations

import errno
import mmap
import os
import pathlib
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from scsi_emulation.backend import BackendError
from scsi_emulation.backends import librbd
from scsi_emulation.backends.rbd import RbdBackend
from scsi_emulation.backends.uri import open_backend
from scsi_emulation.io_pool import IoWorkerPool

from tests.backends.queue_depth_guest import QueueDepthGuest
from tests.backends.scsi_checks import exercise, scsi_disk
from tests.backends.servers import CephCluster
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

MiB = 1 << 20
BLOCK = 4096


@pytest.fixture
def rbd_conf(ceph_cluster: CephCluster) -> pathlib.Path:
    """ceph.conf of the session's single-node cluster with pool ``rbd``."""
    return ceph_cluster.conf


@pytest.fixture
def pool(rbd_conf: pathlib.Path) -> Iterator[librbd.IoCtx]:
    with (
        librbd.Cluster(librbd.ClusterSettings(conf=str(rbd_conf))) as cluster,
        cluster.open_ioctx("rbd") as ioctx,
    ):
        yield ioctx


@pytest.fixture
def image(
    pool: librbd.IoCtx, rbd_conf: pathlib.Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh 64 MiB image; yields its location URI."""
    name = f"img-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    librbd.create_image(pool, name, 64 * MiB)
    yield f"rbd:rbd/{name}?conf={rbd_conf}"
    librbd.remove_image(pool, name)


def _image_name(location: str) -> str:
    return location.split("/", 1)[1].split("?")[0]


def _wait(backend: RbdBackend, until: Callable[[], bool], timeout: float = 30) -> None:
    """The caller's poll loop: wait on poll_fileno, service(), until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "polled completions did not arrive"
        fd = backend.poll_fileno()
        assert fd is not None
        select.select([fd], [], [], backend.poll_interval)
        backend.service()


# -- the existing behaviour ------------------------------------------------------------------


def test_data_flush_zeroes_allocation(image: str) -> None:
    backend = open_backend(image)
    assert isinstance(backend, RbdBackend)
    try:
        assert backend.size == 64 * MiB and backend.asynchronous and backend.supports_discard
        assert backend.object_size == 4 * MiB
        assert backend.allocation(0) == (False, 64 * MiB)
        data = os.urandom(128 * 1024)
        v = memoryview(data)
        backend.write(4 * MiB, [v[:1000], v[1000:]], len(data), durable=True)
        out = bytearray(len(data))
        backend.read(4 * MiB, [memoryview(out)[:5], memoryview(out)[5:]], len(out))
        assert out == data
        mapped, length = backend.allocation(4 * MiB)
        assert mapped and length >= len(data)
        mapped, length = backend.allocation(0)
        assert not mapped and length == 4 * MiB
        backend.write_zeroes(4 * MiB, 4096)
        backend.discard(4 * MiB + 4096, 4096)
        backend.flush()
        backend.read(4 * MiB, [memoryview(out)], len(out))
        assert out[:8192] == bytes(8192) and out[8192:] == data[8192:]
    finally:
        backend.close()


def test_asynchronous_queue_depth(image: str) -> None:
    backend = RbdBackend.open(image)
    try:
        n = 32
        blocks = [os.urandom(4096) for _ in range(n)]
        left = threading.Semaphore(0)
        errors: list[BackendError | None] = []
        threads: set[str] = set()

        def done(error: BackendError | None) -> None:
            errors.append(error)
            threads.add(threading.current_thread().name)
            left.release()

        for i, b in enumerate(blocks):
            backend.submit_write(i * 4096, [memoryview(b)], 4096, i == 0, done)
        for _ in range(n):
            assert left.acquire(timeout=30)
        outs = [bytearray(4096) for _ in range(n)]
        for i, o in enumerate(outs):
            backend.submit_read(i * 4096, [memoryview(o)], 4096, done)
        backend.submit_flush(done)
        for _ in range(n + 1):
            assert left.acquire(timeout=30)
        assert errors == [None] * (2 * n + 1)
        assert [bytes(o) for o in outs] == blocks
        # Not polled: completions arrive on the back-end's own thread.
        assert threads == {f"rbd-completions {image.split('?')[0]}"}
        assert backend.poll_fileno() is None
    finally:
        backend.close()


def test_resize_is_noticed(image: str, rbd_conf: pathlib.Path) -> None:
    backend = RbdBackend.open(image)
    try:
        assert backend.take_size_change() is None
        with (
            librbd.Cluster(librbd.ClusterSettings(conf=str(rbd_conf))) as other,
            other.open_ioctx("rbd") as ioctx,
        ):
            librbd.resize_image(ioctx, _image_name(image), 128 * MiB)
        # The header watch reports the change (a notification from the OSD: poll for it).
        deadline = time.monotonic() + 10
        change = backend.take_size_change()
        while change is None and time.monotonic() < deadline:
            time.sleep(0.05)
            change = backend.take_size_change()
        assert change == 128 * MiB and backend.size == 128 * MiB
        assert backend.take_size_change() is None
        assert backend.refresh_size() == 128 * MiB
    finally:
        backend.close()


def test_missing_image_and_pool(rbd_conf: pathlib.Path) -> None:
    with pytest.raises(BackendError, match="cannot open image") as info:
        open_backend(f"rbd:rbd/absent?conf={rbd_conf}")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BackendError, match="no pool 'nopool'") as info:
        open_backend(f"rbd:nopool/x?conf={rbd_conf}")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BackendError, match=r"cannot read /nonexistent/ceph\.conf"):
        open_backend("rbd:rbd/x?conf=/nonexistent/ceph.conf")


def test_unreachable_cluster(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth client required = none\n")
    start = time.monotonic()
    with pytest.raises(BackendError, match="cannot connect to the Ceph cluster"):
        RbdBackend.open(f"rbd:rbd/x?conf={conf}", timeout=2)
    assert time.monotonic() - start < 20


def test_read_only(image: str) -> None:
    backend = open_backend(image, read_only=True)
    try:
        assert backend.read_only
        with pytest.raises(BackendError) as info:
            backend.write(0, [memoryview(bytes(512))], 512)
        assert info.value.errno == errno.EROFS
        seen: list[BackendError | None] = []
        backend.submit_write(0, [memoryview(bytes(512))], 512, False, seen.append)
        assert len(seen) == 1 and seen[0] is not None and seen[0].errno == errno.EROFS
    finally:
        backend.close()


def test_scsi_over_rbd(image: str) -> None:
    pool = IoWorkerPool(4, name="rbd-test")
    target = scsi_disk(open_backend(image), pool)
    try:
        exercise(target, 64 * MiB // 512)
    finally:
        target.close()
        pool.close()


# -- polled mode -----------------------------------------------------------------------------


def test_polled_queue_depth_32_single_thread(image: str) -> None:
    """32 requests in flight from one thread that polls: writes (some durable), then reads
    resubmitted from their own ``done`` until 256 completed, each one's data checked."""
    backend = RbdBackend.open(image)
    try:
        assert backend.poll_fileno() is None
        assert backend.start_polling()
        assert backend.poll_fileno() is not None
        me = threading.get_ident()
        depth, blocks_n, total = 32, 64, 256
        blocks = [os.urandom(BLOCK) for _ in range(blocks_n)]
        wrote: list[BackendError | None] = []

        def write_done(error: BackendError | None) -> None:
            assert threading.get_ident() == me
            wrote.append(error)

        backend.plug()
        for i, b in enumerate(blocks):
            backend.submit_write(i * BLOCK, [memoryview(b)], BLOCK, i % 8 == 0, write_done)
        backend.unplug()
        _wait(backend, lambda: len(wrote) == blocks_n)
        assert wrote == [None] * blocks_n

        buffers = [bytearray(BLOCK) for _ in range(depth)]
        checked: list[int] = []
        submitted = 0
        in_flight = 0

        def submit(slot: int) -> None:
            nonlocal submitted, in_flight
            index = (submitted * 7) % blocks_n
            submitted += 1
            in_flight += 1
            buffers[slot][:] = bytes(BLOCK)

            def done(error: BackendError | None) -> None:
                nonlocal in_flight
                assert threading.get_ident() == me and error is None
                in_flight -= 1
                assert bytes(buffers[slot]) == blocks[index]
                checked.append(index)
                if submitted < total:
                    backend.plug()
                    submit(slot)
                    backend.unplug()

            backend.submit_read(index * BLOCK, [memoryview(buffers[slot])], BLOCK, done)

        max_in_flight = 0
        for slot in range(depth):
            submit(slot)
        max_in_flight = in_flight
        _wait(backend, lambda: len(checked) == total)
        assert max_in_flight == depth and in_flight == 0
        assert sorted(set(checked)) == list(range(blocks_n))
        flushed: list[BackendError | None] = []
        backend.submit_flush(flushed.append)
        _wait(backend, lambda: bool(flushed))
        assert flushed == [None]
    finally:
        backend.close()


def test_polled_completions_wait_for_service(image: str) -> None:
    """While polled, nothing completes until service() runs, and a timeout-driven service()
    with nothing ready is harmless."""
    backend = RbdBackend.open(image)
    try:
        assert backend.start_polling()
        backend.service()  # nothing in flight
        seen: list[BackendError | None] = []
        backend.submit_write(0, [memoryview(b"x" * BLOCK)], BLOCK, False, seen.append)
        fd = backend.poll_fileno()
        assert fd is not None
        readable, _, _ = select.select([fd], [], [], 10)
        assert readable and seen == []  # librbd finished; ``done`` waits for service()
        backend.service()
        assert seen == [None]
        backend.service()
        assert seen == [None]
    finally:
        backend.close()


def test_blocking_calls_while_polled(image: str) -> None:
    """Blocking calls work while polled, from the polling thread itself (nobody services
    meanwhile) and from another thread, with asynchronous requests still unserviced."""
    backend = RbdBackend.open(image)
    try:
        assert backend.start_polling()
        pending: list[BackendError | None] = []
        out = bytearray(BLOCK)
        backend.submit_read(0, [memoryview(out)], BLOCK, pending.append)
        data = os.urandom(2 * BLOCK)
        backend.write(MiB, [memoryview(data)], len(data), durable=True)
        got = bytearray(len(data))
        backend.read(MiB, [memoryview(got)], len(got))
        assert got == data
        backend.write_zeroes(MiB, BLOCK)
        backend.flush()
        assert backend.allocation(MiB)[0]
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                buf = bytearray(len(data))
                backend.read(MiB, [memoryview(buf)], len(buf))
                assert buf == bytes(BLOCK) + data[BLOCK:]
                backend.discard(MiB, 2 * BLOCK)
                backend.read(MiB, [memoryview(buf)], len(buf))
                assert buf == bytes(2 * BLOCK)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
        assert not thread.is_alive() and errors == []
        assert pending == []  # still waiting for service()
        _wait(backend, lambda: bool(pending))
        assert pending == [None]
    finally:
        backend.close()


def test_zero_copy_reads_into_mmap(image: str) -> None:
    """Reads land straight in mmap-backed memory (scattered over several slices, as guest
    memory is): the mapping is pinned while the read is in flight."""
    backend = RbdBackend.open(image)
    region = mmap.mmap(-1, 1 * MiB)
    try:
        assert backend.start_polling()
        data = os.urandom(3 * BLOCK)
        backend.write(2 * MiB, [memoryview(data)], len(data))
        view = memoryview(region)
        parts = [
            view[8192 : 8192 + 100],
            view[65536 : 65536 + BLOCK],
            view[300000 : 300000 + 2 * BLOCK - 100],
        ]
        seen: list[BackendError | None] = []
        backend.submit_read(2 * MiB, parts, len(data), seen.append)
        del parts
        view.release()
        with pytest.raises(BufferError):  # exported to librbd until the completion
            region.close()
        _wait(backend, lambda: bool(seen))
        assert seen == [None]
        assert region[8192 : 8192 + 100] == data[:100]
        assert region[65536 : 65536 + BLOCK] == data[100 : 100 + BLOCK]
        assert region[300000 : 300000 + 2 * BLOCK - 100] == data[100 + BLOCK :]
        assert region[:8192] == bytes(8192)  # nothing written around the slices
    finally:
        backend.close()
        region.close()  # released once the completion was taken


def test_errors_and_edges_polled(image: str) -> None:
    """Past the end reads zeros; a write past the end fails with librbd's errno; a read-only
    buffer is refused for a read but copied for a write; empty requests complete at once;
    after close every call reports EBADF."""
    backend = RbdBackend.open(image)
    try:
        assert backend.start_polling()
        size = backend.size
        seen: list[BackendError | None] = []
        block = bytearray(b"\xff" * (2 * BLOCK))
        backend.submit_read(size, [memoryview(block)], len(block), seen.append)
        assert seen == [None] and block == bytes(2 * BLOCK)  # answered inline
        backend.write(size - BLOCK, [memoryview(b"\x01" * BLOCK)], BLOCK)
        block[:] = b"\xff" * len(block)
        backend.submit_read(size - BLOCK, [memoryview(block)], len(block), seen.append)
        _wait(backend, lambda: len(seen) == 2)
        assert seen[1] is None and block == b"\x01" * BLOCK + bytes(BLOCK)
        backend.submit_write(size, [memoryview(bytes(BLOCK))], BLOCK, False, seen.append)
        _wait(backend, lambda: len(seen) == 3)
        error = seen[2]
        assert isinstance(error, BackendError) and error.errno == errno.EINVAL
        backend.submit_read(0, [memoryview(bytes(BLOCK))], BLOCK, seen.append)
        error = seen[3]
        assert isinstance(error, BackendError) and error.errno == errno.EINVAL
        payload = os.urandom(BLOCK)
        backend.submit_write(8 * BLOCK, [memoryview(payload)], BLOCK, True, seen.append)
        backend.submit_read(0, [], 0, seen.append)
        assert seen[4:] == [None]  # the empty read, at once; the write is in flight
        _wait(backend, lambda: len(seen) == 6)
        assert seen[5] is None
        out = bytearray(BLOCK)
        backend.read(8 * BLOCK, [memoryview(out)], BLOCK)
        assert out == payload
        out[:] = b"\xff" * BLOCK
        backend.read(size, [memoryview(out)], BLOCK)  # blocking, past the end: zeros
        assert out == bytes(BLOCK)
    finally:
        backend.close()
    backend.close()  # idempotent
    after: list[BackendError | None] = []
    backend.submit_read(0, [memoryview(bytearray(BLOCK))], BLOCK, after.append)
    backend.submit_flush(after.append)
    assert [e.errno if e else None for e in after] == [errno.EBADF, errno.EBADF]
    with pytest.raises(BackendError) as info:
        backend.read(0, [memoryview(bytearray(BLOCK))], BLOCK)
    assert info.value.errno == errno.EBADF
    assert backend.poll_fileno() is None and not backend.start_polling()


def test_thread_then_polled(image: str) -> None:
    """I/O before start_polling completes on the back-end's thread; after it, on the
    caller's, and the thread is gone."""
    backend = RbdBackend.open(image)
    try:
        done = threading.Event()
        backend.submit_flush(lambda error: done.set())
        assert done.wait(30)
        names = {t.name for t in threading.enumerate()}
        assert any(n.startswith("rbd-completions") for n in names)
        assert backend.start_polling()
        names = {t.name for t in threading.enumerate()}
        assert not any(n.startswith("rbd-completions") for n in names)
        seen: list[int] = []
        backend.submit_flush(lambda error: seen.append(threading.get_ident()))
        _wait(backend, lambda: bool(seen))
        assert seen == [threading.get_ident()]
    finally:
        backend.close()


# -- through the daemon ----------------------------------------------------------------------


async def test_daemon_polls_rbd_at_queue_depth_32(image: str, tmp_path: pathlib.Path) -> None:
    """The daemon serves an RBD LU in polled mode: 32 WRITE(10)s then 32 READ(10)s in flight
    from the project's vhost-user front-end, data moving straight between guest memory and
    librbd; every command GOOD, and what was written is read back."""
    span = 1 * MiB
    socket = tmp_path / "vds.sock"
    argv = [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", image,
    ]  # fmt: skip
    daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")
    payload = bytes(range(1, 256)) * 16 + bytes(16)  # 4096 bytes
    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            await guest.clear_unit_attention()
            for slot in range(32):
                _, _, data = guest._slot(slot, BLOCK)
                guest.memory.memory.slice(data, BLOCK)[:] = payload
            wrote = await guest.keep_in_flight(32, 1.0, write=True, span_blocks=span // 512)
            for slot in range(32):
                _, _, data = guest._slot(slot, BLOCK)
                guest.memory.memory.slice(data, BLOCK)[:] = bytes(BLOCK)
            read = await guest.keep_in_flight(32, 1.0, span_blocks=span // 512)
            for slot in range(32):
                _, _, data = guest._slot(slot, BLOCK)
                assert bytes(guest.memory.memory.slice(data, BLOCK)) == payload, slot
        finally:
            await guest.aclose()
    log = daemon.log()
    print(f"\nRBD through the daemon: writes {wrote.iops:.0f}/s, reads {read.iops:.0f}/s")
    assert wrote.failed == 0 and read.failed == 0, (wrote, read, log)
    assert wrote.completed > span // BLOCK and read.completed > 32, (wrote, read)
    assert "Traceback" not in log, log
    backend = RbdBackend.open(image)
    try:
        content = bytearray(span)
        backend.read(0, [memoryview(content)], span)
        assert content == payload * (span // BLOCK)
    finally:
        backend.close()


def test_aio_is_dispatched_on_the_calling_thread(rbd_conf: pathlib.Path) -> None:
    """rbd_non_blocking_aio=false: no librbd thread hop per request from the event loop."""
    with librbd.Cluster(librbd.ClusterSettings(conf=str(rbd_conf))) as cluster:
        assert cluster.conf_get("rbd_non_blocking_aio") == "false"
        assert cluster.conf_get("rados_osd_op_timeout") == "30"  # the bounds set with it


@pytest.mark.parametrize(
    ("suffix", "write_cache", "expected"),
    [
        ("", True, "true"),  # a logical unit with a write cache: librbd's cache too
        ("", False, "false"),  # write-through LU: no librbd cache either
        ("&cache=off", True, "false"),  # the location's word wins
        ("&cache=on", False, "true"),
    ],
)
def test_librbd_cache_follows_the_write_cache(
    image: str, suffix: str, write_cache: bool, expected: str
) -> None:
    """As QEMU's cache= does (block/rbd.c), over the ceph.conf these tests write, which says
    ``rbd cache = false``."""
    backend = open_backend(image + suffix, write_cache=write_cache)
    try:
        assert isinstance(backend, RbdBackend)
        assert backend._cluster.conf_get("rbd_cache") == expected
        # Until the first flush librbd writes through (its default, which we keep): a guest
        # that never flushes loses nothing.
        assert backend._cluster.conf_get("rbd_cache_writethrough_until_flush") == "true"
    finally:
        backend.close()
