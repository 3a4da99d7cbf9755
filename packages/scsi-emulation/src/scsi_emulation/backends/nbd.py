"""An NBD export as a storage back-end, with many requests in flight.

Holds `NbdBackend`: the `StorageBackend` over one or more `nbd_connection.NbdConnection`s to
one export (several only when the server sets NBD_FLAG_CAN_MULTI_CONN). The asynchronous
calls (`submit_read`, `submit_write`, `submit_flush`) return at once and complete from a
connection's reader thread, or, once `start_polling` was called, from whoever calls `service`
(or a blocking call that received the reply while waiting for its own); the blocking calls
wait for them and work from any thread in both modes. `plug` / `unplug` send a batch of
submissions in one ``sendmsg``. Requests larger than the
server's maximum payload are split. FUA maps to NBD_CMD_FLAG_FUA (or a flush where the server
has none), discard to WRITE_ZEROES that may punch holes (TRIM leaves contents undefined, and
a discarded range must read as zeros here), allocation to BLOCK_STATUS on
``base:allocation``. Knows nothing about SCSI.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import threading
from collections.abc import Sequence
from typing import cast

from scsi_emulation.backend import BackendError, Buffers, Done, StorageBackend
from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd_connection import NbdConnection
from scsi_emulation.backends.nbd_protocol import ExportInfo, NbdError
from scsi_emulation.backends.nbd_transmission import Command
from scsi_emulation.backends.uri import LocationError, NbdLocation, parse_location

__all__ = ["NbdBackend"]

logger = logging.getLogger(__name__)

#: Zeroing and trimming requests are split at this size (the length field is 32 bits).
_MAX_ZERO_REQUEST = 1 << 30
_ZERO_CHUNK = memoryview(bytes(1 << 20))
#: Polled mode: how long a blocking call that leads waits for data per round, and how long
#: one that cannot lead (another thread receives) waits for its completion before retrying.
_LEAD_WAIT = 0.05
_FOLLOW_WAIT = 0.01


class _Waiter:
    """Blocks a caller until a `Done` callback ran (a pre-acquired lock is the cheapest
    one-shot event)."""

    __slots__ = ("_lock", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.error: BackendError | None = None

    def __call__(self, error: BackendError | None) -> None:
        self.error = error
        self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()
        if self.error is not None:
            raise self.error

    def wait_polled(self, connections: Sequence[NbdConnection]) -> None:
        """Wait in polled mode: receive as the leader whenever no other thread does (so no
        one has to call `service` for us), else wait briefly for our completion and retry."""
        lock = self._lock
        share = _LEAD_WAIT / len(connections)
        while not lock.acquire(blocking=False):
            led = False
            for connection in connections:
                led = connection.pump(share) or led
            if not led and lock.acquire(timeout=_FOLLOW_WAIT):
                break
        if self.error is not None:
            raise self.error


class _Join:
    """Calls ``done`` once every part of a split request finished, with the first error."""

    __slots__ = ("_done", "_error", "_left", "_lock")

    def __init__(self, parts: int, done: Done) -> None:
        self._left = parts
        self._done = done
        self._error: BackendError | None = None
        self._lock = threading.Lock()

    def __call__(self, error: BackendError | None) -> None:
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            last = not self._left
        if last:
            self._done(self._error)


class _Request(Command):
    """A command that carries its caller's `Done` (no closure per request)."""

    __slots__ = ("done",)

    done: Done


def _finished(command: Command) -> None:
    request = cast(_Request, command)
    request.done(_error_of(command) if command.error else None)


def _error_of(command: Command) -> BackendError:
    name = p.CMD_NAMES[command.kind] if command.kind < len(p.CMD_NAMES) else str(command.kind)
    text = command.message or os.strerror(command.error)
    return BackendError(command.error, f"NBD {name} at {command.offset}: {text}")


def _split_buffers(buffers: Buffers, start: int, length: int) -> list[memoryview]:
    out: list[memoryview] = []
    for view in buffers:
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(view[start : start + take])
        length -= take
        start = 0
        if not length:
            break
    return out


