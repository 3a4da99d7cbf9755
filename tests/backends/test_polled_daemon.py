"""The daemon polls its NBD back-end from its own event loop (`vhost_device_scsi.polling`): the
load keeps flowing when the NBD server is killed and started again under it.

nbdkit's file plugin serves an image on the host; the project's vhost-user front-end keeps 8
WRITE(10)s of one pattern in flight for a few seconds while the server is restarted. The
polled connection must notice the loss, reconnect, resend what was in flight, and the poller
must follow the new socket: every command completes with GOOD and the image holds nothing but
whole blocks of the pattern (or blocks never written).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

import pytest
import trio

from tests.backends.queue_depth_guest import RW10, LoadResult, QueueDepthGuest
from tests.backends.servers import NbdServer
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

IMAGE = 16 << 20
BLOCKS = 8  # 4 KiB per command
PATTERN = bytes(range(1, 256)) * 17  # 4335 bytes, so each block's content depends on where


async def test_load_survives_an_nbd_server_restart(
    nbdkit_custom: Callable[..., NbdServer], tmp_path: pathlib.Path
) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(IMAGE)
    server = nbdkit_custom("file", str(image))
    socket = tmp_path / "vds.sock"
    argv = [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", server.uri,
    ]  # fmt: skip
    daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")
    data_size = BLOCKS * 512
    payload = (PATTERN * (data_size // len(PATTERN) + 1))[:data_size]
    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            await guest.clear_unit_attention()
            for slot in range(8):  # every command writes the same 4 KiB
                _, _, data = guest._slot(slot, data_size)
                guest.memory.memory.slice(data, data_size)[:] = payload
            results: list[LoadResult] = []

            async def load() -> None:
                results.append(
                    await guest.keep_in_flight(
                        8, 3.0, write=True, blocks=BLOCKS, span_blocks=IMAGE // 512
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(load)
                await trio.sleep(0.7)
                await trio.to_thread.run_sync(server.restart)
            (result,) = results
        finally:
            await guest.aclose()
    log = daemon.log()
    print(f"\n{result.completed} writes in {result.seconds:.1f} s across the restart")
    assert result.failed == 0, (result, log)
    assert result.completed > 8, (result, log)
    assert "connection lost" in log and "reconnected" in log, log
    assert "Traceback" not in log, log
    content = image.read_bytes()
    assert content[:data_size] == payload
    written = 0
    for start in range(0, IMAGE, data_size):
        block = content[start : start + data_size]
        assert block in (payload, bytes(data_size)), f"torn block at {start}"
        written += block == payload
    assert written >= min(result.completed, IMAGE // data_size) // 2, (written, result)


async def test_nbd_lun_hot_plugged_and_removed_under_load(
    nbdkit_custom: Callable[..., NbdServer], tmp_path: pathlib.Path
) -> None:
    """A polled back-end attached and detached at run time (control socket): I/O on the new LU
    completes, removing it while the guest is idle leaves the daemon healthy, and the same
    export can be plugged in again."""
    from vhost_device_scsi.control import send_command

    server = nbdkit_custom("memory", "64M")
    first = tmp_path / "first.img"
    with first.open("wb") as f:
        f.truncate(IMAGE)
    socket = tmp_path / "vds.sock"
    control = tmp_path / "control.sock"
    argv = [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", str(control), str(first),
    ]  # fmt: skip
    daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")

    async def command(line: str) -> str:
        return await trio.to_thread.run_sync(send_command, str(control), line)

    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            await guest.clear_unit_attention()
            for _ in range(2):  # plug, load, unplug; twice
                assert (await command("remove-lun 0")).startswith("ok"), daemon.log()
                assert (await command(f"add-lun 0 {server.uri}")).startswith("ok"), daemon.log()
                await guest.clear_unit_attention()
                wrote = await guest.keep_in_flight(16, 0.5, write=True)
                read = await guest.keep_in_flight(16, 0.5)
                assert wrote.failed == 0 and read.failed == 0, (wrote, read, daemon.log())
                assert wrote.completed > 16 and read.completed > 16, (wrote, read)
                assert (await command("remove-lun 0")).startswith("ok"), daemon.log()
                assert (await command(f"add-lun 0 {first}")).startswith("ok"), daemon.log()
                await guest.clear_unit_attention()
        finally:
            await guest.aclose()
    log = daemon.log()
    assert "Traceback" not in log and "servicing the storage back-end failed" not in log, log


async def test_an_nbd_server_gone_for_good_fails_its_commands_and_nothing_else(
    nbdkit_custom: Callable[..., NbdServer], tmp_path: pathlib.Path
) -> None:
    """Issue 8: a lost connection is retried with a bound and reported. While the polled NBD
    LU reconnects in vain, a file LU on the same queue keeps serving; then the NBD command ends
    in CHECK CONDITION / MEDIUM ERROR (not a hang), and the log says why."""
    server = nbdkit_custom("memory", "64M")
    local = tmp_path / "local.img"
    with local.open("wb") as f:
        f.truncate(IMAGE)
    socket = tmp_path / "vds.sock"
    argv = [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", f"0={local}", f"1={server.uri}",
    ]  # fmt: skip
    daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")
    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            for lun in (0, 1):
                guest.lun = lun
                await guest.clear_unit_attention()
            await trio.to_thread.run_sync(server.stop)
            # One READ(10) to the NBD LU, in slot 40 (clear of the load's slots).
            guest.lun = 1
            nbd_head = guest._put_request(40, RW10.pack(0x28, 0, 0, 0, 8, 0), 4096, False, 999)
            guest.queue.submit()
            guest.lun = 0
            start = trio.current_time()
            local_load = await guest.keep_in_flight(4, 1.0, span_blocks=IMAGE // 512)
            assert local_load.failed == 0 and local_load.completed > 50, local_load
            # The NBD command was among the used elements the load collected only if it had
            # already failed; otherwise it arrives now, within the reconnection bound (10 s).
            with trio.fail_after(30):
                while True:
                    (elem,) = await guest.queue.wait_used(1)
                    if elem.id == nbd_head:
                        break
            took = trio.current_time() - start
            assert not guest._succeeded(40, 4096)
            _, resp, _ = guest._slot(40, 4096)
            header = bytes(guest.memory.memory.slice(resp, 32))
        finally:
            await guest.aclose()
    log = daemon.log()
    # virtio_scsi_cmd_resp: status CHECK CONDITION (byte 10), fixed sense from byte 12 with
    # MEDIUM ERROR / UNRECOVERED READ ERROR (11h).
    assert header[10] == 0x02, header.hex()
    assert header[12 + 2] & 0x0F == 0x03 and header[12 + 12] == 0x11, header.hex()
    print(f"\nthe NBD command failed after {took:.1f} s; the file LU served meanwhile")
    assert "cannot reconnect" in log, log
    assert "Traceback" not in log, log
