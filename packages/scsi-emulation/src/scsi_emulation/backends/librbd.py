"""ctypes bindings to Ceph's C libraries (librados.so.2, librbd.so.1): what the RBD back-end uses.

Holds `load` (the libraries, loaded once, on first use, with the argument and result types of
every function declared here), the C layouts (`Iovec` = ``struct iovec``, `ImageInfo` =
``rbd_image_info_t``), the constants from ``rbd/librbd.h`` and ``rados/librados.h``, `check`
(negative return -> `BackendError`), and thin cold-path wrappers: `Cluster` (a connected
``rados_t``), `IoCtx` (``rados_ioctx_t``) and image creation / removal / resize for tests and
tools. Knows nothing of SCSI or of the back-end built on it (`scsi_emulation.backends.rbd`).

Signatures follow Ceph 16.2 (pacific) ``src/include/rbd/librbd.h`` and
``src/include/rados/librados.h``; every function declared here exists since Nautilus. The
libraries release the GIL on every call (``ctypes.CDLL``), so blocking calls do not stall other
Python threads.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from scsi_emulation.backend import BackendError

__all__ = [
    "EVENT_TYPE_EVENTFD",
    "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION",
    "Cluster",
    "ClusterSettings",
    "DiffCallback",
    "ImageInfo",
    "IoCtx",
    "Iovec",
    "Library",
    "UpdateCallback",
    "check",
    "create_image",
    "load",
    "remove_image",
    "resize_image",
]

logger = logging.getLogger(__name__)

#: Shared objects tried in order (Debian's librados2 / librbd1 packages).
LIBRADOS_NAMES = ("librados.so.2",)
LIBRBD_NAMES = ("librbd.so.1",)

INSTALL_HINT = (
    "cannot load librbd.so.1 / librados.so.2 (Ceph's C libraries): install Debian's librbd1 "
    "and librados2 packages ('apt-get install librbd1'); any Python 3 works with them"
)

# rbd/librbd.h: the kinds of descriptor rbd_set_image_notification accepts.
EVENT_TYPE_PIPE = 1
EVENT_TYPE_EVENTFD = 2
# rbd/librbd.h: zero_flags of rbd_write_zeroes: allocate the zeroed range instead of
# deallocating it.
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_uint64 = ctypes.c_uint64
_c_size_t = ctypes.c_size_t
_c_ssize_t = ctypes.c_ssize_t


class Iovec(ctypes.Structure):
    """``struct iovec`` (sys/uio.h): one buffer of a scatter/gather list."""

    _fields_ = (("iov_base", _c_void_p), ("iov_len", _c_size_t))


class ImageInfo(ctypes.Structure):
    """``rbd_image_info_t`` (rbd/librbd.h), filled by ``rbd_stat``."""

    _fields_ = (
        ("size", _c_uint64),
        ("obj_size", _c_uint64),
        ("num_objs", _c_uint64),
        ("order", _c_int),
        ("block_name_prefix", ctypes.c_char * 24),  # RBD_MAX_BLOCK_NAME_SIZE, deprecated
        ("parent_pool", ctypes.c_int64),  # deprecated
        ("parent_name", ctypes.c_char * 96),  # RBD_MAX_IMAGE_NAME_SIZE, deprecated
    )


#: ``int (*)(uint64_t offset, size_t len, int exists, void *arg)``: rbd_diff_iterate2's callback.
DiffCallback = ctypes.CFUNCTYPE(_c_int, _c_uint64, _c_size_t, _c_int, _c_void_p)
#: ``rbd_update_callback_t``: ``void (*)(void *arg)``, run on a librbd thread after the image's
#: header changed (a resize, a snapshot, ...).
UpdateCallback = ctypes.CFUNCTYPE(None, _c_void_p)

_P = ctypes.POINTER
# name: (restype, argtypes). Handles (rados_t, rados_ioctx_t, rbd_image_t, rbd_completion_t)
# are all ``void *``.
_RADOS_FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "rados_create": (_c_int, (_P(_c_void_p), _c_char_p)),
    "rados_conf_read_file": (_c_int, (_c_void_p, _c_char_p)),
    "rados_conf_set": (_c_int, (_c_void_p, _c_char_p, _c_char_p)),
    "rados_conf_get": (_c_int, (_c_void_p, _c_char_p, _c_char_p, ctypes.c_size_t)),
    "rados_connect": (_c_int, (_c_void_p,)),
    "rados_shutdown": (None, (_c_void_p,)),
    "rados_ioctx_create": (_c_int, (_c_void_p, _c_char_p, _P(_c_void_p))),
    "rados_ioctx_destroy": (None, (_c_void_p,)),
}
_RBD_FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "rbd_create": (_c_int, (_c_void_p, _c_char_p, _c_uint64, _P(_c_int))),
    "rbd_remove": (_c_int, (_c_void_p, _c_char_p)),
    "rbd_open": (_c_int, (_c_void_p, _c_char_p, _P(_c_void_p), _c_char_p)),
    "rbd_open_read_only": (_c_int, (_c_void_p, _c_char_p, _P(_c_void_p), _c_char_p)),
    "rbd_close": (_c_int, (_c_void_p,)),
    "rbd_get_size": (_c_int, (_c_void_p, _P(_c_uint64))),
    "rbd_stat": (_c_int, (_c_void_p, _P(ImageInfo), _c_size_t)),
    "rbd_resize": (_c_int, (_c_void_p, _c_uint64)),
    # blocking data calls
    "rbd_read": (_c_ssize_t, (_c_void_p, _c_uint64, _c_size_t, _c_void_p)),
    "rbd_write": (_c_ssize_t, (_c_void_p, _c_uint64, _c_size_t, _c_void_p)),
    "rbd_flush": (_c_int, (_c_void_p,)),
    "rbd_discard": (_c_int, (_c_void_p, _c_uint64, _c_uint64)),
    "rbd_write_zeroes": (_c_ssize_t, (_c_void_p, _c_uint64, _c_size_t, _c_int, _c_int)),
    "rbd_diff_iterate2": (
        _c_int,
        (
            _c_void_p,
            _c_char_p,
            _c_uint64,
            _c_uint64,
            ctypes.c_uint8,
            ctypes.c_uint8,
            DiffCallback,
            _c_void_p,
        ),
    ),
    # asynchronous data calls, completed through the image's event descriptor
    "rbd_set_image_notification": (_c_int, (_c_void_p, _c_int, _c_int)),
    "rbd_poll_io_events": (_c_int, (_c_void_p, _P(_c_void_p), _c_int)),
    "rbd_aio_create_completion": (_c_int, (_c_void_p, _c_void_p, _P(_c_void_p))),
    "rbd_aio_readv": (_c_int, (_c_void_p, _P(Iovec), _c_int, _c_uint64, _c_void_p)),
    "rbd_aio_writev": (_c_int, (_c_void_p, _P(Iovec), _c_int, _c_uint64, _c_void_p)),
    "rbd_aio_flush": (_c_int, (_c_void_p, _c_void_p)),
    "rbd_aio_get_return_value": (_c_ssize_t, (_c_void_p,)),
    "rbd_aio_release": (None, (_c_void_p,)),
    # header changes (resize)
    "rbd_update_watch": (_c_int, (_c_void_p, _P(_c_uint64), UpdateCallback, _c_void_p)),
    "rbd_update_unwatch": (_c_int, (_c_void_p, _c_uint64)),
}


class Library:
    """librados and librbd with every function used here typed; attributes are the C
    functions by name (``lib.rbd_aio_readv(...)``). Build it with `load`."""

    def __init__(self, rados: ctypes.CDLL, rbd: ctypes.CDLL) -> None:
        self.rados = rados
        self.rbd = rbd
        for lib, table in ((rados, _RADOS_FUNCTIONS), (rbd, _RBD_FUNCTIONS)):
            for name, (restype, argtypes) in table.items():
                func = getattr(lib, name)
                func.restype = restype
                func.argtypes = argtypes
                setattr(self, name, func)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names __init__ did not set: a function not declared above.
        raise AttributeError(f"librbd binding {name!r} is not declared")


_lock = threading.Lock()
_library: Library | None = None


def load() -> Library:
    """The libraries, loaded on first use; `BackendError` (ENOSYS) saying how to install
    them when they are missing."""
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            _library = Library(_open(LIBRADOS_NAMES), _open(LIBRBD_NAMES))
        return _library


def _open(names: tuple[str, ...]) -> ctypes.CDLL:
    error: OSError | None = None
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            error = e
    logger.error("loading %s failed: %s", " / ".join(names), error)
    raise BackendError(errno.ENOSYS, INSTALL_HINT)


def check(rc: int, what: str) -> int:
    """``rc`` when it is not negative; else `BackendError` with errno ``-rc`` and ``what``."""
    if rc < 0:
        raise BackendError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


# -- cold-path wrappers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """How to reach a cluster: ``conf`` (None: librados' default search), the client id
    (``user``, None: admin) and the bounds on waiting for it (seconds)."""

    conf: str | None = None
    user: str | None = None
    mount_timeout: int = 10
    op_timeout: int = 30
    #: librbd's cache (``rbd_cache``) over what ceph.conf says; None: leave it to ceph.conf.
    rbd_cache: bool | None = None


class Cluster:
    """A connected ``rados_t``; `close` (or ``with``) shuts it down."""

    def __init__(self, settings: ClusterSettings) -> None:
        """Create, configure and connect; `BackendError` saying which step failed (its message
        starts with ``cannot read`` or ``cannot connect to the Ceph cluster``)."""
        lib = load()
        self.lib = lib
        handle = _c_void_p()
        user = settings.user.encode() if settings.user else None
        check(lib.rados_create(ctypes.byref(handle), user), "cannot create a Ceph client")
        self.handle: int | None = handle.value
        conf = settings.conf.encode() if settings.conf else None
        try:
            # librbd dispatches each AIO on the calling thread instead of handing it to its
            # op work queue: the caller is the daemon's event loop, which then pays no thread
            # wake-up per request (submit_read measured 30 us of wall time for 5 us of CPU
            # with the hand-off; QD32 reads +15-20% in benchmarks/host_backends_bench.py).
            # An option set through the API outranks ceph.conf, so this one is ours to keep.
            check(
                lib.rados_conf_set(self.handle, b"rbd_non_blocking_aio", b"false"),
                "cannot set rbd_non_blocking_aio",
            )
            check(
                lib.rados_conf_read_file(self.handle, conf),
                f"cannot read {settings.conf or 'the default ceph.conf'}",
            )
            options: dict[str, object] = {
                # rados_connect alone waits for an unreachable monitor for good (Ceph 16.2).
                "client_mount_timeout": settings.mount_timeout,
                # librados retries a lost connection by itself within these bounds.
                "rados_osd_op_timeout": settings.op_timeout,
                "rados_mon_op_timeout": settings.op_timeout,
            }
            if settings.rbd_cache is not None:
                # QEMU's block/rbd.c does the same for cache=writeback/none. Safe either way:
                # a durable write is flushed before it completes, and until the first flush
                # (rbd_cache_writethrough_until_flush, on by default) librbd writes through,
                # for a guest that never flushes.
                options["rbd_cache"] = "true" if settings.rbd_cache else "false"
            for key, value in options.items():
                check(
                    lib.rados_conf_set(self.handle, key.encode(), str(value).encode()),
                    f"cannot set {key}",
                )
        except BackendError:
            lib.rados_shutdown(self.handle)
            self.handle = None
            raise
        rc = lib.rados_connect(self.handle)
        if rc < 0:
            # No rados_shutdown: after a failed connect it can block for good (Ceph 16.2);
            # the handle is leaked instead.
            self.handle = None
            check(rc, "cannot connect to the Ceph cluster")

    def open_ioctx(self, pool: str) -> IoCtx:
        """An I/O context on ``pool``; `BackendError` (ENOENT: no such pool)."""
        if self.handle is None:
            raise BackendError(errno.EBADF, "the cluster connection is closed")
        ioctx = _c_void_p()
        check(
            self.lib.rados_ioctx_create(self.handle, pool.encode(), ctypes.byref(ioctx)),
            f"no pool {pool!r}",
        )
        return IoCtx(self.lib, ioctx.value)

    def conf_get(self, key: str) -> str:
        """The value of configuration option ``key`` as this client runs with it."""
        if self.handle is None:
            raise BackendError(errno.EBADF, "the cluster connection is closed")
        out = ctypes.create_string_buffer(256)
        check(self.lib.rados_conf_get(self.handle, key.encode(), out, len(out)), key)
        return out.value.decode()

    def close(self) -> None:
        """Shut the connection down (idempotent)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.lib.rados_shutdown(handle)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IoCtx:
    """A ``rados_ioctx_t`` (one pool); `close` (or ``with``) destroys it."""

    def __init__(self, lib: Library, handle: int | None) -> None:
        self.lib = lib
        self.handle = handle

    def close(self) -> None:
        """Destroy the context (idempotent)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.lib.rados_ioctx_destroy(handle)

    def __enter__(self) -> IoCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_image(ioctx: IoCtx, name: str, size: int) -> None:
    """Create image ``name`` of ``size`` bytes with the default features and object size."""
    order = _c_int(0)
    check(
        ioctx.lib.rbd_create(ioctx.handle, name.encode(), size, ctypes.byref(order)),
        f"create image {name!r}",
    )


def remove_image(ioctx: IoCtx, name: str) -> None:
    """Remove image ``name`` (it must not be open anywhere)."""
    check(ioctx.lib.rbd_remove(ioctx.handle, name.encode()), f"remove image {name!r}")


def resize_image(ioctx: IoCtx, name: str, size: int) -> None:
    """Resize image ``name`` to ``size`` bytes (through an image handle of its own)."""
    lib = ioctx.lib
    image = _c_void_p()
    check(lib.rbd_open(ioctx.handle, name.encode(), ctypes.byref(image), None), f"open {name!r}")
    try:
        check(lib.rbd_resize(image.value, size), f"resize {name!r}")
    finally:
        lib.rbd_close(image.value)
