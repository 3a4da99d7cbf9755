"""Micro-benchmark of the NBD back-end alone: threaded vs polled mode at queue depth 1 and 32.

Starts nbdkit's memory plugin on 127.0.0.1 (as benchmarks/host_backends_bench.py does) and
keeps QD 4 KiB random reads (or writes) in flight from one thread: threaded mode waits on a
semaphore the reader thread releases; polled mode select()s on `poll_fileno`, calls `service`
and resubmits from the ``done`` callback, with plug/unplug around each batch of
resubmissions (the daemon's pattern). Prints IOPS and this process's user and system CPU
microseconds per request (getrusage: all threads). Not collected by pytest (no ``test_`` prefix).

    python3 packages/scsi-emulation/tests/bench_nbd.py [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from scsi_emulation.backend import BackendError
from scsi_emulation.backends.nbd import NbdBackend

BLOCK = 4096
SPAN = 256 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_nbdkit() -> tuple[subprocess.Popen[bytes], str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        sys.exit("nbdkit is not installed")
    port = free_port()
    argv = [nbdkit, "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port)]
    argv += ["--threads", "64", "memory", "512M"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if not s.connect_ex(("127.0.0.1", port)):
                return proc, f"nbd://127.0.0.1:{port}/"
        time.sleep(0.02)
    proc.kill()
    sys.exit("nbdkit did not start")


class Load:
    """QD requests kept in flight, each slot with its own 4 KiB buffer."""

    def __init__(self, backend: NbdBackend, qd: int, write: bool) -> None:
        self.backend = backend
        self.qd = qd
        self.write = write
        self.buffers = [memoryview(bytearray(BLOCK)) for _ in range(qd)]
        self.rng = random.Random(1)
        self.completed = 0
        self.errors = 0
        self.stop = False
        self.outstanding = 0

    def submit(self, slot: int, done: Callable[[BackendError | None], None]) -> None:
        offset = self.rng.randrange(SPAN // BLOCK) * BLOCK
        self.outstanding += 1
        if self.write:
            self.backend.submit_write(offset, [self.buffers[slot]], BLOCK, False, done)
        else:
            self.backend.submit_read(offset, [self.buffers[slot]], BLOCK, done)


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


Result = tuple[float, float, float]  # IOPS, user and system CPU microseconds per request


def per_request(done: int, elapsed: float, before: tuple[float, float]) -> Result:
    user, system = cpu_times()
    return done / elapsed, (user - before[0]) / done * 1e6, (system - before[1]) / done * 1e6


def run_polled(uri: str, qd: int, write: bool, seconds: float) -> Result:
    backend = NbdBackend.connect(uri)
    assert backend.start_polling()
    load = Load(backend, qd, write)
    resubmit: list[int] = []

    def make_done(slot: int) -> Callable[[BackendError | None], None]:
        def done(error: BackendError | None) -> None:
            load.outstanding -= 1
            load.completed += 1
            if error is not None:
                load.errors += 1
            if not load.stop:
                resubmit.append(slot)

        return done

    dones = [make_done(i) for i in range(qd)]
    backend.plug()
    for i in range(qd):
        load.submit(i, dones[i])
    backend.unplug()
    start, cpu = time.monotonic(), cpu_times()
    end = start + seconds
    while True:
        fd = backend.poll_fileno()
        if fd is not None:
            select.select([fd], [], [], backend.poll_interval)
        backend.service()
        if resubmit:
            backend.plug()
            for slot in resubmit:
                load.submit(slot, dones[slot])
            resubmit.clear()
            backend.unplug()
        if time.monotonic() >= end:
            break
    result = per_request(load.completed, time.monotonic() - start, cpu)
    load.stop = True
    while load.outstanding:
        backend.service()
        time.sleep(0.001)
    backend.close()
    assert not load.errors, f"{load.errors} errors"
    return result


def run_threaded(uri: str, qd: int, write: bool, seconds: float) -> Result:
    backend = NbdBackend.connect(uri)
    load = Load(backend, qd, write)
    finished: list[int] = []
    wake = threading.Semaphore(0)
    lock = threading.Lock()

    def make_done(slot: int) -> Callable[[BackendError | None], None]:
        def done(error: BackendError | None) -> None:
            with lock:
                finished.append(slot)
                if error is not None:
                    load.errors += 1
            wake.release()

        return done

    dones = [make_done(i) for i in range(qd)]
    for i in range(qd):
        load.submit(i, dones[i])
    start, cpu = time.monotonic(), cpu_times()
    end = start + seconds
    while time.monotonic() < end:
        wake.acquire()
        with lock:
            slots = finished[:]
            finished.clear()
        load.completed += len(slots)
        load.outstanding -= len(slots)
        for slot in slots:
            load.submit(slot, dones[slot])
    result = per_request(load.completed, time.monotonic() - start, cpu)
    while load.outstanding:  # let the rest finish before closing
        wake.acquire()
        with lock:
            load.outstanding -= len(finished)
            finished.clear()
    backend.close()
    assert not load.errors, f"{load.errors} errors"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--qd", type=int, nargs="*", default=[1, 32])
    args = parser.parse_args()
    proc, uri = start_nbdkit()
    try:
        print(f"{'mode':9} {'op':5} {'qd':>3} {'IOPS':>9} {'user us/req':>11} {'sys us/req':>10}")
        for qd in args.qd:
            for write in (False, True):
                for _ in range(args.rounds):
                    for name, run in (("threaded", run_threaded), ("polled", run_polled)):
                        iops, user, system = run(uri, qd, write, args.seconds)
                        op = "write" if write else "read"
                        print(
                            f"{name:9} {op:5} {qd:>3} {iops:>9,.0f} {user:>11.1f} {system:>10.1f}",
                            flush=True,
                        )
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
