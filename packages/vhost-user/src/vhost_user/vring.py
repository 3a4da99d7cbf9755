"""A started vring as a device sees it: its split queue, call eventfd and inflight tracking.

The device calls ``pop`` / ``add_used`` / ``notify``; with INFLIGHT_SHMFD those keep the shared
inflight area current (QEMU ``vhost-user.rst``, "Inflight I/O tracking") and ``pop`` first
hands out the chains resubmitted after a reconnection. Without tracking, ``pop`` and
``add_used`` *are* the queue's bound methods: the hot path pays nothing for the feature.

Knows nothing about the socket, the message protocol or any device type.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable

from virtio_queue import DescriptorChain, InvalidChain, SplitQueue

from .inflight import InflightQueue

__all__ = ["Vring"]

log = logging.getLogger(__name__)


class Vring:
    """One started virtqueue of a vhost-user device.

    ``pop() -> DescriptorChain | None`` and ``add_used(head, length)`` behave as the queue's
    methods of the same name; ``notify()`` signals the call eventfd when the driver wants it.
    """

    __slots__ = ("_call_fd", "_inflight", "_resubmit", "add_used", "index", "pop", "queue")

    pop: Callable[[], DescriptorChain | None]
    add_used: Callable[[int, int], None]

    def __init__(
        self,
        index: int,
        queue: SplitQueue,
        *,
        call_fd: int = -1,
        inflight: InflightQueue | None = None,
        resubmit: Iterable[int] = (),
    ) -> None:
        self.index = index
        self._call_fd = call_fd
        self._inflight = inflight
        self._resubmit: deque[int] = deque(resubmit)
        self.queue = queue
        self._bind()

    def _bind(self) -> None:
        queue = self.queue
        if self._inflight is None:
            self.pop = queue.pop
            self.add_used = queue.add_used
        else:
            self.pop = self._pop_resubmitted if self._resubmit else self._pop_tracked
            self.add_used = self._add_used_tracked

    @property
    def call_fd(self) -> int:
        """The call eventfd, or -1 when the front-end polls (SET_VRING_CALL with no fd)."""
        return self._call_fd

    @call_fd.setter
    def call_fd(self, fd: int) -> None:
        self._call_fd = fd

    @property
    def inflight(self) -> InflightQueue | None:
        return self._inflight

    @property
    def resubmit_pending(self) -> int:
        """How many resubmitted chains ``pop`` has still to hand out."""
        return len(self._resubmit)

    def replace_queue(self, queue: SplitQueue) -> None:
        """Swap in a queue rebuilt over remapped memory (state carried by the caller)."""
        self.queue = queue
        self._bind()

    def notify(self) -> None:
        """Signal the call eventfd if the driver wants an interrupt (virtio 1.2 2.7.7/2.7.10)."""
        fd = self._call_fd
        if fd >= 0 and self.queue.needs_notification():
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:  # the front-end closed its end: nothing to signal
                log.debug("vring %d: call eventfd write failed: %s", self.index, exc)

    # -- inflight tracking ----------------------------------------------------------------
    def _pop_tracked(self) -> DescriptorChain | None:
        tracker = self._inflight
        assert tracker is not None
        try:
            chain = self.queue.pop()
        except InvalidChain as exc:
            # Consumed from the ring all the same: track it so the avail position recovered
            # after a crash (used idx + heads in flight) stays exact.
            if 0 <= exc.head < tracker.size:
                tracker.begin(exc.head)
            raise
        if chain is not None:
            tracker.begin(chain.head)
        return chain

    def _pop_resubmitted(self) -> DescriptorChain | None:
        resubmit = self._resubmit
        while resubmit:
            head = resubmit.popleft()
            if not resubmit:
                self.pop = self._pop_tracked
            # Still marked in flight in the area; its order counter stays as it was.
            return self.queue.read_chain(head)
        self.pop = self._pop_tracked
        return self._pop_tracked()

    def _add_used_tracked(self, head: int, length: int) -> None:
        tracker = self._inflight
        assert tracker is not None
        if not 0 <= head < tracker.size:
            self.queue.add_used(head, length)  # logged and refused there
            return
        tracker.before_used(head)
        queue = self.queue
        queue.add_used(head, length)
        tracker.after_used(head, queue.next_used)
