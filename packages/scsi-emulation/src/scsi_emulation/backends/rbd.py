"""A Ceph RBD image as a storage back-end, on librbd's C API (ctypes, `librbd`).

Holds `RbdBackend`. The data path is ``rbd_aio_readv`` / ``rbd_aio_writev`` / ``rbd_aio_flush``
with iovecs that point straight into the caller's buffers (no copy; a read-only buffer given to
a write is the one exception: it is copied once). Completions are not callbacks: the image's
eventfd is registered with ``rbd_set_image_notification``, librbd queues each finished
completion and signals the eventfd, and ``rbd_poll_io_events`` hands them over on a thread of
ours, so no Python ever runs on librbd's threads:

- not polled (the default): a thread of this back-end waits on the eventfd and runs the
  ``done`` callbacks (started with the first submission);
- polled (`start_polling`): no thread; the caller waits on `poll_fileno` and `service` runs
  the ``done`` callbacks on its own thread.

Blocking calls (`read`, `write`, `flush`, `discard`, `write_zeroes`, `allocation`) use librbd's
synchronous API, whose completions never reach the eventfd, so they work from any thread in
either mode. Discard is ``rbd_write_zeroes`` (whole objects deallocated, the rest zeroed: the
range reads as zeros afterwards, which plain ``rbd_discard`` with ``rbd_skip_partial_discard``
does not promise). Allocation comes from ``rbd_diff_iterate2``; a header watch
(``rbd_update_watch``) notices a resize done elsewhere (`take_size_change`).

Knows nothing about SCSI; the C declarations live in `librbd`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from scsi_emulation.backend import BackendError, Buffers, Done, StorageBackend
from scsi_emulation.backends import librbd
from scsi_emulation.backends.librbd import (
    EVENT_TYPE_EVENTFD,
    RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
    Cluster,
    ClusterSettings,
    DiffCallback,
    ImageInfo,
    IoCtx,
    Iovec,
    Library,
    UpdateCallback,
)
from scsi_emulation.backends.uri import (
    RBD_DEFAULT_TIMEOUT,
    LocationError,
    RbdLocation,
    parse_location,
)

__all__ = ["OP_TIMEOUT", "RbdBackend", "load_bindings"]

logger = logging.getLogger(__name__)

#: Seconds before a monitor or OSD operation fails instead of waiting for the cluster forever
#: (librados retries a lost connection by itself within this bound), unless the location says
#: otherwise (``rbd:POOL/IMAGE?timeout=SECONDS``, `RbdLocation.timeout`).
OP_TIMEOUT = RBD_DEFAULT_TIMEOUT
#: How far `allocation` looks ahead in one diff_iterate call.
_ALLOCATION_WINDOW = 1 << 30
#: Completions taken per rbd_poll_io_events call.
_POLL_BATCH = 64

# What a request in flight is; the first field of its pending entry.
_READ = 0
_WRITE = 1
_DURABLE_WRITE = 2  # a write followed by a flush before ``done`` (FUA / write cache off)
_FLUSH = 3
_WHAT = ("read", "write", "write", "flush")

_c_void_p = ctypes.c_void_p
_c_char = ctypes.c_char
_addressof = ctypes.addressof
_from_buffer = ctypes.c_char.from_buffer

#: A pending entry: (kind, done, offset, length, buffers, anchors). ``anchors`` keeps the ctypes
#: objects alive (and the buffers exported, so an mmap cannot be closed under librbd) until
#: the completion was taken.
_Pending = tuple[int, Done, int, int, Buffers, Any]

_iovec_arrays: dict[int, Any] = {}


def load_bindings() -> Library:
    """librados / librbd through ctypes, or `BackendError` (ENOSYS) saying how to install
    them (Debian: librbd1)."""
    return librbd.load()


def _clear(event_fd: int) -> None:
    """Reset a non-blocking eventfd (whether or not it was signalled)."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(event_fd)


def _zero_tail(buffers: Buffers, done: int) -> None:
    """Zero everything in ``buffers`` after their first ``done`` bytes (a short read: the
    image ends there)."""
    for view in buffers:
        n = view.nbytes
        if done >= n:
            done -= n
            continue
        view[done:] = bytes(n - done)
        done = 0


def _pin(view: memoryview, writable: bool) -> Any:
    """A ctypes object at ``view``'s memory (no copy), or a copy of a read-only ``view``
    when librbd only reads it (``writable`` False)."""
    try:
        return _from_buffer(view)
    except TypeError:
        if writable:
            raise
        return (_c_char * view.nbytes).from_buffer_copy(view)


