"""A Ceph RBD image as a storage back-end, through librbd's own Python binding.

Holds `RbdBackend`: asynchronous reads and writes (``aio_read`` / ``aio_write``, completed on
librbd's threads), flush, discard and write zeroes (``write_zeroes``: librbd deallocates whole
objects and zeroes the rest, so a discarded range reads as zeros, which plain ``discard``
with ``rbd_skip_partial_discard`` does not promise), allocation from ``diff_iterate``, and
the image size re-read on demand (`refresh_size`).

The ``rados`` / ``rbd`` modules are imported only when an image is opened: they come from
Debian's ``python3-rados`` / ``python3-rbd`` and import only under Debian's own
``/usr/bin/python3`` (a venv made from it with ``--system-site-packages`` works); without them
opening an ``rbd:`` location is a clear error and nothing else changes. The binding copies
data between Python bytes and librbd, one copy per request each way, which no caller can
avoid: ``aio_write`` converts its data to a ``char *`` (bytes or bytearray only, no
memoryview) and ``aio_read`` hands over a bytes object of its own. Completion callbacks run on
librbd's threads and take the GIL there, so they do as little as possible. Knows nothing
about SCSI.
"""

from __future__ import annotations

import errno
import importlib
import logging
from types import ModuleType
from typing import Any

from scsi_emulation.backend import BackendError, Buffers, Done, StorageBackend
from scsi_emulation.backends.uri import LocationError, RbdLocation, parse_location

__all__ = ["RbdBackend", "load_bindings"]

logger = logging.getLogger(__name__)

#: Seconds before a monitor or OSD operation fails instead of waiting for the cluster forever
#: (librados retries a lost connection by itself within this bound).
OP_TIMEOUT = 30
#: How far `allocation` looks ahead in one diff_iterate call.
_ALLOCATION_WINDOW = 1 << 30

_HINT = (
    "the Ceph bindings (rados, rbd) are not importable by this Python: install Debian's "
    "python3-rbd and python3-rados and run under /usr/bin/python3 (or a venv made with "
    "'/usr/bin/python3 -m venv --system-site-packages')"
)


