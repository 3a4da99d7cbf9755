"""Storage back-ends: the interface a block device stores its data through, and raw files.

Holds `StorageBackend` (size, read into buffers, write from buffers, flush, discard, write
zeroes, allocation status) and `FileBackend`, which serves a raw image file (or a block device
node) with ``os.preadv``/``os.pwritev`` straight into and out of the caller's memoryviews,
``fallocate(PUNCH_HOLE)`` for discard and ``SEEK_DATA``/``SEEK_HOLE`` for allocation status.
Knows nothing about SCSI: offsets and lengths are in bytes, errors are `BackendError`.

The asynchronous half of the interface (`StorageBackend.submit_read` / `submit_write` /
`submit_flush`, completion through a ``done(error)`` callback) lets a remote back-end (NBD, RBD)
keep many requests in flight; its default runs the blocking call and reports at once, so a
local back-end needs nothing more. Other back-ends live in `scsi_emulation.backends`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

__all__ = ["BackendError", "Done", "FileBackend", "StorageBackend"]

logger = logging.getLogger(__name__)

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)

Buffers = Sequence[memoryview]


class BackendError(OSError):
    """An I/O error from the storage; ``errno`` says which (ENOSPC, EIO, ...)."""


#: Completion of an asynchronous back-end call: None on success, else the error. Called
#: exactly once, from any thread (possibly before ``submit_*`` returns); it must not raise.
Done = Callable[[BackendError | None], None]


class StorageBackend(ABC):
    """Byte-addressed storage behind a logical unit.

    ``read``/``write`` move exactly ``length`` bytes between ``offset`` and ``buffers`` (whose
    total length is ``length``) or raise `BackendError`. Reading past the end of the storage
    yields zeros. Methods block; `read_nowait` is the non-blocking fast path.
    """

    @property
    @abstractmethod
    def size(self) -> int:
        """Current size in bytes."""

    @property
    def read_only(self) -> bool:
        """Whether writes are refused by the storage itself."""
        return False

    @property
    def supports_discard(self) -> bool:
        """Whether `discard` deallocates (and later reads return zeros)."""
        return False

    @property
    def allocation_granularity(self) -> int:
        """The unit in which space is allocated and discarded (a file system block)."""
        return 4096

    @property
    def logical_block_size(self) -> int:
        """The smallest unit the storage addresses: every offset and length the caller passes
        must be a multiple of it (1: byte-addressable)."""
        return 1

    @property
    def physical_block_size(self) -> int:
        """The unit the storage writes without read-modify-write (READ CAPACITY(16) LBPPBE)."""
        return self.allocation_granularity

    @property
    def asynchronous(self) -> bool:
        """Whether ``submit_*`` complete later on another thread: a caller with many commands
        in flight should use them rather than the blocking calls (remote storage)."""
        return False

    def refresh_size(self) -> int:
        """Re-read the size (after the storage was resized outside); return it."""
        return self.size

    def take_size_change(self) -> int | None:
        """The new size, once, after the storage noticed by itself that it was resized
        outside (RBD watches its image header); None otherwise. Cheap: callers poll it."""
        return None

    @abstractmethod
    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        """Fill ``buffers`` with ``length`` bytes from ``offset``."""

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        """Start `read`; ``done(error)`` when it finished. Default: the blocking call."""
        try:
            self.read(offset, buffers, length)
        except BackendError as e:
            done(e)
            return
        done(None)

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        """Start `write`; ``done(error)`` when it finished. Default: the blocking call.

        ``buffers`` must stay untouched until ``done`` runs."""
        try:
            self.write(offset, buffers, length, durable)
        except BackendError as e:
            done(e)
            return
        done(None)

    def submit_flush(self, done: Done) -> None:
        """Start `flush`; ``done(error)`` when it finished. Default: the blocking call."""
        try:
            self.flush()
        except BackendError as e:
            done(e)
            return
        done(None)

    def read_nowait(self, offset: int, buffers: Buffers, length: int) -> int:
        """Read without blocking; return how many leading bytes were filled (0..length).

        The default blocks and fills everything.
        """
        self.read(offset, buffers, length)
        return length

    @abstractmethod
    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        """Write ``length`` bytes from ``buffers`` at ``offset``; ``durable`` means on stable
        storage before returning (FUA, or the write cache is off)."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; afterwards it reads as zeros. Default: write zeros."""
        self.write_zeroes(offset, length, may_discard=False)

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        """Make a range read as zeros, deallocating it when ``may_discard``."""

    def allocation(self, offset: int) -> tuple[bool, int]:
        """(mapped, length) of the extent that starts at ``offset``. Default: all mapped."""
        return True, max(self.size - offset, 0)

    # -- optional: completions delivered on the caller's thread --------------------------
    #
    # A remote back-end normally completes `submit_*` from a thread of its own, and the
    # caller then hops back to its own thread: two thread hand-offs (and GIL hand-offs) per
    # request. A caller with an event loop can instead drive the back-end itself: after
    # `start_polling()` returned True, it waits until `poll_fileno()` is readable (or
    # `poll_interval` seconds passed) and calls `service()`, which runs the due ``done``
    # callbacks on the caller's thread. Blocking calls (`read`, `write`, ...) keep working
    # from any thread, the polling one included. Every call here is a no-op by default.

    #: While polled: call `service` at least this often, readable or not (timeouts).
    poll_interval: float = 0.5

    def start_polling(self) -> bool:
        """Deliver completions only from `service` from now on (call it before any I/O is
        in flight, from the thread that will call `service`). False: not supported, nothing
        changed, completions keep arriving on the back-end's own threads."""
        return False

    def poll_fileno(self) -> int | None:
        """While polled: the descriptor whose readability means `service` has work. It can
        change after any `service` call (a reconnection); None means none right now: call
        `service` again after `poll_interval`."""
        return None

    def service(self) -> None:  # noqa: B027 - optional hook
        """While polled: do the back-end's pending work without blocking (receive what
        arrived, check timeouts) and run the ``done`` callbacks that became due."""

    def plug(self) -> None:  # noqa: B027 - optional hook
        """Submissions from now until `unplug` may be held back and sent together."""

    def unplug(self) -> None:  # noqa: B027 - optional hook
        """Send every submission held back since `plug` (one system call where possible)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the storage."""


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    fallocate: Callable[[int, int, int, int], int] = func
    return fallocate


