"""The whole daemon in-process: real images, EmulatedTarget, vhost-user socket, control socket."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from scsi_core.lun import REPORT_LUNS_WLUN
from scsi_core.status import Status
from vds_harness import ScsiGuest
from vhost_device_scsi import virtio_scsi as vs
from vhost_device_scsi.cli import parse_args
from vhost_device_scsi.control import send_command
from vhost_device_scsi.daemon import Daemon

VR = vs.VirtioScsiResponse
MiB = 1 << 20


@pytest.fixture
def images(tmp_path: Path) -> Iterator[list[Path]]:
    paths = []
    for i, size in enumerate((8 * MiB, 4 * MiB)):
        p = tmp_path / f"disk{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    yield paths


@asynccontextmanager
async def daemon_running(argv: list[str]) -> AsyncIterator[Daemon]:
    daemon = Daemon.open(parse_args(argv))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            yield daemon
            nursery.cancel_scope.cancel()
    finally:
        daemon.close()


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


async def clear_unit_attentions(guest: ScsiGuest, lun: int) -> None:
    for _ in range(5):
        resp, _, _ = await guest.command(bytes(6), lun=lun)  # TEST UNIT READY
        if resp.status == Status.GOOD:
            return
    raise AssertionError("unit attentions did not clear")


async def test_read_write_inquiry_and_errors(tmp_path: Path, images: list[Path]) -> None:
    sock = str(tmp_path / "v.sock")
    argv = ["--socket-path", sock, str(images[0]), f"300={images[1]}", "--num-queues", "2"]
    async with daemon_running(argv):
        guest = await ScsiGuest.connect(sock, request_queues=2)
        try:
            with trio.fail_after(10):
                # INQUIRY on LUN 0: a direct-access device
                resp, data, _ = await guest.command(bytes((0x12, 0, 0, 0, 96, 0)), data_in=96)
                assert (resp.response, resp.status) == (VR.OK, Status.GOOD)
                assert data[0] == 0x00
                await clear_unit_attentions(guest, 0)
                await clear_unit_attentions(guest, 300)
                # READ CAPACITY(10) of LUN 300 (flat space): 4 MiB / 512 - 1
                resp, data, _ = await guest.command(bytes([0x25]) + bytes(9), lun=300, data_in=8)
                assert resp.status == Status.GOOD
                assert struct.unpack(">II", data) == (4 * MiB // 512 - 1, 512)
                # WRITE then READ back through the second request queue
                payload = os.urandom(8192)
                resp, _, used = await guest.command(write10(10, 16), data_out=payload, queue=3)
                assert (resp.response, resp.status, used) == (VR.OK, Status.GOOD, 108)
                resp, data, used = await guest.command(read10(10, 16), data_in=8192)
                assert resp.status == Status.GOOD and data == payload and used == 108 + 8192
                with open(images[0], "rb") as f:
                    f.seek(10 * 512)
                    assert f.read(8192) == payload
                # REPORT LUNS through the well-known LU
                resp, data, _ = await guest.command(
                    bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0)),
                    lun_field=b"\xc1\x01" + bytes(6),
                    data_in=256,
                )
                assert resp.status == Status.GOOD
                assert int.from_bytes(data[:4], "big") == 16
                assert data[8:10] == b"\x00\x00" and data[16:18] == b"\x41\x2c"
                # an absent LUN: CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED
                resp, _, _ = await guest.command(bytes(6), lun=5)
                assert resp.status == Status.CHECK_CONDITION and resp.sense[12] == 0x25
                # another target: BAD_TARGET
                resp, _, _ = await guest.command(bytes(6), lun_field=vs.encode_virtio_lun(1, 0))
                assert resp.response == VR.BAD_TARGET
                # LOGICAL UNIT RESET on LUN 0 via the control queue
                tmf = vs.CtrlTmfReq(
                    0, vs.TmfSubtype.LOGICAL_UNIT_RESET, vs.encode_virtio_lun(0, 0), 0
                )
                assert await guest.control(tmf.pack(), 1) == bytes((VR.OK,))
                tmf = vs.CtrlTmfReq(0, vs.TmfSubtype.ABORT_TASK, vs.encode_virtio_lun(0, 9), 5)
                assert await guest.control(tmf.pack(), 1) == bytes((VR.INCORRECT_LUN,))
                assert REPORT_LUNS_WLUN == 0xC101
        finally:
            await guest.close()


async def test_hotplug_and_resize_over_control_socket(tmp_path: Path, images: list[Path]) -> None:
    sock = str(tmp_path / "v.sock")
    ctl = sock + ".ctl"
    async with daemon_running(["--socket-path", sock, str(images[0])]) as daemon:
        guest = await ScsiGuest.connect(sock)
        try:
            with trio.fail_after(10):
                bufs = guest.post_event_buffers(8)
                while not daemon.backends:
                    await trio.sleep(0.01)

                async def ctl_cmd(line: str) -> str:
                    answer: str = await trio.to_thread.run_sync(send_command, ctl, line)
                    return answer

                assert await ctl_cmd(f"add-lun 7 {images[1]} --read-only") == "ok LUN 7 added"
                assert (await ctl_cmd(f"add-lun 7 {images[1]}")).startswith("error: LUN 7 is")
                assert (await ctl_cmd("add-lun 8 /nonexistent")).startswith(
                    "error: cannot open image /nonexistent"
                )
                used = await guest.fe.queues[1].wait_used(1)
                ev = vs.VirtioScsiEvent.unpack(guest.read(bufs[0]))
                assert used[0].len == 16
                assert ev == vs.VirtioScsiEvent(
                    vs.EventType.TRANSPORT_RESET, vs.encode_virtio_lun(0, 7), vs.ResetReason.RESCAN
                )
                await clear_unit_attentions(guest, 7)
                resp, _, _ = await guest.command(write10(0, 1), lun=7, data_out=bytes(512))
                assert resp.status == Status.CHECK_CONDITION and resp.sense[2] & 0xF == 7

                with open(images[0], "r+b") as f:
                    f.truncate(16 * MiB)
                assert await ctl_cmd("resize 0") == f"ok LUN 0 size {16 * MiB}"
                await guest.fe.queues[1].wait_used(1)
                ev = vs.VirtioScsiEvent.unpack(guest.read(bufs[1]))
                assert ev.event == vs.EventType.PARAM_CHANGE and ev.reason == 0x092A
                # the unit attention, then the new capacity
                resp, _, _ = await guest.command(bytes([0x25]) + bytes(9), data_in=8)
                assert resp.status == Status.CHECK_CONDITION
                await clear_unit_attentions(guest, 0)
                resp, data, _ = await guest.command(bytes([0x25]) + bytes(9), data_in=8)
                assert struct.unpack(">II", data) == (16 * MiB // 512 - 1, 512)

                assert await ctl_cmd("remove-lun 7") == "ok LUN 7 removed"
                await guest.fe.queues[1].wait_used(1)
                ev = vs.VirtioScsiEvent.unpack(guest.read(bufs[2]))
                assert ev.reason == vs.ResetReason.REMOVED
                assert await ctl_cmd("list") == f"ok 0:{images[0]}"
        finally:
            await guest.close()


def _anon_fds() -> set[tuple[str, str]]:
    """This process's eventfds, epoll and other anonymous descriptors."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:"):
            found.add((fd, target))
    return found


