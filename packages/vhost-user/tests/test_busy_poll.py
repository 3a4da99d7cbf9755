"""BusyPoll: the adaptive window (pure) and the spinner in a real trio loop."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from vhost_user.busy_poll import _MAX_UNCLAIMED, START_NS, BusyPoll, adjust_window

MAX = 256_000

windows = st.one_of(st.just(0), st.integers(START_NS, MAX))
waits = st.integers(0, 10 * MAX)


@given(windows, waits)
def test_window_stays_off_or_between_start_and_max(window: int, blocked: int) -> None:
    new = adjust_window(window, blocked, MAX)
    assert new == 0 or START_NS <= new <= MAX


@given(windows, waits)
def test_a_covered_wait_changes_nothing(window: int, blocked: int) -> None:
    if blocked <= window:
        assert adjust_window(window, blocked, MAX) == window


@given(windows, st.integers(MAX + 1, 100 * MAX))
def test_a_wait_past_the_cap_shrinks(window: int, blocked: int) -> None:
    new = adjust_window(window, blocked, MAX)
    assert new < window or new == window == 0


@given(windows, waits)
def test_a_wait_a_longer_poll_would_catch_grows(window: int, blocked: int) -> None:
    if window < blocked <= MAX and window < MAX:
        new = adjust_window(window, blocked, MAX)
        assert new > window
        assert new == min(window * 2, MAX) if window else new == START_NS


def test_cap_below_start_means_off() -> None:
    assert adjust_window(0, 10, START_NS - 1) == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        BusyPoll(-1)
    with pytest.raises(ValueError):
        BusyPoll(1000, grow=1)


def _write_later(fd: int, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        os.eventfd_write(fd, 1)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@asynccontextmanager
async def spinning(
    busy: BusyPoll, handler: Callable[[int], None] | None = None
) -> AsyncIterator[int]:
    """``busy`` running in a nursery and watching a fresh eventfd (yielded), with
    ``handler(fd)`` as its handler if given; all released afterwards."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        busy.watch(fd, None if handler is None else partial(handler, fd))
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            yield fd
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(fd)


async def _armed(busy: BusyPoll, window_ns: int) -> None:
    """Let the spinner park, then give it a window and report activity (which arms it)."""
    await trio.testing.wait_all_tasks_blocked()
    busy.window_ns = window_ns
    busy.activity()


async def test_a_spin_catches_an_event_and_the_loop_does_not_sleep() -> None:
    busy = BusyPoll(500_000_000)
    async with spinning(busy) as fd:
        await _armed(busy, 400_000_000)
        writer = _write_later(fd, 0.005)
        # This task blocks; the spinner spins on its own thread's time and sees the write.
        await trio.lowlevel.wait_readable(fd)
        writer.join()
        assert busy.spins >= 1
        assert busy.hits >= 1


async def test_an_idle_loop_stops_spinning_and_uses_no_cpu() -> None:
    busy = BusyPoll(2_000_000)
    async with spinning(busy):
        await _armed(busy, 2_000_000)
        await trio.sleep(0.05)  # one 2 ms spin misses, then the spinner parks
        spins = busy.spins
        assert spins >= 1
        assert busy.hits == 0
        cpu = time.process_time()
        await trio.sleep(0.3)
        assert busy.spins == spins
        assert time.process_time() - cpu < 0.1  # parked, not spinning for 300 ms


async def test_nothing_spins_when_not_worth_it() -> None:
    asked: list[bool] = []

    def worth_it() -> bool:
        asked.append(True)
        return False

    busy = BusyPoll(2_000_000, worth_it=worth_it)
    async with spinning(busy):
        await _armed(busy, 2_000_000)
        await trio.sleep(0.05)
        assert asked
        assert busy.spins == 0


async def test_the_window_grows_to_catch_short_waits_and_shrinks_after_long_ones() -> None:
    busy = BusyPoll(50_000_000)  # 50 ms cap: waits of a few ms are worth catching
    async with spinning(busy):
        await trio.testing.wait_all_tasks_blocked()
        assert busy.window_ns == 0
        # Events 2 ms apart: each missed spin grows the window until one covers the wait.
        for _ in range(20):
            await trio.sleep(0.002)
            busy.activity()
        assert busy.window_ns >= START_NS
        grown = busy.window_ns
        # Waits longer than the cap: each halves the window, down to off.
        busy.max_ns = 1_000_000
        for _ in range(30):
            await trio.sleep(0.005)
            busy.activity()
            if not busy.window_ns:
                break
        assert busy.window_ns < grown
        assert busy.window_ns == 0


