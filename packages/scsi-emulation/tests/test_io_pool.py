"""IoWorkerPool: jobs run on its threads, and `busy` counts those queued or running."""

from __future__ import annotations

import threading

import pytest
from scsi_emulation.io_pool import IoWorkerPool


def test_busy_counts_queued_and_running_jobs_until_they_end() -> None:
    pool = IoWorkerPool(1, name="test-io")
    release = threading.Event()
    started = threading.Event()
    done: list[str] = []
    try:
        assert pool.busy == 0

        def blocking() -> None:
            started.set()
            release.wait(10)
            done.append("first")

        pool.submit(blocking)
        pool.submit(lambda: done.append("second"))
        assert started.wait(10)
        assert pool.busy == 2  # one running, one queued behind it
        release.set()
    finally:
        pool.close()
    assert done == ["first", "second"]
    assert pool.busy == 0


def test_a_failing_job_is_no_longer_busy() -> None:
    pool = IoWorkerPool(2, name="test-io")

    def fail() -> None:
        raise OSError("disk gone")

    try:
        for _ in range(10):
            pool.submit(fail)
    finally:
        pool.close()
    assert pool.busy == 0
    with pytest.raises(RuntimeError):
        pool.submit(fail)
