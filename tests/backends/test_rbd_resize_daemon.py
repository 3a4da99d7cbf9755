"""An RBD image grown by another client is noticed by the daemon and announced: the LU's next
command gets UNIT ATTENTION (CAPACITY DATA HAS CHANGED) and a READ past the old end succeeds.

The daemon serves a 16 MiB image of the single-node Ceph cluster; ``rbd resize`` grows it to
32 MiB from outside; nothing is said on the control socket. librbd's header watch tells the
back-end, and the daemon's size check makes it visible (vhost_device_scsi.daemon).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import trio

from tests.backends.queue_depth_guest import RW10, QueueDepthGuest
from tests.backends.servers import CephCluster
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

MiB = 1 << 20
READ_10 = 0x28


async def _read_at(guest: QueueDepthGuest, lba: int, tag: int) -> bytes:
    """One READ(10) of 8 blocks at ``lba``; the response header fields as bytes."""
    guest._put_request(0, RW10.pack(READ_10, 0, lba, 0, 8, 0), 4096, False, tag)
    guest.queue.submit()
    with trio.fail_after(10):
        await guest.queue.wait_used(1)
    _, resp, _ = guest._slot(0, 4096)
    return bytes(guest.memory.memory.slice(resp, 32))


async def test_an_image_grown_outside_is_announced(
    ceph_cluster: CephCluster, tmp_path: pathlib.Path
) -> None:
    rbd = shutil.which("rbd")
    if rbd is None:
        pytest.skip("the rbd tool is not installed")
    conf = ["--conf", str(ceph_cluster.conf)]
    name = f"grow-{os.getpid()}"
    subprocess.run([rbd, *conf, "create", "--size", "16", f"rbd/{name}"], check=True)
    try:
        socket = tmp_path / "vds.sock"
        argv = [
            sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
            "--log-level", "info", "--control-socket", "none",
            f"rbd:rbd/{name}?conf={ceph_cluster.conf}",
        ]  # fmt: skip
        daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")
        old_blocks = 16 * MiB // 512
        with daemon:
            guest = await QueueDepthGuest.connect(str(socket))
            try:
                await guest.clear_unit_attention()
                assert guest._succeeded(0, 0)
                beyond = await _read_at(guest, old_blocks + 64, 1)
                assert not guest._succeeded(0, 4096)  # past the end: refused
                await trio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [rbd, *conf, "resize", "--size", "32", f"rbd/{name}"], check=True
                    )
                )
                # The daemon checks once a second; the first command after it gets the UA.
                answers: list[bytes] = []
                with trio.fail_after(20):
                    while True:
                        await trio.sleep(0.25)
                        answers.append(await _read_at(guest, old_blocks + 64, 2))
                        if guest._succeeded(0, 4096):
                            break
            finally:
                await guest.aclose()
        log = daemon.log()
        assert "resized outside" in log, log
        # Sense of the UA somewhere before the success: key 6, ASC/ASCQ 2A/09.
        sense = [a[12:] for a in answers[:-1]]
        assert any(s[2] & 0x0F == 0x06 and s[12:14] == b"\x2a\x09" for s in sense), (
            beyond,
            answers,
        )
        assert "Traceback" not in log, log
    finally:
        subprocess.run([rbd, *conf, "rm", f"rbd/{name}"], capture_output=True, check=False)