async def test_a_readable_descriptor_nobody_handles_does_not_spin_for_good() -> None:
    busy = BusyPoll(2_000_000)
    a, b = socket.socketpair()
    b.close()  # `a` is at EOF: readable for ever, and no task of ours reads it
    try:
        busy.watch(a.fileno())
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            await _armed(busy, 2_000_000)
            await trio.sleep(0.1)
            assert busy.hits == _MAX_UNCLAIMED
            hits = busy.hits
            cpu = time.process_time()
            await trio.sleep(0.1)
            assert busy.hits == hits  # parked until real activity
            # ... and not sleeping in its epoll either, which that descriptor would wake at once
            assert time.process_time() - cpu < 0.05
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        a.close()


def test_watch_keeps_its_own_duplicate_and_close_releases_it() -> None:
    busy = BusyPoll(1000_000)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    before = len(os.listdir("/proc/self/fd"))
    busy.watch(fd)
    busy.watch(fd)  # twice: one registration
    assert len(os.listdir("/proc/self/fd")) == before + 1
    # Closing the watched descriptor first is allowed: the duplicate is ours to release.
    os.close(fd)
    busy.unwatch(fd)
    assert len(os.listdir("/proc/self/fd")) == before - 1
    busy.unwatch(fd)  # unknown now: ignored
    busy.watch(12345)  # not open: ignored, logged
    with open(__file__, "rb") as f:
        busy.watch(f.fileno())  # a regular file cannot be polled: ignored
    busy.close()