def _iovecs(buffers: Buffers, writable: bool) -> tuple[Any, int, Any]:
    """(iovec array, count, anchors) for several buffers; empty ones are left out."""
    views = [view for view in buffers if view.nbytes]
    anchors = [_pin(view, writable) for view in views]
    count = len(anchors)
    array_type = _iovec_arrays.get(count)
    if array_type is None:
        array_type = _iovec_arrays.setdefault(count, Iovec * count)
    iov = array_type()
    for i, anchor in enumerate(anchors):
        iov[i].iov_base = _addressof(anchor)
        iov[i].iov_len = views[i].nbytes
    return iov, count, (anchors, iov)


class RbdBackend(StorageBackend):
    """An open RBD image; build it with `open`."""

    poll_interval = 0.5

    def __init__(
        self, cluster: Cluster, ioctx: IoCtx, image: int, location: RbdLocation, read_only: bool
    ) -> None:
        """Take over an open image (`open` builds one); closes nothing on failure."""
        lib = cluster.lib
        self._lib = lib
        self._cluster = cluster
        self._ioctx = ioctx
        self._image: int | None = image
        self._location = location
        self._where = str(location)
        self._read_only = read_only
        self._size = self._query_size(image)
        info = ImageInfo()
        librbd.check(lib.rbd_stat(image, ctypes.byref(info), ctypes.sizeof(info)), "stat")
        self._object_size = int(info.obj_size) or 4 << 20
        # Completions reach us through this eventfd (registered before any I/O: librbd marks
        # a completion for the event queue when it is submitted).
        self._event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            librbd.check(
                lib.rbd_set_image_notification(image, self._event_fd, EVENT_TYPE_EVENTFD),
                "set image notification",
            )
        except BackendError:
            os.close(self._event_fd)
            raise
        self._pending: dict[int, _Pending] = {}
        self._comps: Any = (_c_void_p * _POLL_BATCH)()  # elements read as int
        self._polled = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        #: True while submissions can go straight to librbd (open, and someone takes the
        #: completions: the thread runs or the caller polls); one check per request.
        self._ready = False
        self._state_lock = threading.Lock()
        # The C functions of the hot path, looked up once.
        self._create = lib.rbd_aio_create_completion
        self._readv = lib.rbd_aio_readv
        self._writev = lib.rbd_aio_writev
        self._aio_flush = lib.rbd_aio_flush
        self._poll_events = lib.rbd_poll_io_events
        self._return_value = lib.rbd_aio_get_return_value
        self._release = lib.rbd_aio_release
        self._header_changed = False
        self._watch_handle: int | None = None
        self._watch_callback = UpdateCallback(self._on_header_update)
        handle = ctypes.c_uint64()
        rc = lib.rbd_update_watch(image, ctypes.byref(handle), self._watch_callback, None)
        if rc < 0:  # a resize is then noticed on demand only (refresh_size)
            logger.info("%s: no header watch: %s", self._where, os.strerror(-rc))
        else:
            self._watch_handle = handle.value

    @classmethod
    def open(
        cls,
        location: RbdLocation | str,
        *,
        read_only: bool = False,
        timeout: int = 10,
        cache: bool | None = None,
    ) -> RbdBackend:
        """Connect to the cluster and open the image; `BackendError` with a one-line message
        for the operator when the libraries, the cluster, the pool or the image are missing.

        ``timeout`` bounds connecting (``client_mount_timeout``); the location's own
        ``timeout`` bounds every monitor and OSD operation afterwards: a request to a cluster
        that stopped answering fails with ETIMEDOUT after it, and the same open image serves
        again once the cluster is back. librbd's ``rbd_cache`` is the location's ``cache=``,
        else ``cache``, over ceph.conf (both None: ceph.conf's or librbd's default)."""
        if isinstance(location, str):
            parsed = parse_location(location)
            if not isinstance(parsed, RbdLocation):
                raise LocationError(f"{location!r} is not an rbd: location")
            location = parsed
        where = str(location)
        lib = load_bindings()
        if location.cache is not None:
            cache = location.cache
        settings = ClusterSettings(
            location.conf, location.user, timeout, location.timeout, rbd_cache=cache
        )
        try:
            cluster = Cluster(settings)
        except BackendError as e:
            raise BackendError(e.errno, f"{where}: {e.strerror}") from None
        try:
            ioctx = cluster.open_ioctx(location.pool)
        except BackendError as e:
            cluster.close()
            raise BackendError(e.errno, f"{where}: {e.strerror}") from None
        opener = lib.rbd_open_read_only if read_only else lib.rbd_open
        handle = _c_void_p()
        rc = opener(ioctx.handle, location.image.encode(), ctypes.byref(handle), None)
        if rc < 0:
            ioctx.close()
            cluster.close()
            raise BackendError(-rc, f"{where}: cannot open image: {os.strerror(-rc)}")
        image: int = handle.value or 0
        try:
            return cls(cluster, ioctx, image, location, read_only)
        except BackendError as e:
            lib.rbd_close(image)
            ioctx.close()
            cluster.close()
            raise BackendError(e.errno, f"{where}: {e.strerror}") from None

    # -- properties --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def _query_size(self, image: int) -> int:
        size = ctypes.c_uint64()
        # rbd_get_size refreshes the image header first when a watch said it changed.
        rc = self._lib.rbd_get_size(image, ctypes.byref(size))
        if rc < 0:
            raise BackendError(-rc, f"{self._where}: size: {os.strerror(-rc)}")
        return int(size.value)

    def refresh_size(self) -> int:
        self._size = self._query_size(self._open_image())
        return self._size

    def take_size_change(self) -> int | None:
        """The new size when the image was resized since the last call (noticed through the
        header watch; the size is re-read then), else None. Cheap when nothing changed: the
        daemon may call it after every `service` or on a timer. Raises `BackendError` when
        re-reading the size fails."""
        if not self._header_changed:
            return None
        self._header_changed = False
        old = self._size
        new = self.refresh_size()
        return new if new != old else None

    def _on_header_update(self, _arg: int | None) -> None:
        # On a librbd thread (holding the GIL only for this): record, nothing more.
        self._header_changed = True

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return True

    @property
    def allocation_granularity(self) -> int:
        # Objects (`object_size`, 4 MiB by default) are what librbd deallocates, but READ
        # CAPACITY(16) reports this as the physical block, which would mislead the guest's
        # alignment; 4 KiB is what writes are best at.
        return 4096

    @property
    def object_size(self) -> int:
        """The image's object size: the unit librbd allocates and deallocates."""
        return self._object_size

    @property
    def asynchronous(self) -> bool:
        return True

    # -- asynchronous calls ------------------------------------------------------------------

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        if not self._ready and not self._prepare(done):
            return
        if offset + length > self._size and self._past_end(offset, buffers, length, done):
            return
        self._submit_rw(_READ, self._readv, offset, buffers, length, done)

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        if not self._ready and not self._prepare(done):
            return
        if self._read_only:
            done(BackendError(errno.EROFS, f"{self._where} is read-only"))
            return
        kind = _DURABLE_WRITE if durable else _WRITE
        self._submit_rw(kind, self._writev, offset, buffers, length, done)

    def _submit_rw(
        self,
        kind: int,
        aio: Callable[..., int],
        offset: int,
        buffers: Buffers,
        length: int,
        done: Done,
    ) -> None:
        """Hand a read or write of ``buffers`` to librbd (``aio``: rbd_aio_readv/writev),
        mapped in place; only a write from read-only memory is copied (librbd reads it)."""
        writable = kind == _READ
        try:
            if len(buffers) == 1:
                view = buffers[0]
                anchor = _pin(view, writable)
                iov: Any = Iovec(_addressof(anchor), view.nbytes)
                count = 1
            else:
                iov, count, anchor = _iovecs(buffers, writable)
        except (TypeError, ValueError) as e:
            # An empty buffer lands here too (ctypes refuses to map 0 bytes): nothing to do.
            done(
                None
                if not length
                else BackendError(errno.EINVAL, f"{self._where}: {_WHAT[kind]} at {offset}: {e}")
            )
            return
        if not count or not length:
            done(None)
            return
        comp = _c_void_p()
        self._create(None, None, comp)  # only allocates: cannot fail
        c: int = comp.value  # type: ignore[assignment]
        # Recorded before submitting: the completion may be taken before the call returns.
        self._pending[c] = (kind, done, offset, length, buffers, (anchor, iov))
        rc = aio(self._image, iov, count, offset, c)
        if rc < 0:
            self._refused(c, rc)

    def submit_flush(self, done: Done) -> None:
        if not self._ready and not self._prepare(done):
            return
        comp = _c_void_p()
        self._create(None, None, comp)
        c: int = comp.value  # type: ignore[assignment]
        self._pending[c] = (_FLUSH, done, 0, 0, (), None)
        rc = self._aio_flush(self._image, c)
        if rc < 0:
            self._refused(c, rc)

    def _prepare(self, done: Done) -> bool:
        """The slow path of a submission: closed (``done`` gets EBADF, False), or the first
        one while not polled (start the completion thread)."""
        with self._state_lock:
            if self._image is None or self._closing:
                ready = False
            else:
                if not self._polled and self._thread is None:
                    self._start_thread()
                self._ready = ready = True
        if not ready:
            done(BackendError(errno.EBADF, f"{self._where} is closed"))
        return ready

    def _past_end(self, offset: int, buffers: Buffers, length: int, done: Done) -> bool:
        """A read that starts at or after the end (librbd refuses it: EINVAL) reads zeros;
        True when it was answered here. One that only runs past the end goes to librbd,
        which reads short (the tail is zeroed at completion)."""
        if offset < self._size:
            return False
        _zero_tail(buffers, 0)
        done(None)
        return True

    def _refused(self, c: int, rc: int) -> None:
        """librbd refused a submission outright (bad arguments): the completion was never
        queued, so release it here and report."""
        kind, done, offset, _, _, _ = self._pending.pop(c)
        self._release(c)
        done(self._failed(kind, offset, rc))

    def _failed(self, kind: int, offset: int, rc: int) -> BackendError:
        code = -rc if rc < 0 else errno.EIO
        what = _WHAT[kind]
        where = f"{what} at {offset}" if kind != _FLUSH else what
        logger.warning("%s: %s failed: %s", self._where, where, os.strerror(code))
        return BackendError(code, f"{self._where}: {where}: {os.strerror(code)}")

    def _drain(self) -> None:
        """Take every completion librbd queued and run its ``done`` (on this thread)."""
        image = self._image
        if image is None:
            return
        comps = self._comps
        pending = self._pending
        return_value = self._return_value
        release = self._release
        while True:
            n = self._poll_events(image, comps, _POLL_BATCH)
            if n <= 0:
                if n < 0:
                    logger.error("%s: poll io events: %s", self._where, os.strerror(-n))
                return
            for i in range(n):
                c: int = comps[i]
                # Forget it before releasing: librbd reuses the address for the next
                # completion, which another thread may be recording right now.
                entry = pending.pop(c, None)
                rc = return_value(c)
                release(c)
                if entry is None:
                    logger.error("%s: a completion nobody waits for (%#x)", self._where, c)
                    continue
                kind, done, offset, length, buffers, _ = entry
                try:
                    if rc < 0:
                        done(self._failed(kind, offset, rc))
                    elif kind == _READ:
                        if rc < length:  # the image ends inside the range
                            _zero_tail(buffers, rc)
                        done(None)
                    elif kind == _DURABLE_WRITE:
                        # No FUA in rbd_aio_writev: flush (a no-op without a write cache).
                        self.submit_flush(done)
                    else:
                        done(None)
                except Exception:
                    logger.exception("%s: a completion callback raised", self._where)
            if n < _POLL_BATCH:
                return

    # -- the completion thread (not polled) --------------------------------------------------

    def _start_thread(self) -> None:
        self._stopping = False
        thread = threading.Thread(
            target=self._run_completions, name=f"rbd-completions {self._where}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run_completions(self) -> None:
        poller = select.poll()
        poller.register(self._event_fd, select.POLLIN)
        while True:
            poller.poll()
            if self._stopping:
                return
            _clear(self._event_fd)
            self._drain()

    def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._event_fd, 1)
        if thread is not threading.current_thread():  # a ``done`` that closes: no self-join
            thread.join()
        self._thread = None
        # The wake-up above may have consumed librbd's signal: leave the eventfd readable.
        os.eventfd_write(self._event_fd, 1)

    # -- polled mode -------------------------------------------------------------------------

    def start_polling(self) -> bool:
        """From now on completions are delivered only by `service` (the completion thread, if
        one ran, is stopped). False once closed."""
        with self._state_lock:
            if self._image is None or self._closing:
                return False
            self._polled = True
            self._stop_thread()
            self._ready = True
        return True

    def poll_fileno(self) -> int | None:
        return self._event_fd if self._polled and self._image is not None else None

    def service(self) -> None:
        """Take the queued completions and run their ``done`` callbacks on this thread."""
        if not self._polled:
            return
        if self._image is not None:
            _clear(self._event_fd)
            self._drain()

    # -- blocking calls ----------------------------------------------------------------------

    def _open_image(self) -> int:
        image = self._image
        if image is None:
            raise BackendError(errno.EBADF, f"{self._where} is closed")
        return image

    def _error(self, what: str, rc: int) -> BackendError:
        code = -rc if rc < 0 else errno.EIO
        return BackendError(code, f"{self._where}: {what}: {os.strerror(code)}")

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        image = self._open_image()
        pos = offset
        for view in buffers:
            n = view.nbytes
            if not n:
                continue
            if pos >= self._size:
                view[:] = bytes(n)
            else:
                try:
                    anchor = _from_buffer(view)
                except (TypeError, ValueError) as e:
                    raise BackendError(errno.EINVAL, f"{self._where}: read buffer: {e}") from None
                rc = self._lib.rbd_read(image, pos, n, _addressof(anchor))
                if rc < 0:
                    raise self._error(f"read at {pos}", rc)
                if rc < n:
                    view[rc:] = bytes(n - rc)
            pos += n

    def read_nowait(self, offset: int, buffers: Buffers, length: int) -> int:
        return 0  # every read is a round trip to an OSD: let a worker wait

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        image = self._open_image()
        if self._read_only:
            raise BackendError(errno.EROFS, f"{self._where} is read-only")
        pos = offset
        for view in buffers:
            n = view.nbytes
            if not n:
                continue
            anchor = _pin(view, False)
            rc = self._lib.rbd_write(image, pos, n, _addressof(anchor))
            if rc < 0:
                raise self._error(f"write at {pos}", rc)
            pos += n
        if durable:
            self.flush()

    def flush(self) -> None:
        rc = self._lib.rbd_flush(self._open_image())
        if rc < 0:
            raise self._error("flush", rc)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_discard=True)

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        image = self._open_image()
        if self._read_only:
            raise BackendError(errno.EROFS, f"{self._where} is read-only")
        end = min(offset + length, self._size)
        if end <= offset:
            return
        flags = 0 if may_discard else RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        rc = self._lib.rbd_write_zeroes(image, offset, end - offset, flags, 0)
        if rc < 0:
            raise self._error(f"write zeroes at {offset}", rc)

    def allocation(self, offset: int) -> tuple[bool, int]:
        image = self._open_image()
        size = self._size
        if offset >= size:
            return False, 0
        window = min(size - offset, _ALLOCATION_WINDOW)
        extents: list[tuple[int, int]] = []

        def seen(start: int, length: int, exists: int, _arg: int | None) -> int:
            if exists:
                extents.append((start, length))
            return 0

        callback = DiffCallback(seen)
        # No snapshot to compare with: every allocated extent of the image is reported.
        rc = self._lib.rbd_diff_iterate2(image, None, offset, window, 1, 0, callback, None)
        if rc < 0:
            raise self._error("allocation", rc)
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

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait (bounded) for the requests in flight and run their ``done``, then close the
        image and the cluster connection. Idempotent."""
        with self._state_lock:
            image = self._image
            if image is None:
                return
            self._ready = False
            self._closing = True
            self._stop_thread()
        # A request in flight ends within the op timeout, failed if the cluster is gone (writes
        # queued for the exclusive lock take one more each); rbd_close waits for the rest.
        deadline = time.monotonic() + self._location.timeout + 1
        while self._pending and time.monotonic() < deadline:
            select.select([self._event_fd], [], [], 0.1)
            _clear(self._event_fd)
            self._drain()
        with self._state_lock:
            self._image = None
        if self._watch_handle is not None:
            self._lib.rbd_update_unwatch(image, self._watch_handle)
            self._watch_handle = None
        rc = self._lib.rbd_close(image)  # waits for whatever is still in flight
        if rc < 0:
            logger.error("%s: close: %s", self._where, os.strerror(-rc))
        left, self._pending = self._pending, {}
        for kind, done, offset, _, _, _ in left.values():
            logger.error("%s: %s at %d never completed", self._where, _WHAT[kind], offset)
            try:
                done(BackendError(errno.ECANCELED, f"{self._where}: closed while in flight"))
            except Exception:
                logger.exception("%s: a completion callback raised", self._where)
        self._ioctx.close()
        self._cluster.close()
        os.close(self._event_fd)
