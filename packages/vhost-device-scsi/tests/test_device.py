"""ScsiBackend over a real vhost-user connection (vhost_user.serve + VhostUserFrontend)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from scsi_core.status import Status
from vds_harness import PENDING_OP, READ_10, FakeTarget, ScsiGuest
from vhost_device_scsi import virtio_scsi as vs
from vhost_device_scsi.device import DeviceSettings, ScsiBackend
from vhost_user import FrontendError, serve
from virtio_queue import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX

VR = vs.VirtioScsiResponse


@asynccontextmanager
async def running(
    target: FakeTarget, settings: DeviceSettings | None = None
) -> AsyncIterator[tuple[str, list[ScsiBackend]]]:
    live: list[ScsiBackend] = []

    def factory() -> ScsiBackend:
        return ScsiBackend(target, settings, on_connect=live.append, on_disconnect=live.remove)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vhost.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, factory, socket_path=path))
            yield path, live
            nursery.cancel_scope.cancel()


def test_features_and_config_defaults() -> None:
    b = ScsiBackend(FakeTarget(), DeviceSettings(num_request_queues=4))
    f = b.features()
    for bit in (
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        vs.VIRTIO_SCSI_F_INOUT,
        vs.VIRTIO_SCSI_F_HOTPLUG,
        vs.VIRTIO_SCSI_F_CHANGE,
    ):
        assert f & (1 << bit)
    assert not f & (1 << vs.VIRTIO_SCSI_F_T10_PI)
    assert b.num_queues == 6
    cfg = vs.VirtioScsiConfig.unpack(b.get_config(0, 36))
    assert (cfg.num_queues, cfg.sense_size, cfg.cdb_size) == (4, 96, 32)
    assert (cfg.max_channel, cfg.max_target, cfg.max_lun) == (0, 0, 16383)
    assert cfg.event_info_size == 16


async def test_io_through_the_socket_and_config() -> None:
    target = FakeTarget()
    async with running(target, DeviceSettings(num_request_queues=2)) as (path, live):
        guest = await ScsiGuest.connect(path, request_queues=2)
        try:
            raw = await guest.fe.get_config(0, 36)
            assert vs.VirtioScsiConfig.unpack(raw).num_queues == 2
            resp, data, used = await guest.command(bytes([READ_10]), lun=1, data_in=4096)
            assert (resp.response, resp.status) == (VR.OK, Status.GOOD)
            assert used == 108 + 4096
            assert data == bytes((1 + i) & 0xFF for i in range(4096))
            # second request queue
            resp, _, _ = await guest.command(bytes([READ_10]), queue=3, lun=300, data_in=512)
            assert resp.response == VR.OK
            resp, _, _ = await guest.command(bytes([0]), lun_field=vs.encode_virtio_lun(4, 0))
            assert resp.response == VR.BAD_TARGET
            assert len(live) == 1
        finally:
            await guest.close()


async def test_pending_completion_is_delivered_by_run() -> None:
    target = FakeTarget()
    async with running(target) as (path, _live):
        guest = await ScsiGuest.connect(path)
        try:
            sub = guest.submit(bytes([PENDING_OP]), data_in=64)
            with trio.fail_after(5):
                while not target.pending:
                    await trio.sleep(0.01)
            target.complete_pending_in_thread()
            with trio.fail_after(5):
                used = await guest.fe.queues[2].wait_used(1)
            assert used[0].id == sub.head and used[0].len == 108 + 64
            assert guest.read(sub.data_in or (0, 0, True)) == b"\xab" * 64
        finally:
            await guest.close()


async def test_set_config_only_sizes() -> None:
    target = FakeTarget()
    async with running(target) as (path, live):
        guest = await ScsiGuest.connect(path)
        try:
            await guest.fe.set_config(vs.CONFIG_SENSE_SIZE_OFFSET, (64).to_bytes(4, "little"))
            cfg = vs.VirtioScsiConfig.unpack(await guest.fe.get_config(0, 36))
            assert cfg.sense_size == 64
            with pytest.raises(FrontendError):
                await guest.fe.set_config(0, (9).to_bytes(4, "little"))
                await guest.fe.get_config(0, 4)  # a refused SET_CONFIG may not reply
            assert live[0].config.num_queues == 1
        finally:
            await guest.close()