async def test_a_handler_serves_the_event_and_the_waiting_task_stays_parked() -> None:
    busy = BusyPoll(500_000_000)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    served: list[int] = []
    woken: list[bool] = []

    def handler() -> None:
        served.append(os.eventfd_read(fd))  # consumes the event, as a device handler does
        busy.activity()

    async def waiter() -> None:
        await trio.lowlevel.wait_readable(fd)
        woken.append(True)

    try:
        busy.watch(fd, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            nursery.start_soon(waiter)
            await _armed(busy, 400_000_000)
            writer = _write_later(fd, 0.005)
            # The loop idles (this task waits on a condition nobody sets but the handler):
            # the spinner spins and catches the write before trio sees it.
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked()
                while not served:
                    await trio.testing.wait_all_tasks_blocked()
            writer.join()
            await trio.sleep(0.05)
            assert served == [1]
            assert busy.dispatched == 1
            assert not woken  # trio never reported the event the handler consumed
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(fd)


async def test_a_failing_handler_is_logged_and_spinning_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    busy = BusyPoll(500_000_000)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    calls: list[int] = []

    def handler() -> None:
        calls.append(os.eventfd_read(fd))
        raise RuntimeError("device bug")

    try:
        busy.watch(fd, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            for round_ in range(2):
                await _armed(busy, 400_000_000)
                writer = _write_later(fd, 0.002)
                with trio.fail_after(5):
                    while len(calls) <= round_:
                        await trio.testing.wait_all_tasks_blocked()
                writer.join()
            assert calls == [1, 1]
            assert "a handler failed" in caplog.text
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(fd)


class _LoopTrips(trio.abc.Instrument):
    """Counts the loop's waits for I/O: one per trip through trio's run loop."""

    def __init__(self) -> None:
        self.trips = 0

    def before_io_wait(self, timeout: float) -> None:
        self.trips += 1


@asynccontextmanager
async def relaying(busy: BusyPoll, events: int) -> AsyncIterator[list[int]]:
    """``busy`` running and armed, watching an eventfd whose handler consumes each event and,
    until ``events`` were served, makes the next one at once (a device whose next request is
    already there); the first event is written on entry. Yields the served list."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    served: list[int] = []

    def handler() -> None:
        os.eventfd_read(fd)
        served.append(1)
        busy.activity()
        if len(served) < events:
            os.eventfd_write(fd, 1)

    try:
        busy.watch(fd, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            await _armed(busy, 400_000_000)
            os.eventfd_write(fd, 1)
            yield served
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(fd)


async def test_events_the_handlers_serve_need_no_trip_through_the_loop() -> None:
    busy = BusyPoll(500_000_000)
    busy.slice_ns = 2_000_000_000  # longer than the test: only the events decide
    trips = _LoopTrips()
    trio.lowlevel.add_instrument(trips)
    try:
        async with relaying(busy, 200) as served:
            with trio.fail_after(5):
                while len(served) < 200:
                    await trio.sleep(0.001)
            counted = trips.trips
    finally:
        trio.lowlevel.remove_instrument(trips)
    assert busy.dispatched + busy.sleep_dispatched == 200  # in spins or in the loop's wait
    # Returning to the loop after every event would be 200 trips or more.
    assert counted < 50


async def test_a_spin_that_never_ends_still_lets_the_loop_run_each_slice() -> None:
    busy = BusyPoll(500_000_000)
    busy.slice_ns = 1_000_000
    async with relaying(busy, 10**9) as served:  # an event is always there
        start = time.monotonic()
        with trio.fail_after(5):
            for _ in range(5):
                await trio.sleep(0.01)  # timers fire: the loop gets its turns
        assert time.monotonic() - start < 1
        assert len(served) > 5


async def test_a_handler_that_wakes_a_task_hands_the_loop_back_at_once() -> None:
    busy = BusyPoll(500_000_000)
    busy.slice_ns = 2_000_000_000
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ready = trio.Event()
    seen: list[int] = []

    def handler() -> None:
        os.eventfd_read(fd)
        ready.set()  # reschedules the task below: the spinner must stop spinning for it
        busy.activity()
        if busy.dispatched < 100:
            os.eventfd_write(fd, 1)  # and there is more to serve straight away

    async def waiter() -> None:
        await ready.wait()
        seen.append(busy.dispatched)

    try:
        busy.watch(fd, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            nursery.start_soon(waiter)
            await _armed(busy, 400_000_000)
            os.eventfd_write(fd, 1)
            with trio.fail_after(5):
                while not seen:
                    await trio.sleep(0.001)
            assert seen[0] <= 3  # woken after the first event, not after a slice of them
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        os.close(fd)


# -- sleeping in the spinner's own epoll (BusyPoll.sleep_here) --------------------------------


def _write_every(fd: int, count: int, interval: float) -> threading.Thread:
    def run() -> None:
        for _ in range(count):
            time.sleep(interval)
            os.eventfd_write(fd, 1)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def test_with_no_spinning_a_handler_is_served_in_the_sleep_without_a_loop_trip() -> None:
    busy = BusyPoll(0)  # spinning off: what is left is the sleep in our own epoll
    served: list[int] = []
    done = trio.Event()
    events = 40

    def handler(fd: int) -> None:
        served.append(os.eventfd_read(fd))
        busy.activity()
        if sum(served) >= events:
            done.set()

    trips = _LoopTrips()
    async with spinning(busy, handler) as fd:
        trio.lowlevel.add_instrument(trips)
        writer = _write_every(fd, events, 0.002)
        with trio.fail_after(10):
            await done.wait()  # no timers of ours meanwhile: only the events decide
        counted = trips.trips
        trio.lowlevel.remove_instrument(trips)
        writer.join()
    assert sum(served) == events
    assert busy.spins == 0
    assert busy.sleep_dispatched == len(served)
    # Waking the loop for each event would be `events` trips or more.
    assert counted < events // 2


async def test_the_loop_s_timers_threads_and_descriptors_still_wake_it() -> None:
    busy = BusyPoll(0)
    a, b = socket.socketpair()
    try:
        async with spinning(busy, lambda _: None):
            # A deadline: the sleep ends at it, and uses no CPU meanwhile.
            cpu = time.process_time()
            start = time.monotonic()
            await trio.sleep(0.2)
            assert 0.2 <= time.monotonic() - start < 1
            assert time.process_time() - cpu < 0.1
            # A thread's call into the loop.
            token = trio.lowlevel.current_trio_token()
            called = trio.Event()

            def call_in() -> None:
                time.sleep(0.02)
                trio.from_thread.run_sync(called.set, trio_token=token)

            thread = threading.Thread(target=call_in)
            start = time.monotonic()
            thread.start()
            with trio.fail_after(5):
                await called.wait()
            thread.join()
            assert time.monotonic() - start < 1

            # A descriptor a task waits on that the spinner does not watch.
            def send() -> None:
                time.sleep(0.02)
                b.send(b"x")

            thread = threading.Thread(target=send)
            start = time.monotonic()
            thread.start()
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(a)
            thread.join()
            assert a.recv(1) == b"x"
            assert time.monotonic() - start < 1
            # trio.testing's idle detection with a cushion (the spinner must not take the
            # loop's sleep while someone waits for it).
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    finally:
        a.close()
        b.close()


async def test_handlers_activity_in_the_sleep_grows_the_window_and_arms_spins() -> None:
    busy = BusyPoll(50_000_000)
    served: list[int] = []
    done = trio.Event()

    def handler(fd: int) -> None:
        served.append(os.eventfd_read(fd))
        busy.activity()
        if sum(served) >= 30:
            done.set()

    async with spinning(busy, handler) as fd:
        writer = _write_every(fd, 30, 0.002)
        with trio.fail_after(10):
            await done.wait()
        writer.join()
    assert busy.window_ns >= START_NS  # waits of 2 ms are worth catching under a 50 ms cap
    assert busy.spins >= 1
    assert busy.hits >= 1


async def test_once_the_spinner_ends_the_loop_sleeps_as_before() -> None:
    busy = BusyPoll(0)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    calls: list[int] = []
    try:
        busy.watch(fd, lambda: calls.append(os.eventfd_read(fd)))
        async with trio.open_nursery() as nursery:
            await nursery.start(busy.run)
            writer = _write_later(fd, 0.01)
            with trio.fail_after(5):
                while not calls:
                    await trio.sleep(0.001)
            writer.join()
            nursery.cancel_scope.cancel()
        writer = _write_later(fd, 0.01)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(fd)  # trio's own wait sees it: nobody took it
        writer.join()
        assert calls == [1]
        assert os.eventfd_read(fd) == 1
    finally:
        busy.close()
        os.close(fd)


async def test_a_handler_s_descriptor_is_the_handler_s_alone_while_the_loop_waits_here() -> None:
    busy = BusyPoll(0)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    served: list[int] = []
    done = trio.Event()
    returned: list[int] = []

    def handler() -> None:
        served.append(os.eventfd_read(fd))
        if len(served) == 3:
            done.set()

    async def waiter() -> None:
        await busy.wait_readable(fd)
        returned.append(len(served))

    try:
        busy.watch(fd, handler)
        async with trio.open_nursery() as outer:
            spinner = trio.CancelScope()

            async def spin(task_status: trio.TaskStatus[None]) -> None:
                with spinner:
                    await busy.run(task_status=task_status)

            await outer.start(spin)
            outer.start_soon(waiter)
            with trio.fail_after(5):
                await trio.sleep(0.01)
                writer = _write_every(fd, 3, 0.005)
                await done.wait()
                writer.join()
                await trio.sleep(0.02)
                assert not returned  # parked throughout: trio never reported the descriptor
                busy.wake(fd)
                while not returned:
                    await trio.sleep(0.001)
                assert returned == [3]
                # Once the spinner ends, the descriptor is trio's again: a waiter parked
                # then is woken, and waits through trio from there on.
                outer.start_soon(waiter)
                await trio.sleep(0.01)
                spinner.cancel()
                while len(returned) < 2:
                    await trio.sleep(0.001)
                outer.start_soon(waiter)
                await trio.sleep(0.01)
                assert len(returned) == 2
                os.eventfd_write(fd, 1)
                while len(returned) < 3:
                    await trio.sleep(0.001)
            assert served == [1, 1, 1]  # the handler took nothing once the spinner ended
    finally:
        busy.close()
        os.close(fd)


async def test_a_handler_that_leaves_its_descriptor_readable_does_not_keep_the_loop() -> None:
    busy = BusyPoll(0)
    calls: list[bool] = []
    async with spinning(busy, lambda _: calls.append(True)) as fd:  # consumes nothing
        os.eventfd_write(fd, 1)  # readable for good
        start = time.monotonic()
        for _ in range(5):
            await trio.sleep(0.01)  # timers still fire, tasks still run
        assert time.monotonic() - start < 2
        assert calls


async def test_notify_closing_wakes_a_parked_waiter_as_trio_s_would() -> None:
    busy = BusyPoll(0)
    raised: list[BaseException] = []

    async def waiter(fd: int) -> None:
        try:
            await busy.wait_readable(fd)
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    async with spinning(busy, lambda _: None) as fd, trio.open_nursery() as nursery:
        nursery.start_soon(waiter, fd)
        await trio.sleep(0.01)
        trio.lowlevel.notify_closing(fd)  # trio has no waiter for it: nothing happens
        await trio.sleep(0.01)
        assert not raised
        busy.notify_closing(fd)
        with trio.fail_after(5):
            while not raised:
                await trio.sleep(0.001)