async def test_busy_polling_watches_each_live_queue_and_lets_go_at_disconnect(
    tmp_path: Path, images: list[Path]
) -> None:
    """The default daemon busy-polls: every started kick eventfd and the completion channel
    are watched while the front-end is connected (through duplicates that are released after),
    and the window adapts to the waits between commands."""
    sock = str(tmp_path / "v.sock")
    before = _anon_fds()
    async with daemon_running(["--socket-path", sock, str(images[0]), "--num-queues", "2"]) as d:
        busy = d.busy_poll
        assert busy is not None and busy.max_ns == 256_000
        guest = await ScsiGuest.connect(sock, request_queues=2)
        try:
            with trio.fail_after(10):
                await clear_unit_attentions(guest, 0)
                for i in range(20):
                    resp, _, _ = await guest.command(read10(i, 1), data_in=512, queue=2 + i % 2)
                    assert resp.status == Status.GOOD
                # control, event and two request queues, and the completion channel
                assert len(busy._watched) == 5
                assert d.backends[0].requests.outstanding == 0
        finally:
            await guest.close()
        with trio.fail_after(10):
            while busy._watched:
                await trio.sleep(0.01)
    assert _anon_fds() <= before  # no eventfd duplicate, no epoll left behind


async def test_busy_polling_off(tmp_path: Path, images: list[Path]) -> None:
    sock = str(tmp_path / "v.sock")
    async with daemon_running(["--socket-path", sock, str(images[0]), "--poll-max-us", "0"]) as d:
        busy = d.busy_poll
        assert busy is not None
        guest = await ScsiGuest.connect(sock)
        try:
            with trio.fail_after(10):
                await clear_unit_attentions(guest, 0)
                for i in range(10):
                    resp, _, _ = await guest.command(read10(i, 1), data_in=512)
                    assert resp.status == Status.GOOD
        finally:
            await guest.close()
        # Never spun, but the loop waited in the spinner's epoll and the kicks were served
        # there (the guest is in this process: its waits are the same loop's).
        assert busy.spins == 0
        assert busy.sleep_dispatched > 0


def test_the_daemon_does_not_import_test_tools() -> None:
    """trio.testing imports pytest when it is installed: +9 MB of RSS for the daemon."""
    import subprocess
    import sys

    code = "import sys, vhost_device_scsi.daemon; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_spinning_is_worth_it_only_at_low_depth_and_with_idle_io_threads() -> None:
    from types import SimpleNamespace
    from typing import Any

    from vhost_device_scsi.daemon import SPIN_MAX_OUTSTANDING, _worth_spinning

    def device(peak: int) -> Any:
        return SimpleNamespace(requests=SimpleNamespace(take_peak=lambda: peak))

    idle: Any = SimpleNamespace(io_busy=0)
    working: Any = SimpleNamespace(io_busy=1)
    assert _worth_spinning([], idle)
    assert _worth_spinning([device(SPIN_MAX_OUTSTANDING)], idle)
    assert not _worth_spinning([device(SPIN_MAX_OUTSTANDING + 1)], idle)
    assert not _worth_spinning([device(0)], working)  # the workers need the GIL spinning holds
