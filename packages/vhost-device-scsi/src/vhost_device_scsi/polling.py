"""Driving remote storage back-ends from the daemon's trio loop: no thread hop per request.

Holds `BackendPoller`. A back-end that supports it (`StorageBackend.start_polling`: NBD, RBD)
then delivers its completions only when asked to: the poller runs one trio task per such
back-end that waits until the back-end's descriptor is readable (the NBD socket, librbd's
event fd) or its `poll_interval` passed, calls `service()` (which receives replies straight
into guest memory and runs the SCSI completions on this thread), and then `on_serviced()`,
with which the daemon finishes the completed requests on their virtqueues and notifies the
driver once per burst. The posts made inside `service()` skip the completion channel's
eventfd (`completions.deferred_wakeups`): the reply is received, the response written and the
driver notified in one pass, on one thread, with no wake-up of another task in between.

Back-ends that cannot be polled keep their own threads (the default) and are left alone.
Knows nothing about SCSI or virtio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from functools import partial

# trio 0.22 ships no type information; newer trio does.
import trio
from scsi_emulation.backend import StorageBackend
from vhost_user.busy_poll import BusyPoll

from . import completions

__all__ = ["BackendPoller"]

logger = logging.getLogger(__name__)

_DEFAULT_INTERVAL = StorageBackend.poll_interval


class BackendPoller:
    """Polls the back-ends handed to `watch` once `run` is running.

    `watch` and `unwatch` are called on the trio thread (or before `trio.run`, on the thread
    that will run it: `start_polling` binds the back-end to that thread).
    """

    def __init__(
        self, on_serviced: Callable[[], None], *, busy_poll: BusyPoll | None = None
    ) -> None:
        self._on_serviced = on_serviced
        #: Spins on the back-ends' descriptors too (each serviced burst is activity).
        self.busy_poll = busy_poll
        self._scopes: dict[StorageBackend, trio.CancelScope] = {}
        self._waiting: dict[StorageBackend, int] = {}
        # The descriptor busy_poll watches, and its file's inode: a reconnection's new socket
        # often gets the old one's number, and busy_poll watches through a duplicate.
        self._spun: dict[StorageBackend, tuple[int, int]] = {}
        self._nursery: trio.Nursery | None = None

    def __contains__(self, backend: object) -> bool:
        return backend in self._scopes

    def watch(self, backend: StorageBackend) -> bool:
        """Take over ``backend``'s completions if it can be polled; False when it cannot."""
        if backend in self._scopes:
            return True
        if not backend.start_polling():
            return False
        self._scopes[backend] = trio.CancelScope()
        if self._nursery is not None:
            self._nursery.start_soon(self._drive, backend)
        return True

    def unwatch(self, backend: StorageBackend) -> None:
        """Stop polling ``backend`` before it is closed (its descriptor is about to go)."""
        scope = self._scopes.pop(backend, None)
        if scope is None:
            return
        scope.cancel()
        self._unspin(backend)
        fd = self._waiting.pop(backend, None)
        if fd is not None:
            # The task sleeps in wait_readable on a descriptor that close() will release:
            # trio must drop it first (trio.lowlevel.notify_closing).
            trio.lowlevel.notify_closing(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every watched back-end until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for backend in self._scopes:
                nursery.start_soon(self._drive, backend)
            task_status.started()
            try:
                await self._tick()
            finally:
                self._nursery = None

    async def _tick(self) -> None:
        """Wake every waiting drive task each `poll_interval`, so that its back-end is
        serviced even when nothing arrives (a request timeout, a reconnection finished).

        A timeout on each wait would do the same but costs ~4.5 us per wake-up on the hot
        path (a cancel scope with a deadline); trio.lowlevel.notify_closing wakes a waiter
        with ClosedResourceError and only makes trio re-register the descriptor next time.
        """
        while True:
            # The smallest interval among the back-ends watched now (a back-end added later
            # with a smaller one is heard from after the current tick).
            interval = min((b.poll_interval for b in self._scopes), default=_DEFAULT_INTERVAL)
            await trio.sleep(interval)
            busy = self.busy_poll
            for fd in list(self._waiting.values()):
                trio.lowlevel.notify_closing(fd)
                if busy is not None:
                    busy.notify_closing(fd)

    def _spin_on(self, backend: StorageBackend, fd: int | None) -> None:
        """Point busy polling at ``backend``'s current descriptor (a reconnection changes it)."""
        busy = self.busy_poll
        if busy is None:
            return
        key = None
        if fd is not None:
            # Closed meanwhile (OSError): the next look finds its successor.
            with contextlib.suppress(OSError):
                key = (fd, os.fstat(fd).st_ino)
        if self._spun.get(backend) == key:
            return
        self._unspin(backend)
        if key is not None:
            # A spin that finds the descriptor readable services the back-end itself: the
            # drive task stays parked in its wait (and copes with finding nothing later).
            busy.watch(key[0], partial(self._service, backend.service, threading.get_ident()))
            self._spun[backend] = key

    def _unspin(self, backend: StorageBackend) -> None:
        key = self._spun.pop(backend, None)
        if key is not None and self.busy_poll is not None:
            self.busy_poll.unwatch(key[0])

    async def _drive(self, backend: StorageBackend) -> None:
        scope = self._scopes.get(backend)
        if scope is None:
            return
        try:
            await self._drive_until_cancelled(backend, scope)
        finally:
            self._unspin(backend)

    async def _drive_until_cancelled(
        self, backend: StorageBackend, scope: trio.CancelScope
    ) -> None:
        interval = backend.poll_interval
        poll_fileno = backend.poll_fileno
        serve = partial(self._service, backend.service, threading.get_ident())
        waiting = self._waiting
        busy = self.busy_poll
        # The descriptor is its spin handler's while the loop waits in the spinner's epoll:
        # trio must not wait on it too (BusyPoll.wait_readable parks this task then).
        wait_readable = busy.wait_readable if busy is not None else trio.lowlevel.wait_readable
        with scope:
            while True:
                fd = poll_fileno()
                if busy is not None:
                    self._spin_on(backend, fd)
                if fd is None:  # reconnecting: look again later
                    await trio.sleep(interval)
                else:
                    waiting[backend] = fd
                    try:
                        await wait_readable(fd)
                    except trio.ClosedResourceError:
                        pass  # woken by `_tick`
                    finally:
                        waiting.pop(backend, None)
                serve()

    def _service(self, service: Callable[[], None], ident: int) -> None:
        """Service a back-end and finish what completed; on the trio thread (``ident``), from
        its drive task or from a busy-polling spin."""
        # `deferred_wakeups()` spelled out: this runs once per reply burst, and at queue depth
        # 1 once per request (a generator context manager costs ~1.5 us).
        deferral = completions.deferral
        deferral.thread = ident
        try:
            service()
        except Exception:
            # A back-end bug must not end polling (its requests would hang): log it and keep
            # going; the back-end's own timeouts fail what is stuck.
            logger.exception("servicing the storage back-end failed")
        finally:
            deferral.thread = 0
        try:
            self._on_serviced()
        except Exception:
            # Same rule: one bad completion must not stop every later one (the daemon's
            # serve nursery would end with the drive task).
            logger.exception("finishing completions of a polled back-end failed")
        if self.busy_poll is not None:
            self.busy_poll.activity()
