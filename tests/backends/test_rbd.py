"""Ceph RBD images as back-ends, on a single-node cluster started by the fixture: data in
both directions (blocking and asynchronous), flush, write zeroes and discard, allocation from
diff_iterate, a resize noticed, clear errors for a missing pool or image, SCSI on top."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from scsi_emulation.backend import BackendError
from scsi_emulation.backends.rbd import RbdBackend, load_bindings
from scsi_emulation.backends.uri import open_backend
from scsi_emulation.io_pool import IoWorkerPool

from tests.backends.scsi_checks import exercise, scsi_disk
from tests.backends.servers import CephCluster

pytestmark = pytest.mark.backends

MiB = 1 << 20


@pytest.fixture
def image(ceph_cluster: CephCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh 64 MiB image; yields its location URI."""
    rados, rbd = load_bindings()
    name = f"img-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    cluster: Any = rados.Rados(conffile=str(ceph_cluster.conf))
    cluster.connect()
    ioctx = cluster.open_ioctx("rbd")
    try:
        rbd.RBD().create(ioctx, name, 64 * MiB)
        yield f"rbd:rbd/{name}?conf={ceph_cluster.conf}"
        rbd.RBD().remove(ioctx, name)
    finally:
        ioctx.close()
        cluster.shutdown()


def test_data_flush_zeroes_allocation(image: str) -> None:
    backend = open_backend(image)
    assert isinstance(backend, RbdBackend)
    try:
        assert backend.size == 64 * MiB and backend.asynchronous and backend.supports_discard
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

        def done(error: BackendError | None) -> None:
            errors.append(error)
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
    finally:
        backend.close()


def test_resize_is_noticed(image: str, ceph_cluster: CephCluster) -> None:
    backend = RbdBackend.open(image)
    try:
        rados, rbd = load_bindings()
        cluster: Any = rados.Rados(conffile=str(ceph_cluster.conf))
        cluster.connect()
        try:
            ioctx = cluster.open_ioctx("rbd")
            name = image.split("/", 1)[1].split("?")[0]
            with rbd.Image(ioctx, name) as other:
                other.resize(128 * MiB)
            ioctx.close()
        finally:
            cluster.shutdown()
        assert backend.refresh_size() == 128 * MiB
    finally:
        backend.close()


def test_missing_image_and_pool(ceph_cluster: CephCluster) -> None:
    with pytest.raises(BackendError, match="cannot open image") as info:
        open_backend(f"rbd:rbd/absent?conf={ceph_cluster.conf}")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BackendError, match="no pool 'nopool'"):
        open_backend(f"rbd:nopool/x?conf={ceph_cluster.conf}")


def test_read_only(image: str) -> None:
    backend = open_backend(image, read_only=True)
    try:
        assert backend.read_only
        with pytest.raises(BackendError) as info:
            backend.write(0, [memoryview(bytes(512))], 512)
        assert info.value.errno == errno.EROFS
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