class NbdBackend(StorageBackend):
    """An NBD export; build it with `connect`.

    Polled mode (`start_polling`): one connection polls on its socket (`poll_fileno`);
    several (multi-conn) on an epoll descriptor that is readable when any of their sockets
    is; `poll_filenos` lists the sockets themselves. `plug` / `unplug` are meant for the
    polling thread (the depth counter is not locked).
    """

    #: Polled: `service` at least this often (request timeouts; a new socket after a
    #: reconnection is picked up by the next `poll_fileno`).
    poll_interval = 0.1

    def __init__(self, connections: Sequence[NbdConnection], *, read_only: bool = False) -> None:
        if not connections:
            raise ValueError("an NbdBackend needs at least one connection")
        self._connections = list(connections)
        self._cycle = itertools.cycle(self._connections)
        self._single = self._connections[0] if len(self._connections) == 1 else None
        self._polled = False
        self._plug_depth = 0
        self._epoll: select.epoll | None = None
        #: connection index -> (fd, generation) registered with the epoll descriptor
        self._registered: dict[int, tuple[int, int]] = {}
        export = self._connections[0].export
        self._read_only = read_only or export.read_only
        self._max_payload = max(export.maximum_block, export.minimum_block)
        self._closed = False

    @classmethod
    def connect(
        cls,
        location: NbdLocation | str,
        *,
        read_only: bool = False,
        connections: int = 1,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        reconnect_timeout: float = 10.0,
    ) -> NbdBackend:
        """Connect to ``location`` (and open up to ``connections`` connections when the
        server allows multi-conn). Unreachable servers and refused exports raise
        `BackendError` with a message for the operator."""
        if isinstance(location, str):
            parsed = parse_location(location)
            if not isinstance(parsed, NbdLocation):
                raise LocationError(f"{location!r} is not an nbd:// or nbd+unix:// URI")
            location = parsed

        def one() -> NbdConnection:
            try:
                return NbdConnection(
                    location,
                    connect_timeout=connect_timeout,
                    request_timeout=request_timeout,
                    reconnect_timeout=reconnect_timeout,
                )
            except NbdError as e:
                raise BackendError(errno.ENXIO, f"NBD server at {location}: {e}") from None
            except OSError as e:
                text = e.strerror or str(e) or type(e).__name__
                raise BackendError(
                    e.errno or errno.EHOSTUNREACH, f"cannot reach NBD server {location}: {text}"
                ) from None

        first = one()
        opened = [first]
        try:
            if connections > 1 and first.export.has(p.FLAG_CAN_MULTI_CONN):
                opened += [one() for _ in range(connections - 1)]
        except BaseException:
            for c in opened:
                c.close()
            raise
        return cls(opened, read_only=read_only)

    # -- what the export is ------------------------------------------------------------------

    @property
    def export(self) -> ExportInfo:
        """What the server said about the export (on the first connection)."""
        return self._connections[0].export

    @property
    def connection_count(self) -> int:
        """How many connections requests are spread over."""
        return len(self._connections)

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        e = self.export
        return e.has(p.FLAG_SEND_TRIM) and e.has(p.FLAG_SEND_WRITE_ZEROES)

    @property
    def supports_allocation_status(self) -> bool:
        """Whether `allocation` asks the server (base:allocation was negotiated)."""
        return self.export.allocation_context is not None

    @property
    def logical_block_size(self) -> int:
        return self.export.minimum_block

    @property
    def physical_block_size(self) -> int:
        e = self.export
        return max(e.preferred_block, e.minimum_block)

    @property
    def allocation_granularity(self) -> int:
        return self.physical_block_size

    @property
    def asynchronous(self) -> bool:
        return True

    # -- asynchronous calls ------------------------------------------------------------------

    def _send(
        self, kind: int, offset: int, length: int, flags: int, buffers: Buffers, done: Done
    ) -> None:
        if self._closed:
            done(BackendError(errno.ESHUTDOWN, "the NBD back-end is closed"))
            return
        command = _Request(kind, offset, length, flags, buffers, _finished)
        command.done = done
        single = self._single
        (single or next(self._cycle)).submit(command)

    def _send_split(
        self,
        kind: int,
        offset: int,
        length: int,
        flags: int,
        buffers: Buffers | None,
        done: Done,
        limit: int,
    ) -> None:
        if length <= limit:
            self._send(kind, offset, length, flags, buffers or (), done)
            return
        parts = range(0, length, limit)
        join = _Join(len(parts), done)
        for start in parts:
            n = min(limit, length - start)
            part = _split_buffers(buffers, start, n) if buffers else ()
            self._send(kind, offset + start, n, flags, part, join)

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        if 0 < length <= self._max_payload and not self._closed:
            # The hot path, spelled out: one command, no split, no extra calls.
            command = _Request(p.CMD_READ, offset, length, 0, buffers, _finished)
            command.done = done
            (self._single or next(self._cycle)).submit(command)
            return
        if not length:
            done(None)
            return
        self._send_split(p.CMD_READ, offset, length, 0, buffers, done, self._max_payload)

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        if self._read_only:
            done(BackendError(errno.EROFS, "the NBD export is read-only"))
            return
        if not length:
            done(None)
            return
        flags = 0
        if durable:
            if self.export.has(p.FLAG_SEND_FUA):
                flags = p.CMD_FLAG_FUA
            elif self.export.has(p.FLAG_SEND_FLUSH):
                done = self._then_flush(done)
        if length <= self._max_payload and not self._closed:  # the hot path, as in reads
            command = _Request(p.CMD_WRITE, offset, length, flags, buffers, _finished)
            command.done = done
            (self._single or next(self._cycle)).submit(command)
            return
        self._send_split(p.CMD_WRITE, offset, length, flags, buffers, done, self._max_payload)

    def _then_flush(self, done: Done) -> Done:
        def written(error: BackendError | None) -> None:
            if error is not None:
                done(error)
            else:
                self.submit_flush(done)

        return written

    def submit_flush(self, done: Done) -> None:
        if not self.export.has(p.FLAG_SEND_FLUSH):
            done(None)  # no write cache to flush, says the server
            return
        self._send(p.CMD_FLUSH, 0, 0, 0, (), done)

    def submit_write_zeroes(self, offset: int, length: int, may_discard: bool, done: Done) -> None:
        """Zero a range with NBD_CMD_WRITE_ZEROES (holes allowed when ``may_discard``)."""
        if self._read_only:
            done(BackendError(errno.EROFS, "the NBD export is read-only"))
            return
        end = min(offset + length, self.size)
        if end <= offset:
            done(None)
            return
        flags = 0 if may_discard else p.CMD_FLAG_NO_HOLE
        limit = _MAX_ZERO_REQUEST
        self._send_split(p.CMD_WRITE_ZEROES, offset, end - offset, flags, None, done, limit)

    def submit_trim(self, offset: int, length: int, done: Done) -> None:
        """NBD_CMD_TRIM: a hint that the range is unused; its contents become undefined."""
        if self._read_only:
            done(BackendError(errno.EROFS, "the NBD export is read-only"))
            return
        if not self.export.has(p.FLAG_SEND_TRIM):
            done(None)
            return
        self._send_split(p.CMD_TRIM, offset, length, 0, None, done, _MAX_ZERO_REQUEST)

    # -- polled mode (StorageBackend's optional interface) ------------------------------------

    def start_polling(self) -> bool:
        if self._closed:
            return False
        for connection in self._connections:
            connection.start_polling()
        if self._single is None and self._epoll is None:
            self._epoll = select.epoll()
        self._polled = True
        return True

    def poll_fileno(self) -> int | None:
        if not self._polled:
            return None
        single = self._single
        if single is not None:
            return single.poll_fileno()
        return self._sync_epoll()

    def poll_filenos(self) -> list[int]:
        """Polled: every connection's socket that is up (the alternative to the one epoll
        descriptor of `poll_fileno` for a caller that waits on several itself)."""
        if not self._polled:
            return []
        fds = (c.poll_fileno() for c in self._connections)
        return [fd for fd in fds if fd is not None]

    def _sync_epoll(self) -> int | None:
        """Register every connected socket with the epoll descriptor (sockets change on
        reconnection; a closed one leaves the epoll set by itself)."""
        epoll = self._epoll
        if epoll is None or self._closed:
            return None
        registered = self._registered
        for i, connection in enumerate(self._connections):
            fd = connection.poll_fileno()
            key = None if fd is None else (fd, connection.generation)
            old = registered.get(i)
            if old == key:
                continue
            if old is not None:
                with contextlib.suppress(OSError):
                    epoll.unregister(old[0])
                del registered[i]
            if key is not None:
                try:
                    epoll.register(key[0], select.EPOLLIN)
                except FileExistsError:
                    epoll.modify(key[0], select.EPOLLIN)
                except OSError as e:  # closed meanwhile: next time
                    logger.debug("NBD: cannot poll connection %d: %s", i, e)
                    continue
                registered[i] = key
        return epoll.fileno()

    def service(self) -> None:
        if not self._polled:
            return
        single = self._single
        if single is not None:
            single.service()
            return
        for connection in self._connections:
            connection.service()
        self._sync_epoll()

    def plug(self) -> None:
        self._plug_depth += 1
        if self._plug_depth == 1:
            for connection in self._connections:
                connection.plug()

    def unplug(self) -> None:
        if not self._plug_depth:
            logger.warning("NBD: unplug without plug ignored")
            return
        self._plug_depth -= 1
        if not self._plug_depth:
            for connection in self._connections:
                connection.unplug()

    def _wait(self, waiter: _Waiter) -> None:
        """Wait for a blocking call's command; what `plug` holds goes out first (it may be
        among it)."""
        if self._plug_depth:
            for connection in self._connections:
                connection.send_held()
        if self._polled:
            waiter.wait_polled(self._connections)
        else:
            waiter.wait()

    # -- blocking calls ----------------------------------------------------------------------

    def read(self, offset: int, buffers: Buffers, length: int) -> None:
        waiter = _Waiter()
        self.submit_read(offset, buffers, length, waiter)
        self._wait(waiter)

    def read_nowait(self, offset: int, buffers: Buffers, length: int) -> int:
        # Nothing is served without a round trip: a caller with a worker pool should let a
        # worker wait (until it drives `submit_read` itself).
        return 0

    def write(self, offset: int, buffers: Buffers, length: int, durable: bool = False) -> None:
        waiter = _Waiter()
        self.submit_write(offset, buffers, length, durable, waiter)
        self._wait(waiter)

    def flush(self) -> None:
        waiter = _Waiter()
        self.submit_flush(waiter)
        self._wait(waiter)

    def trim(self, offset: int, length: int) -> None:
        """Blocking `submit_trim`."""
        waiter = _Waiter()
        self.submit_trim(offset, length, waiter)
        self._wait(waiter)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, may_discard=True)

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        if self.export.has(p.FLAG_SEND_WRITE_ZEROES):
            waiter = _Waiter()
            self.submit_write_zeroes(offset, length, may_discard, waiter)
            self._wait(waiter)
            return
        end = min(offset + length, self.size)
        while offset < end:
            n = min(end - offset, len(_ZERO_CHUNK))
            self.write(offset, [_ZERO_CHUNK[:n]], n)
            offset += n

    def allocation(self, offset: int) -> tuple[bool, int]:
        size = self.size
        if offset >= size:
            return False, 0
        if self.export.allocation_context is None:
            return True, size - offset
        step = self.export.minimum_block
        length = min(size - offset, (0xFFFFFFFF // step) * step)
        extents: list[tuple[int, int]] = []

        def finished(command: Command) -> None:
            extents.extend(command.extents)
            waiter(_error_of(command) if command.error else None)

        waiter = _Waiter()
        if self._closed:
            raise BackendError(errno.ESHUTDOWN, "the NBD back-end is closed")
        command = Command(p.CMD_BLOCK_STATUS, offset, length, p.CMD_FLAG_REQ_ONE, (), finished)
        next(self._cycle).submit(command)
        self._wait(waiter)
        extent_length, flags = extents[0]
        if not extent_length:
            raise BackendError(errno.EIO, "NBD BLOCK_STATUS: an empty extent")
        return not flags & p.STATE_HOLE, min(extent_length, size - offset)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for connection in self._connections:
            connection.close()
        if self._epoll is not None:
            self._epoll.close()
