"""Micro-benchmark of the RBD back-end: 4 KiB random reads at a queue depth, IOPS and process
CPU time per request (librbd's threads included), completion thread vs polled mode.

Not collected by pytest (the name does not start with ``test_``). Run from the repository root:

    python3 packages/scsi-emulation/tests/bench_rbd.py [--conf CEPH.CONF] [--seconds 3]
        [--depth 32] [--rounds 2] [--baseline OLD_RBD.py]

Without ``--conf`` a single-node cluster is started (tests/backends/ceph.py) and stopped.
Modes: ``threaded`` (completions on the back-end's thread, handed to the driving thread through
a deque and an eventfd, as the daemon does), ``polled`` (one thread: select() on poll_fileno,
service(), resubmit from ``done`` between plug/unplug). ``--baseline`` loads another module
defining ``RbdBackend`` (e.g. the python3-rbd one from git history) and runs it threaded too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import pathlib
import random
import select
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from scsi_emulation.backend import BackendError, StorageBackend
from scsi_emulation.backends import librbd
from scsi_emulation.backends.rbd import RbdBackend

BLOCK = 4096
SPAN = 64 << 20
IMAGE = f"bench-{os.getpid()}"

Opener = Callable[[str], StorageBackend]


def _drive_threaded(backend: StorageBackend, depth: int, seconds: float) -> int:
    """Completions arrive on another thread; they are posted to a deque plus an eventfd, and
    this thread resubmits (the daemon's path before polling)."""
    event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    finished: collections.deque[int] = collections.deque()
    buffers = [memoryview(bytearray(BLOCK)) for _ in range(depth)]
    rng = random.Random(1)
    blocks = SPAN // BLOCK

    def submit(slot: int) -> None:
        def done(error: BackendError | None) -> None:
            finished.append(slot)
            os.eventfd_write(event, 1)

        backend.submit_read(rng.randrange(blocks) * BLOCK, [buffers[slot]], BLOCK, done)

    count = 0
    end = time.monotonic() + seconds
    for slot in range(depth):
        submit(slot)
    in_flight = depth
    while in_flight:
        select.select([event], [], [], 1)
        try:
            os.eventfd_read(event)
        except BlockingIOError:
            continue
        stop = time.monotonic() >= end
        while finished:
            slot = finished.popleft()
            count += 1
            if stop:
                in_flight -= 1
            else:
                submit(slot)
    os.close(event)
    return count


def _drive_polled(backend: StorageBackend, depth: int, seconds: float) -> int:
    """One thread: wait on poll_fileno, service(), resubmit from ``done``."""
    assert backend.start_polling()
    buffers = [memoryview(bytearray(BLOCK)) for _ in range(depth)]
    rng = random.Random(1)
    blocks = SPAN // BLOCK
    count = 0
    in_flight = 0
    end = time.monotonic() + seconds
    stop = False

    def submit(slot: int) -> None:
        nonlocal in_flight

        def done(error: BackendError | None) -> None:
            nonlocal count, in_flight
            count += 1
            in_flight -= 1
            if not stop:
                submit(slot)

        in_flight += 1
        backend.submit_read(rng.randrange(blocks) * BLOCK, [buffers[slot]], BLOCK, done)

    backend.plug()
    for slot in range(depth):
        submit(slot)
    backend.unplug()
    while in_flight:
        fd = backend.poll_fileno()
        select.select([fd] if fd is not None else [], [], [], backend.poll_interval)
        stop = time.monotonic() >= end
        backend.plug()
        backend.service()
        backend.unplug()
    return count


def _measure(
    opener: Opener, location: str, mode: str, depth: int, seconds: float
) -> tuple[float, float]:
    backend = opener(location)
    try:
        drive = _drive_polled if mode == "polled" else _drive_threaded
        wall, cpu = time.monotonic(), time.process_time()
        n = drive(backend, depth, seconds)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    finally:
        backend.close()
    return n / wall, cpu / n * 1e6


def _load_baseline(path: str) -> Opener:
    spec = importlib.util.spec_from_file_location("baseline_rbd", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    opener: Opener = module.RbdBackend.open
    return opener


def _prepare_image(conf: str) -> str:
    with (
        librbd.Cluster(librbd.ClusterSettings(conf=conf)) as cluster,
        cluster.open_ioctx("rbd") as ioctx,
    ):
        with contextlib.suppress(BackendError):
            librbd.remove_image(ioctx, IMAGE)
        librbd.create_image(ioctx, IMAGE, SPAN)
    location = f"rbd:rbd/{IMAGE}?conf={conf}"
    backend = RbdBackend.open(location)
    try:  # fill it: reads of absent objects would cost the OSD nothing
        chunk = memoryview(os.urandom(4 << 20))
        for offset in range(0, SPAN, len(chunk)):
            backend.write(offset, [chunk], len(chunk))
    finally:
        backend.close()
    return location


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", help="ceph.conf of a running cluster (default: start one)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--depth", type=int, action="append", help="queue depth (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="a module file defining another RbdBackend")
    args = parser.parse_args()
    depths: list[int] = args.depth or [1, 32]
    root: pathlib.Path | None = None
    conf = args.conf
    stop: Any = None
    if conf is None:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
        from tests.backends.ceph import ceph_down, start_ceph

        root = pathlib.Path(tempfile.mkdtemp(prefix="bench-rbd-"))
        conf = str(start_ceph(root))
        stop = ceph_down
    try:
        location = _prepare_image(conf)
        modes: list[tuple[str, Opener, str]] = [
            ("ctypes threaded", RbdBackend.open, "threaded"),
            ("ctypes polled", RbdBackend.open, "polled"),
        ]
        if args.baseline:
            modes.insert(0, ("baseline threaded", _load_baseline(args.baseline), "threaded"))
        for depth in depths:
            for round_ in range(args.rounds):
                for name, opener, mode in modes:
                    iops, us = _measure(opener, location, mode, depth, args.seconds)
                    print(
                        f"qd={depth:<3} round={round_} {name:<18} iops={iops:8.0f} "
                        f"cpu_us_per_req={us:6.1f}",
                        flush=True,
                    )
    finally:
        if root is not None:
            stop(root)
        else:
            with (
                librbd.Cluster(librbd.ClusterSettings(conf=conf)) as cluster,
                cluster.open_ioctx("rbd") as ioctx,
                contextlib.suppress(BackendError),
            ):
                librbd.remove_image(ioctx, IMAGE)


if __name__ == "__main__":
    main()
