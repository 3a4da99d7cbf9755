"""Kill -9 the daemon with I/O in flight, start it again: every request completes, no data lost.

QEMU 7.2 cannot reconnect a vhost-user-scsi device, so the property is proven with the
project's own front-end (VhostUserFrontend.reconnect replays features, the inflight area, the
memory table and the vrings, as QEMU 8.2+ does with `reconnect=1`).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import trio
from scsi_core.status import Status
from vds_harness import ScsiGuest
from vhost_device_scsi import virtio_scsi as vs

MiB = 1 << 20
BLOCKS = 8  # 4 KiB per request


def start_daemon(sock: Path, image: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vhost_device_scsi",
            "--socket-path",
            str(sock),
            "--control-socket",
            "none",
            "--log-level",
            "warning",
            str(image),
        ]
    )


async def wait_listening(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(20):
        while True:
            assert proc.poll() is None
            if sock.exists():
                try:
                    s = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
                    await s.connect(str(sock))
                    s.close()
                    return
                except OSError:
                    pass
            await trio.sleep(0.05)


def rw10(op: int, lba: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, BLOCKS, 0)


async def test_kill_and_restart_with_io_in_flight(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    sock = tmp_path / "v.sock"
    proc = start_daemon(sock, image)
    guest = None
    try:
        await wait_listening(sock, proc)
        # (the probe connection above was a front-end that left at once; the daemon is back
        # to accepting)
        guest = await ScsiGuest.connect(str(sock), inflight=True, queue_size=128)
        # Clear the power-on unit attention first.
        for _ in range(3):
            resp, _, _ = await guest.command(bytes(6))
            if resp.status == Status.GOOD:
                break
        rq = guest.fe.queues[2]
        payloads = {lba: os.urandom(BLOCKS * 512) for lba in range(0, 40 * BLOCKS, BLOCKS)}
        writes = [
            guest.submit(rw10(0x2A, lba), tag=lba, data_out=data) for lba, data in payloads.items()
        ]
        # Kill it while the batch is being processed (or before it was seen at all).
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start_daemon(sock, image)
        await wait_listening(sock, proc)
        with trio.fail_after(20):
            await guest.fe.reconnect()
            used = await rq.wait_used(len(writes))
        assert sorted(u.id for u in used) == sorted(w.head for w in writes)
        for w in writes:
            r = vs.CmdResp.unpack(guest.read(w.resp))
            assert r.response == vs.VirtioScsiResponse.OK
            # GOOD, or the restarted device's power-on unit attention (the guest retries those)
            assert r.status in (Status.GOOD, Status.CHECK_CONDITION)
        # Re-issue the ones that met the unit attention, as the guest's SCSI layer would.
        for w, (lba, data) in zip(writes, payloads.items(), strict=True):
            if vs.CmdResp.unpack(guest.read(w.resp)).status != Status.GOOD:
                with trio.fail_after(10):
                    resp, _, _ = await guest.command(rw10(0x2A, lba), data_out=data)
                assert resp.status == Status.GOOD
        for lba, data in payloads.items():
            with trio.fail_after(10):
                resp, back, _ = await guest.command(rw10(0x28, lba), data_in=len(data))
                if resp.status == Status.CHECK_CONDITION and resp.sense[2] & 0x0F == 0x06:
                    # The restarted device's power-on unit attention met no write (they had all
                    # completed before the kill): a guest retries, so do we, once.
                    resp, back, _ = await guest.command(rw10(0x28, lba), data_in=len(data))
            assert resp.status == Status.GOOD and back == data
        with open(image, "rb") as f:
            for lba, data in payloads.items():
                f.seek(lba * 512)
                assert f.read(len(data)) == data
    finally:
        if guest is not None:
            await guest.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
