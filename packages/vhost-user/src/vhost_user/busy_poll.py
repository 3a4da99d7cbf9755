"""Adaptive polling before the event loop sleeps: QEMU's AioContext polling for a trio loop.

When a back-end thread sleeps and is woken, the wake-up can cost more than the request it
serves: in a virtual machine whose idle vCPUs halt, every wake-up is an interrupt sent through
the hypervisor, tens of microseconds. QEMU therefore polls its file descriptors for a while
before it blocks (``poll-max-ns``, util/aio-posix.c), growing the time when a longer poll
would have caught the event and shrinking it when the waits are longer than the cap. This
module does the same for a trio loop: once the loop has nothing left to run, `BusyPoll` spins
on the watched descriptors (kick eventfds, a storage back-end's socket) for up to its current
window; when one becomes ready the loop finds it ready and does not sleep at all.

It can also poll rings itself (`poll_ring`): while it spins, a ring's driver is told not to
notify (virtio 1.2 2.7.10: VIRTQ_USED_F_NO_NOTIFY, or avail_event left behind) and the spinner
looks at the ring's avail idx instead. A guest then spends no VM exit per request, a front-end
no eventfd write, and the back-end sees a new buffer the moment the idx moves instead of after
the kick's write and its own wake-up. Before the spinner parks, the rings are made to notify
again and looked at once more, so nothing made available meanwhile waits for a kick that was
never sent (QEMU's virtio_queue_host_notifier_aio_poll does the same for its own devices).

While the spinner runs, the loop also sleeps in an epoll of ours (`BusyPoll.sleep_here`): trio's
I/O manager waits there, in a set of the descriptors that have a handler and trio's own epoll
descriptor. A handler's descriptor is then the handler's alone: its task waits through
`BusyPoll.wait_readable`, which parks it instead of registering the descriptor with trio (else
trio's epoll would be readable for the same event and every wait would cost two). An event
is served where the loop sleeps, with no trip through trio's scheduler and no task switch
(these cost more here than a request); anything else (a descriptor a task waits on, a thread's
or a signal's wake-up) makes trio's epoll readable and trio collects it, and trio's timeout
(its deadlines, its idle waiters) bounds the wait. One epoll for everything, as QEMU's
AioContext.

It knows nothing about any device type: the device says which descriptors are hot (`watch`)
when work was done (`activity`), and whether spinning is worth it now (``worth_it``: a device
with many requests in flight keeps the loop busy anyway, and on a small machine the CPU is
better left to the storage server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

# `wait_all_tasks_blocked` is trio's one "the loop is about to sleep" hook (its run loop
# implements it; trio.testing re-exports it). Taken from where trio defines it:
# importing trio.testing also imports pytest when installed (+9 MB of daemon RSS).
try:
    from trio._core._generated_run import wait_all_tasks_blocked
except ImportError:  # a trio that moved it: the public name
    from trio.testing import wait_all_tasks_blocked

__all__ = ["BusyPoll", "RingProbe", "adjust_window"]


def _others_runnable() -> Callable[[], bool]:
    """A cheap "does another task of this trio loop want to run?" for the spinner.

    trio's public answer (``current_statistics().tasks_runnable``) builds a statistics object
    (~5 us per call here); the run queue it counts is a deque on the runner (~0.06 us to look
    at). Taken from the runner when this trio keeps it there, else the public call. Call it
    inside `trio.run`.
    """
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner = GLOBAL_RUN_CONTEXT.runner
        len(runner.runq)
    except Exception:  # a trio that keeps it elsewhere: the public API
        stats = trio.lowlevel.current_statistics
        return lambda: stats().tasks_runnable > 0
    return lambda: bool(runner.runq)


logger = logging.getLogger(__name__)


class _SleepingIOManager:
    """trio's I/O manager, but for its wait for events (`get_events`), which `BusyPoll` takes
    in its own epoll. Everything else is the real manager's."""

    def __init__(self, real: Any, wait: Callable[[float, Callable[[float], Any]], Any]) -> None:
        self._real = real
        self._real_get_events = real.get_events
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_events(self, timeout: float) -> Any:
        """What the real one would give, after our handlers' events were served."""
        return self._wait(timeout, self._real_get_events)