def load_bindings() -> tuple[ModuleType, ModuleType]:
    """The ``rados`` and ``rbd`` modules, or `BackendError` (ENOSYS) saying how to get them."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError:
        raise BackendError(errno.ENOSYS, _HINT) from None


def _errno_of(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno.EIO


def _scatter(data: bytes, buffers: Buffers) -> None:
    """Copy ``data`` over ``buffers`` in order; what it does not cover (a read past the end
    of the image returns less) becomes zeros."""
    src = memoryview(data)
    pos = 0
    for view in buffers:
        n = len(view)
        chunk = src[pos : pos + n]
        view[: len(chunk)] = chunk
        if len(chunk) < n:
            view[len(chunk) :] = bytes(n - len(chunk))
        pos += n


class RbdBackend(StorageBackend):
    """An open RBD image; build it with `open`."""

    def __init__(
        self, cluster: Any, ioctx: Any, image: Any, location: RbdLocation, read_only: bool
    ) -> None:
        self._cluster = cluster
        self._ioctx = ioctx
        self._image = image
        self._location = location
        self._read_only = read_only
        self._size: int = image.size()
        self._rbd = importlib.import_module("rbd")
        self._closed = False

    @classmethod
    def open(
        cls, location: RbdLocation | str, *, read_only: bool = False, timeout: int = 10
    ) -> RbdBackend:
        """Connect to the cluster and open the image; `BackendError` with a message for the
        operator when the bindings, the cluster, the pool or the image are missing."""
        if isinstance(location, str):
            parsed = parse_location(location)
            if not isinstance(parsed, RbdLocation):
                raise LocationError(f"{location!r} is not an rbd: location")
            location = parsed
        rados, rbd = load_bindings()
        where = str(location)
        try:
            cluster = rados.Rados(rados_id=location.user) if location.user else rados.Rados()
            cluster.conf_read_file(location.conf)
            # connect(timeout=) alone does not bound an unreachable monitor (Ceph 16.2).
            cluster.conf_set("client_mount_timeout", str(timeout))
            cluster.conf_set("rados_osd_op_timeout", str(OP_TIMEOUT))
            cluster.conf_set("rados_mon_op_timeout", str(OP_TIMEOUT))
        except rados.Error as e:
            conf = location.conf or "the default ceph.conf"
            raise BackendError(_errno_of(e), f"{where}: cannot read {conf}: {e}") from None
        try:
            cluster.connect(timeout=timeout)
        except rados.Error as e:
            # No shutdown(): after a failed connect librados' shutdown can block for good.
            raise BackendError(
                _errno_of(e), f"{where}: cannot connect to the Ceph cluster: {e}"
            ) from None
        try:
            ioctx = cluster.open_ioctx(location.pool)
        except rados.Error as e:
            cluster.shutdown()
            raise BackendError(_errno_of(e), f"{where}: no pool {location.pool!r}: {e}") from None
        try:
            image = rbd.Image(ioctx, location.image, read_only=read_only)
        except rbd.Error as e:
            ioctx.close()
            cluster.shutdown()
            raise BackendError(_errno_of(e), f"{where}: cannot open image: {e}") from None
        return cls(cluster, ioctx, image, location, read_only)

    # -- properties --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def refresh_size(self) -> int:
        try:
            self._size = self._image.size()
        except self._rbd.Error as e:
            raise BackendError(_errno_of(e), f"{self._location}: size: {e}") from None
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return True

    @property
    def allocation_granularity(self) -> int:
        # Objects (4 MiB) are what librbd deallocates, but reporting that as the physical
        # block would mislead the guest's alignment; 4 KiB is what writes are best at.
        return 4096

    @property
    def asynchronous(self) -> bool:
        return True

    # -- asynchronous calls ------------------------------------------------------------------

    def _failed(self, what: str, offset: int, rc: int) -> BackendError:
        code = -rc if rc < 0 else errno.EIO
        return BackendError(code, f"{self._location}: {what} at {offset}: error {code}")

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        if not length:
            done(None)
            return

        def completed(completion: Any, data: bytes | None) -> None:
            # On a librbd thread, holding the GIL the daemon's thread also wants: short.
            if data is None or completion.get_return_value() < 0:
                done(self._failed("read", offset, completion.get_return_value()))
                return
            if len(buffers) == 1 and len(data) == length:
                buffers[0][:] = data  # the usual case: one buffer, all of it read
            else:
                _scatter(data, buffers)
            done(None)

        try:
            self._image.aio_read(offset, length, completed)
        except self._rbd.Error as e:
            done(BackendError(_errno_of(e), f"{self._location}: read at {offset}: {e}"))

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        if self._read_only:
            done(BackendError(errno.EROFS, f"{self._location} is read-only"))
            return
        if not length:
            done(None)
            return
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)

        def completed(completion: Any) -> None:
            rc = completion.get_return_value()
            if rc < 0:
                done(self._failed("write", offset, rc))
            elif durable:  # no FUA in the binding: flush the cache (a no-op without one)
                self.submit_flush(done)
            else:
                done(None)

        try:
            self._image.aio_write(data, offset, completed)
        except self._rbd.Error as e:
            done(BackendError(_errno_of(e), f"{self._location}: write at {offset}: {e}"))

    def submit_flush(self, done: Done) -> None:
        def completed(completion: Any) -> None:
            rc = completion.get_return_value()
            done(self._failed("flush", 0, rc) if rc < 0 else None)

        try:
            self._image.aio_flush(completed)
        except self._rbd.Error as e:
            done(BackendError(_errno_of(e), f"{self._location}: flush: {e}"))

    # -- blocking calls ----------------------------------------------------------------------

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        if not length:
            return
        try:
            data = self._image.read(offset, length)
        except self._rbd.Error as e:
            raise BackendError(_errno_of(e), f"{self._location}: read at {offset}: {e}") from None
        _scatter(data, buffers)

    def read_nowait(self, offset: int, buffers: Buffers, length: int) -> int:
        return 0  # every read is a round trip to an OSD: let a worker wait

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        if self._read_only:
            raise BackendError(errno.EROFS, f"{self._location} is read-only")
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
        try:
            self._image.write(data, offset)
            if durable:
                self._image.flush()
        except self._rbd.Error as e:
            raise BackendError(_errno_of(e), f"{self._location}: write at {offset}: {e}") from None

    def flush(self) -> None:
        try:
            self._image.flush()
        except self._rbd.Error as e:
            raise BackendError(_errno_of(e), f"{self._location}: flush: {e}") from None

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_discard=True)

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        if self._read_only:
            raise BackendError(errno.EROFS, f"{self._location} is read-only")
        end = min(offset + length, self._size)
        if end <= offset:
            return
        flags = 0 if may_discard else self._rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        try:
            self._image.write_zeroes(offset, end - offset, zero_flags=flags)
        except self._rbd.Error as e:
            raise BackendError(
                _errno_of(e), f"{self._location}: write zeroes at {offset}: {e}"
            ) from None

    def allocation(self, offset: int) -> tuple[bool, int]:
        size = self._size
        if offset >= size:
            return False, 0
        window = min(size - offset, _ALLOCATION_WINDOW)
        extents: list[tuple[int, int]] = []

        def seen(start: int, length: int, exists: bool) -> int:
            if exists:
                extents.append((start, length))
            return 0

        try:
            self._image.diff_iterate(offset, window, None, seen)
        except self._rbd.Error as e:
            raise BackendError(_errno_of(e), f"{self._location}: allocation: {e}") from None
        extents.sort()
        cur = offset
        for start, length in extents:
            if start > cur:
                break
            cur = max(cur, start + length)
        if cur > offset:
            return True, min(cur, size) - offset
        following = next((s for s, _ in extents if s > offset), offset + window)
        return False, min(following, size) - offset

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._image.close()
        finally:
            self._ioctx.close()
            self._cluster.shutdown()
