"""A guest's queue depth reaches a real NBD server through the vhost-user daemon: requests on
one virtqueue are not serialized on their way to the storage.

nbdkit's delay filter makes every request take 20 ms, and its log filter (outermost, so it
sees each request arrive and return) records when each one is in progress. The project's own
vhost-user front-end keeps 1, then 32, READ(10) or WRITE(10) commands in flight on one request
queue; the server must see ~1, then ~32 requests at once, and the rate must scale to match.
The margins are wide on purpose: this is about concurrency, not speed.
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Callable, Iterable

import pytest

from tests.backends.queue_depth_guest import LoadResult, QueueDepthGuest
from tests.backends.servers import NbdServer
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

DELAY_MS = 20
SECONDS = 1.0
DEEP = 32

# nbdkit-log-filter(1) "LOG FILE FORMAT": "connection=N Read id=M ..." when a request
# arrives, "connection=N ...Read id=M return=..." when it returns.
_LOG_LINE = re.compile(r"connection=(\d+) (\.\.\.)?(?:Read|Write) id=(\d+)")


def daemon_argv(socket: pathlib.Path, *luns: str) -> list[str]:
    """The daemon under this interpreter (the one that imports the Ceph bindings, if any)."""
    return [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", *luns,
    ]  # fmt: skip


def max_in_flight(lines: Iterable[str]) -> int:
    """The most reads and writes the log shows in progress at the same time."""
    open_: set[tuple[str, str]] = set()
    most = 0
    for line in lines:
        match = _LOG_LINE.search(line)
        if match is None:
            continue
        connection, leaving, request = match.groups()
        if leaving:
            open_.discard((connection, request))
        else:
            open_.add((connection, request))
            most = max(most, len(open_))
    return most


def test_max_in_flight_reads_the_log_format() -> None:
    log = [
        "2020-08-06 02:07:23.080712 connection=1 Connect export='' tls=0 size=0x400",
        "2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...",
        "2020-08-06 02:07:23.080908 connection=1 Write id=2 offset=0x0 count=0x200 fua=0 ...",
        "2020-08-06 02:07:23.080909 connection=2 Read id=1 offset=0x0 count=0x200 ...",
        "2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0",
        "2020-08-06 02:07:23.080928 connection=1 Read id=3 offset=0x0 count=0x200 ...",
        "2020-08-06 02:07:23.080929 connection=1 ...Write id=2 return=0",
        "2020-08-06 02:07:23.080930 connection=2 ...Read id=1 return=0",
        "2020-08-06 02:07:23.080931 connection=1 ...Read id=3 return=0",
    ]
    assert max_in_flight(log) == 3
    assert max_in_flight(log[4:]) == 1  # a leave without its arrival is ignored
    assert max_in_flight([]) == 0


async def measure(
    guest: QueueDepthGuest, nbd_log: pathlib.Path, depth: int, write: bool
) -> tuple[LoadResult, int]:
    """One run at ``depth``: its result and the most requests in flight at the server."""
    before = len(nbd_log.read_text().splitlines())
    result = await guest.keep_in_flight(depth, SECONDS, write=write)
    # Every command has completed, so the server has logged every return: the lines after
    # ``before`` are exactly this run's requests.
    return result, max_in_flight(nbd_log.read_text().splitlines()[before:])


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
async def test_queue_depth_32_reaches_the_nbd_server(
    nbdkit_custom: Callable[..., NbdServer], tmp_path: pathlib.Path, write: bool
) -> None:
    nbd_log = tmp_path / "nbdkit-requests.log"
    server = nbdkit_custom(
        "--threads", "64", "memory", "256M", f"rdelay={DELAY_MS}ms", f"wdelay={DELAY_MS}ms",
        f"logfile={nbd_log}", filters=("log", "delay"),
    )  # fmt: skip
    socket = tmp_path / "vds.sock"
    daemon = RunningDaemon(daemon_argv(socket, server.uri), socket, tmp_path / "daemon.log")
    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            await guest.clear_unit_attention()
            one, one_at_server = await measure(guest, nbd_log, 1, write)
            many, many_at_server = await measure(guest, nbd_log, DEEP, write)
        finally:
            await guest.aclose()
    log = daemon.log()
    print(
        f"\nqd=1: {one.iops:.0f} IOPS, {one_at_server} in flight at the server;"
        f" qd={DEEP}: {many.iops:.0f} IOPS, {many_at_server} in flight at the server"
    )
    assert one.failed == 0 and many.failed == 0, (one, many, log)
    assert one.completed > 0 and many.completed > 0, (one, many)
    # The guest's depth is what the server sees: one at a time stays one at a time, and 32 on
    # one virtqueue are not serialized anywhere on the way (the daemon, its NBD client).
    assert one_at_server == 1, (one_at_server, log)
    assert many_at_server >= DEEP // 2, (many_at_server, log)
    # The delay bounds one at a time; the overlapping delays show in the rate too.
    assert one.iops <= 1.2 * 1000 / DELAY_MS, one
    assert many.iops >= DEEP // 2 * one.iops, (one, many, log)
    assert "Traceback" not in log, log
