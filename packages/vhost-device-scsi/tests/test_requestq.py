"""The request-queue path against a fake target, through a real split queue in memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from scsi_core.lun import REPORT_LUNS_WLUN
from scsi_core.status import Status
from scsi_core.target import Completion, Request, Response
from vds_harness import PENDING_OP, READ_10, SENSE_OP, WRITE_10, Driver, FakeTarget
from vhost_device_scsi import virtio_scsi as vs
from vhost_device_scsi.completions import CompletionChannel
from vhost_device_scsi.requestq import PendingCommand, RequestQueues
from virtio_queue import VIRTIO_F_VERSION_1
from virtio_queue.layout import VirtqDesc

VR = vs.VirtioScsiResponse
assert VIRTIO_F_VERSION_1 == 32


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def make(target: FakeTarget, driver: Driver) -> RequestQueues:
    rq = RequestQueues(target, CompletionChannel[PendingCommand, Response](), nexus="guest")
    rq.start(driver.vring)
    return rq


def test_read_fills_data_in_and_reports_length(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head, resp, din = driver.command(bytes([READ_10]), lun=vs.encode_virtio_lun(0, 1), data_in=4096)
    rq.process(driver.vring)
    assert driver.used() == {head: 108 + 4096}
    r = driver.response(resp)
    assert (r.response, r.status, r.sense_len, r.residual) == (VR.OK, 0, 0, 0)
    assert din is not None
    assert driver.read(din) == bytes((1 + i) & 0xFF for i in range(4096))
    req = target.requests[0]
    assert (req.lun, req.tag, req.nexus) == (1, 1, "guest")
    assert len(req.cdb) == 32 and req.cdb[0] == READ_10
    assert req.data_out is None
    assert driver.vring.notifies == 1


def test_write_passes_data_out(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    payload = bytes(range(256)) * 32
    head, _resp, _ = driver.command(bytes([WRITE_10]), data_out=payload)
    rq.process(driver.vring)
    assert driver.used() == {head: 108}
    assert target.written == [payload]
    assert target.requests[0].data_in is None


def test_batch_of_chains_notifies_once(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    heads = [driver.command(bytes([READ_10]), data_in=512, tag=i)[0] for i in range(20)]
    rq.process(driver.vring)
    assert set(driver.used()) == set(heads)
    assert driver.vring.notifies == 1
    assert [r.tag for r in target.requests] == list(range(20))


def test_flat_space_lun_above_255(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    # Linux: lun[2] = (lun >> 8) | 0x40
    raw = bytes((1, 0, 0x40 | (300 >> 8), 300 & 0xFF, 0, 0, 0, 0))
    driver.command(bytes([0]), lun=raw)
    driver.command(bytes([0xA0]), lun=b"\xc1\x01" + bytes(6))
    rq.process(driver.vring)
    assert [r.lun for r in target.requests] == [300, REPORT_LUNS_WLUN]


@pytest.mark.parametrize(
    "raw",
    [
        vs.encode_virtio_lun(1, 0),  # another target
        bytes((2, 0, 0, 0, 0, 0, 0, 0)),  # not the 1,target,... layout
        bytes((1, 0, 0x40, 0, 1, 0, 0, 0)),  # second-level LUN
    ],
)
def test_bad_target(driver: Driver, raw: bytes) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head, resp, _ = driver.command(bytes([0]), lun=raw, data_in=64)
    rq.process(driver.vring)
    assert driver.used() == {head: 108}
    assert driver.response(resp).response == VR.BAD_TARGET
    assert target.requests == []


def test_absent_lun_goes_to_target(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    _head, resp, _ = driver.command(bytes([0]), lun=vs.encode_virtio_lun(0, 77))
    rq.process(driver.vring)
    r = driver.response(resp)
    assert (r.response, r.status, r.sense_len) == (VR.OK, Status.CHECK_CONDITION, 18)
    assert r.sense[2] == 5


def test_sense_is_truncated_to_sense_size_and_residual_reported(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    _, resp, _ = driver.command(bytes([SENSE_OP]))
    rq.process(driver.vring)
    r = driver.response(resp)
    assert r.sense_len == 96 and r.sense == bytes(range(96))
    assert r.residual == 7 and r.status == Status.CHECK_CONDITION


def test_response_header_split_over_descriptors(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head, resp, _ = driver.command(bytes([SENSE_OP]), split_resp=True)
    rq.process(driver.vring)
    assert driver.used() == {head: 108}
    r = driver.response(resp)
    assert r.sense == bytes(range(96)) and r.residual == 7


def test_short_header_completed_with_failure(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    resp = driver.space(108)
    head = driver.submit([driver.put(bytes(20)), resp])
    rq.process(driver.vring)
    assert driver.used() == {head: 12}
    assert driver.response(resp).response == VR.FAILURE
    assert target.requests == []


def test_no_room_for_response(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    small = driver.space(50)
    h1 = driver.command(bytes([0]), resp_len=50)[0]
    h2 = driver.submit([driver.put(bytes(51)), (small[0], 4, True)])
    h3 = driver.submit([driver.put(bytes(51))])  # nothing writable at all
    rq.process(driver.vring)
    assert driver.used() == {h1: 12, h2: 0, h3: 0}
    assert target.requests == []


def test_invalid_chain_completed_with_zero_length(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head = driver.command(bytes([0]))[0]
    # Point the head descriptor outside guest memory.
    driver.dq.write_descriptor(head, VirtqDesc(1 << 40, 51, 1, 1))
    good = driver.command(bytes([0]), tag=2)[0]
    rq.process(driver.vring)
    assert driver.used() == {head: 0, good: 108}


def test_bidirectional_without_inout_fails(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    rq.inout = False
    _head, resp, _ = driver.command(bytes([0]), data_out=b"x" * 16, data_in=16)
    rq.process(driver.vring)
    assert driver.response(resp).response == VR.FAILURE
    assert target.requests == []


def test_custom_cdb_and_sense_sizes(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    rq.set_sizes(16, 32)
    req = vs.CmdReq(vs.encode_virtio_lun(0, 0), 5, 0, 0, 0, bytes([SENSE_OP]) + bytes(15)).pack(16)
    resp = driver.space(12 + 32)
    head = driver.submit([driver.put(req), resp])
    rq.process(driver.vring)
    assert driver.used() == {head: 44}
    r = vs.CmdResp.unpack(driver.read(resp), 32)
    assert r.sense_len == 32 and r.sense == bytes(range(32))
    assert len(target.requests[0].cdb) == 16


async def test_pending_completion_from_another_thread(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head, resp, din = driver.command(bytes([PENDING_OP]), data_in=100)
    rq.process(driver.vring)
    assert driver.used() == {}
    target.complete_pending_in_thread()
    with trio.fail_after(5):
        await rq.channel.wait()
    rq.finish_all()
    assert driver.used() == {head: 208}
    assert driver.response(resp).response == VR.OK
    assert din is not None and driver.read(din) == b"\xab" * 100
    assert driver.vring.notifies == 2


def test_completion_after_stop_is_dropped(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    driver.command(bytes([PENDING_OP]))
    rq.process(driver.vring)
    assert rq.outstanding == 1
    rq.stop(driver.vring.index)
    target.complete_pending_in_thread()
    rq.finish_all()
    assert driver.used() == {}
    assert rq.outstanding == 0  # dropped, but no longer in flight


def test_aborted_task_gets_aborted_response(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    head, resp, _ = driver.command(bytes([PENDING_OP]), tag=9)
    rq.process(driver.vring)
    _, complete = target.pending[0]
    complete(Response(Status.TASK_ABORTED))
    rq.finish_all()
    assert driver.used() == {head: 108}
    r = driver.response(resp)
    assert (r.response, r.status) == (VR.ABORTED, Status.TASK_ABORTED)


def test_unknown_task_attribute_maps_to_simple(driver: Driver) -> None:
    target = FakeTarget()
    rq = make(target, driver)
    req = vs.CmdReq(vs.encode_virtio_lun(0, 0), 1, 200, 0, 0, bytes(32)).pack()
    driver.submit([driver.put(req), driver.space(108)])
    rq.process(driver.vring)
    assert target.requests[0].task_attr == 0


async def test_pending_commands_between_inline_ones_keep_their_own_callbacks(
    driver: Driver,
) -> None:
    """One batch mixing commands the target keeps with ones it answers at once: each pending
    command's callback stays its own (the spare is handed on only while unused), both paths
    (first sight of a LUN goes the general way, later ones the inline way) take part."""
    target = FakeTarget()
    rq = make(target, driver)
    lun1 = vs.encode_virtio_lun(0, 1)
    cmds = [
        driver.command(bytes([PENDING_OP]), data_in=64, tag=1),  # LUN 0, first sight
        driver.command(bytes([READ_10]), data_in=32, tag=2),
        driver.command(bytes([PENDING_OP]), data_in=16, tag=3),
        driver.command(bytes([READ_10]), lun=lun1, data_in=8, tag=4),  # LUN 1, first sight
        driver.command(bytes([PENDING_OP]), lun=lun1, data_in=48, tag=5),
        driver.command(bytes([READ_10]), lun=lun1, data_in=8, tag=6),
    ]
    rq.process(driver.vring)
    inline = {cmds[1][0]: 108 + 32, cmds[3][0]: 108 + 8, cmds[5][0]: 108 + 8}
    assert driver.used() == inline
    assert rq.outstanding == 3  # kept by the target, through both paths
    callbacks = [complete for _req, complete in target.pending]
    assert len(set(map(id, callbacks))) == 3  # three distinct callback objects
    # Complete them out of order, each with its own residual.
    for (req, complete), residual in reversed(list(zip(target.pending, (1, 2, 3), strict=True))):
        assert req.data_in is not None
        req.data_in.write(bytes([req.tag]) * (req.data_in.remaining() - residual))
        complete(Response(Status.GOOD, b"", residual))
    target.pending.clear()
    with trio.fail_after(5):
        await rq.channel.wait()
    rq.finish_all()
    assert rq.outstanding == 0
    assert rq.take_peak() == 3  # all three were outstanding after the batch
    assert rq.take_peak() == 0  # none since
    assert driver.used() == {
        cmds[0][0]: 108 + 64 - 1,
        cmds[2][0]: 108 + 16 - 2,
        cmds[4][0]: 108 + 48 - 3,
    }
    for (_head, resp, din), residual, tag in zip(
        (cmds[0], cmds[2], cmds[4]), (1, 2, 3), (1, 3, 5), strict=True
    ):
        r = driver.response(resp)
        assert (r.response, r.status, r.residual) == (VR.OK, Status.GOOD, residual)
        assert din is not None
        assert driver.read(din)[: din[1] - residual] == bytes([tag]) * (din[1] - residual)


def test_a_drained_batch_opens_at_its_second_command_and_closes_once(driver: Driver) -> None:
    calls: list[str] = []

    class Batching(FakeTarget):
        def begin_batch(self) -> None:
            calls.append("begin")

        def execute(self, request: Request, complete: Completion) -> Response | None:
            calls.append("execute")
            return super().execute(request, complete)

        def end_batch(self) -> None:
            calls.append("end")

    target = Batching()
    rq = make(target, driver)
    for i in range(3):
        driver.command(bytes([READ_10]), data_in=512, tag=i)
    rq.process(driver.vring)
    # The first command is started at once; the rest are held back together.
    assert calls == ["execute", "begin", "execute", "execute", "end"]
    calls.clear()
    rq.process(driver.vring)  # an empty ring: no batch at all
    assert calls == []
    driver.command(bytes([READ_10]), data_in=512, tag=9)
    rq.process(driver.vring)  # a lone command (queue depth 1): nothing held back
    assert calls == ["execute"]
