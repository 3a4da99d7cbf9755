"""CompletionChannel: posts from many threads arrive once each; posts after close are dropped
without touching the released eventfd (remote storage completes after a disconnect)."""

from __future__ import annotations

import os
import threading

import trio
from vhost_device_scsi.completions import CompletionChannel, deferred_wakeups


async def test_posts_from_threads_arrive_once_each() -> None:
    channel: CompletionChannel[int, str] = CompletionChannel()
    try:

        def poster(base: int) -> None:
            for i in range(200):
                channel.post(base + i, "done")

        threads = [threading.Thread(target=poster, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        seen: list[int] = []
        with trio.fail_after(10):
            while len(seen) < 800:
                await channel.wait()
                seen += [item for item, _ in channel.drain()]
        for t in threads:
            t.join()
        assert sorted(seen) == sorted(k * 1000 + i for k in range(4) for i in range(200))
    finally:
        channel.close()


def test_posts_after_close_are_dropped_and_leave_other_fds_alone() -> None:
    channel: CompletionChannel[int, str] = CompletionChannel()
    channel.post(1, "before")
    channel.close()
    # The eventfd's number is free now; whatever reuses it must not receive our counter bumps.
    r, w = os.pipe()
    try:
        channel.post(2, "after")  # must neither raise nor write to the reused descriptor
        os.set_blocking(r, False)
        try:
            leaked = os.read(r, 64)
        except BlockingIOError:
            leaked = b""
        assert leaked == b""
        assert len(channel) == 0 and list(channel.drain()) == []
    finally:
        os.close(r)
        os.close(w)
    channel.close()  # idempotent


def _counter(channel: CompletionChannel[int, str]) -> int:
    """The eventfd's counter, read (and so reset) without blocking; 0 when unset."""
    try:
        return os.eventfd_read(channel._fd)
    except BlockingIOError:
        return 0


def test_only_the_post_into_an_empty_queue_writes_the_eventfd() -> None:
    channel: CompletionChannel[int, str] = CompletionChannel()
    try:
        for i in range(5):
            channel.post(i, "done")
        assert _counter(channel) == 1  # one wake-up for the burst
        assert [item for item, _ in channel.drain()] == [0, 1, 2, 3, 4]
        channel.post(5, "done")  # the queue was drained: this one must wake the owner again
        assert _counter(channel) == 1
    finally:
        channel.close()


async def test_a_post_racing_with_the_drain_is_never_stranded() -> None:
    """Posters run while the owner drains: every item is seen, whatever the interleaving."""
    channel: CompletionChannel[int, str] = CompletionChannel()
    total = 20000
    try:

        def poster(base: int) -> None:
            for i in range(total // 2):
                channel.post(base + i, "done")

        threads = [threading.Thread(target=poster, args=(k * total,)) for k in range(2)]
        for t in threads:
            t.start()
        seen = 0
        with trio.fail_after(20):
            while seen < total:
                await channel.wait()
                for _ in channel.drain():
                    seen += 1
        for t in threads:
            t.join()
        assert seen == total and len(channel) == 0
    finally:
        channel.close()


def test_deferred_posts_on_the_owner_thread_skip_the_eventfd() -> None:
    channel: CompletionChannel[int, str] = CompletionChannel()
    try:
        with deferred_wakeups():
            channel.post(1, "inline")
            channel.post(2, "inline")
        assert _counter(channel) == 0  # no system call, no wake-up: the owner drains now
        assert [item for item, _ in channel.drain()] == [1, 2]
        channel.post(3, "outside")  # after the block, posts wake the owner again
        assert _counter(channel) == 1
        assert [item for item, _ in channel.drain()] == [3]
    finally:
        channel.close()


def test_deferral_is_only_for_the_thread_that_entered_it() -> None:
    channel: CompletionChannel[int, str] = CompletionChannel()
    try:
        with deferred_wakeups():
            worker = threading.Thread(target=channel.post, args=(7, "worker"))
            worker.start()
            worker.join()
            # A worker's post must still wake the owner: it may arrive after the drain.
            assert _counter(channel) == 1
        assert [item for item, _ in channel.drain()] == [7]
    finally:
        channel.close()
