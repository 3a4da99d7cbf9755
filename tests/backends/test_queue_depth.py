"""A queue depth of 32 through the vhost-user daemon keeps about 32 requests in flight at a
real NBD server: nbdkit's delay filter makes every request take 20 ms, so one request at a
time gives ~50 IOPS and 32 in flight ~1,600. Driven by ../shared/tools/vu-bench.c."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

import pytest

from tests.backends import vu_bench
from tests.backends.servers import NbdServer
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

DELAY_MS = 20


def daemon_argv(socket: pathlib.Path, *luns: str) -> list[str]:
    """The daemon under this interpreter (the one that imports the Ceph bindings, if any)."""
    return [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", *luns,
    ]  # fmt: skip


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_queue_depth_32_reaches_the_nbd_server(
    nbdkit_custom: Callable[..., NbdServer], tmp_path: pathlib.Path, write: bool
) -> None:
    binary = vu_bench.build()
    server = nbdkit_custom(
        "--threads", "64", "memory", "256M", f"rdelay={DELAY_MS}ms", f"wdelay={DELAY_MS}ms",
        filters=("delay",),
    )  # fmt: skip
    socket = tmp_path / "vds.sock"
    daemon = RunningDaemon(daemon_argv(socket, server.uri), socket, tmp_path / "daemon.log")
    with daemon:
        one = vu_bench.run(binary, socket, qd=1, seconds=2, pid=daemon.pid, write=write)
        many = vu_bench.run(binary, socket, qd=32, seconds=2, pid=daemon.pid, write=write)
    log = daemon.log()
    print(f"\nqd=1: {one['iops']:.0f} IOPS, qd=32: {many['iops']:.0f} IOPS")
    assert one["errors"] <= 1 and many["errors"] <= 1, log  # the power-on UNIT ATTENTION
    # One at a time is bounded by the delay; 32 in flight must overlap ~32 delays.
    assert one["iops"] <= 1.2 * 1000 / DELAY_MS, one
    assert many["iops"] >= 20 * one["iops"], (one, many, log)
    assert "Traceback" not in log, log
