"""A thread-safe hand-off of late completions to the thread that owns the virtqueues.

A target may finish a command on a worker thread (scsi_core.target, "Pending"). The virtqueue
is not thread-safe, so the worker only appends (item, response) to a deque and bumps an eventfd;
the device's trio task wakes on the eventfd and finishes the requests, in batches, on its own
thread. Only the post that finds the deque empty writes the eventfd: the owner drains until
the deque is empty after every wake-up, so later posts ride on that wake-up (a remote back-end
completing 32 requests in a burst costs one eventfd write and one wake-up, not 32; each write
also releases the GIL, handing it to the woken owner while the poster still has work to do).
Completions keep arriving after the channel closed (a front-end that disconnects with
commands in flight at remote storage): they are dropped, and a lock keeps them from writing to
an eventfd number that `close` released and the process may have reused.

`deferred_wakeups()` covers the case where completions run on the owner's own thread (a
back-end the owner polls, `polling.BackendPoller`): posts made inside it on the thread that
entered it queue the item without touching the eventfd, because the owner drains right after
(`CompletionChannel.drain`): no system call and no extra trip through the event loop. Knows
nothing about SCSI, virtio or what the items are.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

# trio 0.22 ships no type information; newer trio does.
import trio

__all__ = ["CompletionChannel", "deferral", "deferred_wakeups"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_get_ident = threading.get_ident


class _Deferral:
    """Which thread is inside `deferred_wakeups` (0: none). One per process: only the thread
    running the event loop ever enters it, and it does not nest."""

    __slots__ = ("thread",)

    def __init__(self) -> None:
        self.thread = 0


#: Public to the poller, which sets it inline on its hot path (see `deferred_wakeups`).
deferral = _Deferral()


@contextlib.contextmanager
def deferred_wakeups() -> Iterator[None]:
    """Inside it, posts from this thread skip the eventfd: the caller must drain every channel
    it may have posted to before it next waits (items posted here wake nobody)."""
    previous = deferral.thread
    deferral.thread = _get_ident()
    try:
        yield
    finally:
        deferral.thread = previous


class CompletionChannel(Generic[T, R]):
    """deque + eventfd: `post` from any thread, `drain` and `wait` on the owning thread."""

    __slots__ = ("_closed", "_fd", "_items", "_lock")

    def __init__(self) -> None:
        self._items: collections.deque[tuple[T, R]] = collections.deque()
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False
        self._lock = threading.Lock()

    def post(self, item: T, result: R) -> None:
        """Queue one completion and wake the owner (thread-safe). After `close`, dropped."""
        with self._lock:
            if self._closed:
                # The connection went away: nobody is left to hear about it.
                logger.debug("completion posted after the channel closed; dropped")
                return
            items = self._items
            items.append((item, result))
            if deferral.thread == _get_ident():
                return  # the owner itself, about to drain (`deferred_wakeups`)
            # More than one item: an earlier post found the deque empty and woke the owner,
            # who has not drained that item yet, so it drains this one too (posts are
            # serialized by the lock; the owner only removes).
            if len(items) == 1:
                os.eventfd_write(self._fd, 1)

    def drain(self) -> Iterator[tuple[T, R]]:
        """Yield every queued completion, including ones posted while draining. Run it to
        the end after every `wait`: posts made while items are queued do not wake the owner."""
        items = self._items
        while items:
            yield items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    async def wait(self) -> None:
        """Sleep until at least one `post` happened since the last wait (resets the counter)."""
        while True:
            try:
                os.eventfd_read(self._fd)
                return
            except BlockingIOError:
                pass
            if self._items:
                return
            await trio.lowlevel.wait_readable(self._fd)

    def fileno(self) -> int:
        """The eventfd `wait` waits on (-1 once closed)."""
        return self._fd

    def close(self) -> None:
        """Release the eventfd; later posts are dropped. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._fd = self._fd, -1
            self._items.clear()
            # Outside trio (RuntimeError) nobody can be waiting on it.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(fd)
            os.close(fd)