_fallocate = _load_fallocate()


class FileBackend(StorageBackend):
    """A raw image file or block device node.

    ``nowait`` enables `read_nowait` through ``preadv(RWF_NOWAIT)``: a read that would have to
    wait for the disk returns early instead of blocking (Linux 4.14+, buffered reads).
    ``direct`` opens with ``O_DIRECT``: offsets and lengths must then be multiples of the
    device's logical block size; buffers that are not aligned in memory go through an aligned
    bounce buffer, and `read_nowait` serves nothing (direct reads always wait for the disk).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False, direct: bool = False
    ) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:  # bypass the page cache: buffers and offsets must be block aligned
            flags |= os.O_DIRECT
        self._fd = os.open(path, flags | os.O_CLOEXEC)
        self._path = os.fspath(path)
        self._read_only = read_only
        self._direct = direct
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self._granularity = st.st_blksize or 4096
        self._discard = _fallocate is not None and not self._is_block
        self._size = self._query_size()

    @property
    def fd(self) -> int:
        """The open file descriptor."""
        return self._fd

    def _query_size(self) -> int:
        if self._is_block:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    def refresh_size(self) -> int:
        """Re-read the size (after the image was resized outside); return it."""
        self._size = self._query_size()
        return self._size

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return self._discard

    @property
    def allocation_granularity(self) -> int:
        return self._granularity

    @property
    def direct(self) -> bool:
        """Whether the file was opened with ``O_DIRECT``."""
        return self._direct

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        self._read(offset, buffers, length, self._direct)

    def _read(self, offset: int, buffers: Buffers, length: int, may_bounce: bool) -> None:
        try:
            n = os.preadv(self._fd, buffers, offset)
        except OSError as e:
            if may_bounce and e.errno == errno.EINVAL:
                self._bounce_read(offset, buffers, length)
                return
            raise BackendError(e.errno, f"read at {offset}: {e.strerror}") from e
        if n != length:
            self._finish_read(offset, buffers, length, n)

    def _bounce_read(self, offset: int, buffers: Buffers, length: int) -> None:
        """O_DIRECT refused the caller's buffers (not aligned in memory): read into an
        anonymous mapping (page aligned) and copy out."""
        with mmap.mmap(-1, max(length, 1)) as bounce:
            view = memoryview(bounce)
            try:
                self._read(offset, [view[:length]], length, False)
                pos = 0
                for buf in buffers:
                    buf[:] = view[pos : pos + len(buf)]
                    pos += len(buf)
            finally:
                view.release()

    def _bounce_write(self, offset: int, buffers: Buffers, length: int, durable: bool) -> None:
        """The write counterpart of `_bounce_read`."""
        with mmap.mmap(-1, max(length, 1)) as bounce:
            view = memoryview(bounce)
            try:
                pos = 0
                for buf in buffers:
                    view[pos : pos + len(buf)] = buf
                    pos += len(buf)
                self._write(offset, [view[:length]], length, durable, False)
            finally:
                view.release()

    def read_nowait(self, offset: int, buffers: Buffers, length: int) -> int:
        if self._direct:
            return 0
        try:
            return os.preadv(self._fd, buffers, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:  # file system without RWF_NOWAIT support
                self.read(offset, buffers, length)
                return length
            raise BackendError(e.errno, f"read at {offset}: {e.strerror}") from e

    def _finish_read(self, offset: int, buffers: Buffers, length: int, done: int) -> None:
        """A short read: retry the rest, and zero-fill what lies past the end of the file."""
        while done < length:
            rest = _skip(buffers, done)
            try:
                n = os.preadv(self._fd, rest, offset + done)
            except OSError as e:
                raise BackendError(e.errno, f"read at {offset + done}: {e.strerror}") from e
            if n == 0:
                for view in rest:
                    view[:] = bytes(len(view))
                return
            done += n

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        self._write(offset, buffers, length, durable, self._direct)

    def _write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, may_bounce: bool
    ) -> None:
        flags = os.RWF_DSYNC if durable else 0
        done = 0
        try:
            done = os.pwritev(self._fd, buffers, offset, flags)
            while done < length:
                n = os.pwritev(self._fd, _skip(buffers, done), offset + done, flags)
                if n == 0:
                    raise BackendError(errno.EIO, f"write at {offset + done} made no progress")
                done += n
        except BackendError:
            raise
        except OSError as e:
            if may_bounce and e.errno == errno.EINVAL and done == 0:
                self._bounce_write(offset, buffers, length, durable)
                return
            raise BackendError(e.errno, f"write at {offset + done}: {e.strerror}") from e

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise BackendError(e.errno, f"flush: {e.strerror}") from e

    def _fallocate_range(self, mode: int, offset: int, length: int) -> bool:
        """Call fallocate(2); False when the file system does not support ``mode``."""
        if _fallocate is None:
            return False
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise BackendError(err, f"fallocate({mode:#x}) at {offset}: {os.strerror(err)}")

    def discard(self, offset: int, length: int) -> None:
        end = min(offset + length, self._size)
        if end <= offset:
            return
        if self._discard and self._fallocate_range(
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset
        ):
            return
        self._discard = False
        logger.info("%s: hole punching unsupported, discarding by writing zeros", self._path)
        self._write_zero_bytes(offset, end - offset)

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        end = min(offset + length, self._size)
        if end <= offset:
            return
        if may_discard and self._discard:
            self.discard(offset, end - offset)
            return
        if not self._is_block and self._fallocate_range(
            _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, end - offset
        ):
            return
        self._write_zero_bytes(offset, end - offset)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        view = memoryview(_ZERO_CHUNK)
        while length > 0:
            n = min(length, len(view))
            self.write(offset, [view[:n]], n)
            offset += n
            length -= n

    def allocation(self, offset: int) -> tuple[bool, int]:
        size = self._size
        if offset >= size:
            return False, 0
        if self._is_block:
            return True, size - offset
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: a hole to the end
                return False, size - offset
            return True, size - offset  # SEEK_DATA unsupported: report mapped
        if data > offset:
            return False, min(data, size) - offset
        try:
            hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = size
        return True, min(hole, size) - offset

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _skip(buffers: Buffers, n: int) -> list[memoryview]:
    """The buffers with their first ``n`` bytes removed."""
    out: list[memoryview] = []
    for view in buffers:
        if n >= len(view):
            n -= len(view)
            continue
        out.append(view[n:])
        n = 0
    return out