def _install_loop_wait(busy: BusyPoll) -> tuple[Any, _SleepingIOManager, int] | None:
    """Make the running trio loop wait for events in ``busy``'s epoll: the runner, the manager
    put in, and trio's epoll descriptor; None where this trio keeps its I/O manager otherwise
    (the loop then waits as it always did)."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner: Any = GLOBAL_RUN_CONTEXT.runner
        real = runner.io_manager
        fd = real._epoll.fileno()
        hooked = _SleepingIOManager(real, busy._loop_wait)
        runner.io_manager = hooked
    except Exception as exc:
        logger.debug("busy poll: the loop keeps its own wait: %r", exc)
        return None
    return runner, hooked, fd


class RingProbe(Protocol):
    """A ring the spinner polls itself while it spins (`BusyPoll.poll_ring`).

    All four run on the loop's thread, from the spinner. ``moved`` is called on every turn of
    a spin, so it must be cheap (one look at the avail idx).
    """

    def quiet(self) -> None:
        """A spin starts: tell the driver it need not notify (2.7.10)."""

    def moved(self) -> bool:
        """Whether the driver made buffers available since the ring was last served."""

    def serve(self) -> None:
        """Serve the ring as a kick would (without touching its notification setting)."""

    def loud(self) -> None:
        """The spinner stops: ask the driver to notify again (then ``moved`` is looked at)."""


#: The first window after polling was off (QEMU's start value, 4 us).
START_NS = 4_000

#: The default `BusyPoll.slice_ns`: 1 ms, a delay no timer or control message minds, and
#: one trip through the loop per ~10 requests at queue depth 1.
DEFAULT_SLICE_NS = 1_000_000

#: Spins in a row that saw a descriptor ready without any `activity` since: something is
#: readable that nobody handles (a watched socket at EOF that its owner has not looked at
#: yet); stop spinning until the next activity rather than spin on it for good.
_MAX_UNCLAIMED = 64


def adjust_window(
    window_ns: int, blocked_ns: int, max_ns: int, *, grow: int = 2, shrink: int = 2
) -> int:
    """The next polling window after a wait of ``blocked_ns`` (polling included) that the
    current ``window_ns`` did not cover (QEMU's adjust_polling_time, util/aio-posix.c).

    A wait the window covered changes nothing; a wait longer than ``max_ns`` shrinks the
    window (polling would not have paid); a shorter one grows it (a longer poll would have
    caught the event), from `START_NS`, up to ``max_ns``. The result is 0 or in
    [START_NS, max_ns] (0 when ``max_ns`` is below START_NS).
    """
    if max_ns < START_NS:
        return 0
    if blocked_ns <= window_ns:
        return window_ns
    if blocked_ns > max_ns:
        window_ns //= shrink
        return window_ns if window_ns >= START_NS else 0
    if window_ns < max_ns:
        return min(window_ns * grow if window_ns else START_NS, max_ns)
    return window_ns


class BusyPoll:
    """Spin on the watched descriptors before the trio loop sleeps, for an adaptive window.

    Run `run` as a task of the loop that serves the descriptors. Call `activity()` after
    handling an event of a watched descriptor: it measures the wait that ended and, when the
    window and ``worth_it()`` allow, arms one spin for the next time the loop is idle. A
    daemon with no work does not spin at all: the spinner parks until the next activity.
    ``max_ns`` 0 disables polling (then this object only keeps its counters at 0).
    """

    def __init__(
        self,
        max_ns: int,
        *,
        worth_it: Callable[[], bool] | None = None,
        grow: int = 2,
        shrink: int = 2,
    ) -> None:
        if max_ns < 0 or grow < 2 or shrink < 1:
            raise ValueError("need max_ns >= 0, grow >= 2, shrink >= 1")
        self.max_ns = max_ns
        self.worth_it = worth_it
        self.grow = grow
        self.shrink = shrink
        #: The current window (adapted between 0 and max_ns).
        self.window_ns = 0
        #: Spins started, and those that saw a descriptor become ready.
        self.spins = 0
        self.hits = 0
        self._epoll = select.epoll()
        self._watched: dict[int, int] = {}  # fd -> our duplicate in the epoll set
        self._handlers: dict[int, Callable[[], None]] = {}  # duplicate -> handler
        #: Events a spin handed to a handler (a subset of the hits' events).
        self.dispatched = 0
        self._unclaimed = 0  # hits in a row that no `activity` followed
        self._parked: trio.lowlevel.Task | None = None
        self._parked_at = 0
        #: Take the loop's wait for events in our epoll while `run` runs (module notes).
        self.sleep_here = True
        #: The loop's waits in our epoll that found events, and the events served there.
        self.sleeps = 0
        self.sleep_dispatched = 0
        self._wait_epoll = select.epoll()  # the handlers' descriptors and trio's epoll
        self._loop_fd = -1  # trio's epoll descriptor while the loop waits in ours
        self._owned: dict[int, trio.lowlevel.Task] = {}  # fd -> its task, parked
        self._closing: set[int] = set()  # parked tasks woken by notify_closing
        self._others_runnable: Callable[[], bool] = bool
        #: How long the spinner may keep serving handled events without a trip through the
        #: loop (its timers and the descriptors nobody spins on wait at most this long).
        self.slice_ns = DEFAULT_SLICE_NS
        self._rings: tuple[RingProbe, ...] = ()
        self._quiet = False  # the rings were told not to notify and are not loud again yet
        #: Times a spin found a polled ring's avail idx moved and served it.
        self.ring_serves = 0

    def poll_ring(self, probe: RingProbe) -> None:
        """Poll ``probe``'s ring while spinning, with its notifications off, until `unpoll_ring`.

        The ring's owner must still serve notifications that arrive (a driver may notify
        before it sees they are off, and they are on whenever the spinner is parked).
        """
        if probe not in self._rings:
            self._rings = (*self._rings, probe)

    def unpoll_ring(self, probe: RingProbe) -> None:
        """Stop polling ``probe``'s ring (its notification setting is left as it is: the
        owner stops serving it, or makes it loud itself)."""
        self._rings = tuple(r for r in self._rings if r is not probe)

    def watch(self, fd: int, handler: Callable[[], None] | None = None) -> None:
        """Spin on ``fd`` (readable) too, until `unwatch`.

        With a ``handler``, a spin that finds ``fd`` readable calls it (on the loop's thread)
        instead of letting trio wake the task that waits for ``fd``: no task switch, and that
        task's wait stays armed without being re-registered. The handler must do what the task
        would (consume the event: trio then does not report it), and the task must tolerate
        being woken later with nothing to do. An exception in it is logged and not raised.
        """
        if fd in self._watched:
            return
        # Registered through a duplicate that `unwatch` closes: a descriptor closed before
        # `unwatch` (the front-end's kick eventfd, a socket the back-end replaced) would
        # otherwise stay in the epoll set for as long as its file lives elsewhere (the
        # front-end holds the other end of an eventfd), impossible to unregister.
        try:
            dup = os.dup(fd)
        except OSError as exc:  # closed already: never fatal, just not hot
            logger.debug("busy poll: cannot watch fd %d: %s", fd, exc)
            return
        try:
            self._epoll.register(dup, select.EPOLLIN)
        except OSError as exc:  # not pollable (a regular file)
            os.close(dup)
            logger.debug("busy poll: cannot watch fd %d: %s", fd, exc)
            return
        self._watched[fd] = dup
        if handler is not None:
            self._handlers[dup] = handler
            self._wait_epoll.register(dup, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        """Stop spinning on ``fd``."""
        dup = self._watched.pop(fd, None)
        if dup is not None:
            if self._handlers.pop(dup, None) is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._wait_epoll.unregister(dup)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(dup)
            os.close(dup)
        self.wake(fd)  # its task waits for trio again

    async def wait_readable(self, fd: int) -> None:
        """For the task that serves a watched descriptor: wait until ``fd`` may be readable.

        While the loop waits in our epoll and ``fd`` has a handler, the handler serves every
        event of ``fd`` and this parks until that ends (`unwatch`, the spinner's end) or
        `wake`, or raises `trio.ClosedResourceError` after `notify_closing`; otherwise it is
        trio's `wait_readable`. Either way the caller must cope with finding nothing to read
        (the handler may have taken it).
        """
        dup = self._watched.get(fd)
        if self._loop_fd < 0 or dup is None or dup not in self._handlers or fd in self._owned:
            await trio.lowlevel.wait_readable(fd)
            return
        task = trio.lowlevel.current_task()
        self._owned[fd] = task

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if self._owned.get(fd) is task:
                del self._owned[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if fd in self._closing:
            self._closing.discard(fd)
            raise trio.ClosedResourceError("another task closed this fd")

    def wake(self, fd: int) -> None:
        """Wake the task parked in `wait_readable` for ``fd``, if any (it returns)."""
        task = self._owned.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task)

    def notify_closing(self, fd: int) -> None:
        """`trio.lowlevel.notify_closing` for a task parked in `wait_readable` (call both
        before closing ``fd``): it raises `trio.ClosedResourceError`."""
        if fd in self._owned:
            self._closing.add(fd)
            self.wake(fd)

    def activity(self) -> None:
        """A watched descriptor's event was handled: adapt the window to the wait that ended
        and arm a spin for the loop's next idle moment if it is worth it."""
        self._unclaimed = 0
        task = self._parked
        if task is None:
            return  # spinning, or armed already: the window only adapts on a missed spin
        now = time.perf_counter_ns()
        window = adjust_window(
            self.window_ns, now - self._parked_at, self.max_ns, grow=self.grow, shrink=self.shrink
        )
        self.window_ns = window
        worth_it = self.worth_it
        if window and (worth_it is None or worth_it()):
            self._parked = None
            trio.lowlevel.reschedule(task)
        else:
            self._parked_at = now  # measure the next wait from here

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spin whenever armed and the loop is idle; park otherwise. Runs until cancelled."""
        poll = self._epoll.poll
        clock = time.perf_counter_ns
        yield_cpu = os.sched_yield
        others_runnable = _others_runnable()
        task = trio.lowlevel.current_task()
        self._others_runnable = others_runnable
        hook = _install_loop_wait(self) if self.sleep_here else None
        if hook is not None:
            self._wait_epoll.register(hook[2], select.EPOLLIN)
            self._loop_fd = hook[2]
        task_status.started()
        try:
            while True:
                window = self.window_ns
                start = clock()
                if window and self._watched:
                    await wait_all_tasks_blocked()
                    start = clock()
                    # Back to the loop at the latest after this (its timers, the vhost-user
                    # socket and every descriptor nobody spins on wait meanwhile).
                    slice_end = start + self.slice_ns
                    again = False  # back to the loop, then spin again (else park)
                    while True:
                        self.spins += 1
                        end = start + window
                        hit = False
                        claimed = False
                        rings = self._rings
                        if rings:
                            self._quiet = True
                            for ring in rings:
                                ring.quiet()
                        while True:
                            events = poll(0)
                            if events:
                                hit = True
                                claimed = self._dispatch(events)
                                break
                            # Looked at after the descriptors: the ring we quieted was
                            # published before the driver saw the flag, or after it.
                            if rings and self._serve_rings(rings):
                                hit = claimed = True
                                break
                            if clock() >= end:
                                break
                            # A thread that wants this CPU (a guest's vCPU, the storage server)
                            # gets it: spinning must only use time nobody else wants.
                            yield_cpu()
                        if not hit:
                            break  # missed: park below
                        self.hits += 1
                        self._unclaimed += 1
                        worth_it = self.worth_it
                        if self._unclaimed >= _MAX_UNCLAIMED or not (
                            worth_it is None or worth_it()
                        ):
                            break  # park below
                        start = clock()
                        if not claimed or start >= slice_end or others_runnable():
                            # A descriptor only the loop serves is ready, a handler woke a
                            # task, or the slice is over: the loop runs, then we spin again
                            # at its next idle moment (a hit needs no change of window).
                            again = True
                            break
                        # Every event was served here and nothing else wants to run: spin on
                        # without a trip through the loop (~14 us per trip on these machines,
                        # paid twice per request at queue depth 1).
                        window = self.window_ns
                    if again:
                        continue
                # Missed (or not armed): sleep like everyone else until the next activity,
                # which measures how long this wait really was. The rings notify again first.
                if self._quiet:
                    self._make_loud()
                self._parked = task
                self._parked_at = start
                await trio.lowlevel.wait_task_rescheduled(self._abort)
        finally:
            self._parked = None
            if self._quiet:
                self._make_loud()
            if hook is not None:
                runner, hooked, fd = hook
                if runner.io_manager is hooked:
                    runner.io_manager = hooked._real
                self._loop_fd = -1
                with contextlib.suppress(OSError, ValueError):
                    self._wait_epoll.unregister(fd)
                for owned in list(self._owned):
                    self.wake(owned)  # their descriptors are trio's again

    def _loop_wait(self, timeout: float, loop_get_events: Callable[[float], Any]) -> Any:
        """The loop's wait for events (up to ``timeout`` seconds), taken in our epoll.

        Our set holds the handlers' descriptors and trio's epoll descriptor, which is
        readable whenever a descriptor a task waits on through trio is ready or a thread or a
        signal woke the loop: then trio collects its events (a zero-timeout look). Handlers'
        events are served here, and the wait goes on until a handler woke a task, trio has
        events, or the timeout is over.
        """
        if self._loop_fd < 0:
            return loop_get_events(timeout)
        poll = self._wait_epoll.poll
        handlers = self._handlers
        loop_fd = self._loop_fd
        others_runnable = self._others_runnable
        end = 0.0
        if timeout > 0:
            end = time.perf_counter() + timeout
        # A handler that leaves its descriptor readable (a bug, or a queue being stopped)
        # must not keep the loop here: after this many rounds trio gets its trip.
        rounds = _MAX_UNCLAIMED
        while True:
            events = poll(timeout)
            if not events:
                return events  # timed out (or nothing ready at a zero timeout)
            self.sleeps += 1
            loop_ready = False
            for fd, _ in events:
                if fd == loop_fd:
                    loop_ready = True
                    continue
                handler = handlers.get(fd)
                if handler is None:
                    continue  # unwatched by an earlier handler of this batch
                self.sleep_dispatched += 1
                try:
                    handler()
                except Exception:
                    logger.exception("busy poll: a handler failed")
            if loop_ready:
                return loop_get_events(0)
            rounds -= 1
            if timeout <= 0 or not rounds or others_runnable():
                return []  # a handler woke a task (or this was only a look)
            timeout = end - time.perf_counter()
            if timeout <= 0:
                return []

    def _serve_rings(self, rings: tuple[RingProbe, ...]) -> bool:
        """Serve each polled ring whose avail idx moved; True if one did."""
        served = False
        for ring in rings:
            try:
                if ring.moved():
                    served = True
                    self.ring_serves += 1
                    ring.serve()
            except Exception:
                logger.exception("busy poll: serving a polled ring failed")
        return served

    def _make_loud(self) -> None:
        """Before parking: every polled ring notifies again, then is looked at once more
        (2.7.10: a buffer made available before the driver saw notifications back on would
        otherwise wait for a notification that never comes)."""
        self._quiet = False
        rings = self._rings
        for ring in rings:
            try:
                ring.loud()
            except Exception:
                logger.exception("busy poll: a polled ring failed")
        self._serve_rings(rings)

    def _dispatch(self, events: list[tuple[int, int]]) -> bool:
        """Hand each ready descriptor to its handler; False when one has none (the loop must
        wake the task that waits for it)."""
        handlers = self._handlers
        claimed = True
        for dup, _ in events:
            handler = handlers.get(dup)
            if handler is None:
                claimed = False
                continue  # trio wakes the task waiting for it
            self.dispatched += 1
            try:
                handler()
            except Exception:
                logger.exception("busy poll: a handler failed")
        return claimed

    def _abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def close(self) -> None:
        """Release the epoll descriptor and the duplicates."""
        for fd in list(self._watched):
            self.unwatch(fd)
        self._epoll.close()
        self._wait_epoll.close()
