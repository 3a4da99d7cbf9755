"""An optional pool of worker threads for back-end calls that would block.

Holds `IoWorkerPool`: a fixed set of stdlib threads draining a queue of zero-argument jobs.
A block device uses it only when a non-blocking read (``preadv(RWF_NOWAIT)``) could not be
served from the page cache, so the common case never leaves the caller's thread. Knows
nothing about SCSI; a job is responsible for calling its own completion callback.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["IoWorkerPool"]

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class IoWorkerPool:
    """``threads`` daemon threads running submitted jobs in FIFO order.

    A job that raises is logged and dropped: jobs must catch their own errors and complete
    their command (the block device's jobs do).
    """

    def __init__(self, threads: int = 4, name: str = "scsi-io") -> None:
        if threads < 1:
            raise ValueError("an IoWorkerPool needs at least one thread")
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> int:
        """Jobs queued or running (a snapshot): a caller that busy-waits for their results
        would hold the GIL the workers need to deliver them."""
        return self._busy

    def submit(self, job: Job) -> None:
        """Queue ``job`` to run on a worker thread."""
        if self._closed:
            raise RuntimeError("IoWorkerPool is closed")
        with self._busy_lock:
            self._busy += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                logger.exception("I/O job failed")
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def close(self, wait: bool = True) -> None:
        """Stop the workers after the queued jobs have run."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()
