"""The control queue (TMF, AN) and the event queue against a fake target."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scsi_core.status import Status
from scsi_core.target import Response, TaskManagementFunction, TmfResponse
from vds_harness import PENDING_OP, Driver, FakeTarget
from vhost_device_scsi import virtio_scsi as vs
from vhost_device_scsi.completions import CompletionChannel
from vhost_device_scsi.controlq import ControlQueue
from vhost_device_scsi.eventq import CAPACITY_DATA_HAS_CHANGED, EventQueue
from vhost_device_scsi.requestq import PendingCommand, RequestQueues

VR = vs.VirtioScsiResponse
TMF = TaskManagementFunction


@pytest.fixture
def ctrl() -> Iterator[Driver]:
    d = Driver(index=0)
    yield d
    d.close()


def tmf(d: Driver, subtype: int, lun: bytes, tag: int = 0) -> tuple[int, tuple[int, int, bool]]:
    req = vs.CtrlTmfReq(vs.ControlType.TMF, subtype, lun, tag).pack()
    resp = d.space(1)
    return d.submit([d.put(req), resp]), resp


@pytest.mark.parametrize(
    ("subtype", "function"),
    [
        (vs.TmfSubtype.ABORT_TASK, TMF.ABORT_TASK),
        (vs.TmfSubtype.ABORT_TASK_SET, TMF.ABORT_TASK_SET),
        (vs.TmfSubtype.CLEAR_ACA, TMF.CLEAR_ACA),
        (vs.TmfSubtype.CLEAR_TASK_SET, TMF.CLEAR_TASK_SET),
        (vs.TmfSubtype.I_T_NEXUS_RESET, TMF.I_T_NEXUS_RESET),
        (vs.TmfSubtype.LOGICAL_UNIT_RESET, TMF.LOGICAL_UNIT_RESET),
        (vs.TmfSubtype.QUERY_TASK, TMF.QUERY_TASK),
        (vs.TmfSubtype.QUERY_TASK_SET, TMF.QUERY_TASK_SET),
    ],
)
def test_tmf_subtypes_reach_the_target(ctrl: Driver, subtype: int, function: TMF) -> None:
    target = FakeTarget()
    cq = ControlQueue(target, lambda: None, nexus="n")
    head, resp = tmf(ctrl, subtype, vs.encode_virtio_lun(0, 300), tag=0x1234)
    cq.process(ctrl.vring)
    assert ctrl.used() == {head: 1}
    assert ctrl.read(resp) == bytes((VR.OK,))
    lun = 0 if function == TMF.I_T_NEXUS_RESET else 300
    assert target.tmfs == [(function, lun, 0x1234, "n")]


@pytest.mark.parametrize(
    ("answer", "wire"),
    [
        (TmfResponse.FUNCTION_SUCCEEDED, VR.FUNCTION_SUCCEEDED),
        (TmfResponse.FUNCTION_REJECTED, VR.FUNCTION_REJECTED),
        (TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER, VR.INCORRECT_LUN),
        (TmfResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE, VR.TARGET_FAILURE),
    ],
)
def test_tmf_responses_map(ctrl: Driver, answer: TmfResponse, wire: int) -> None:
    target = FakeTarget(tmf_answer=answer)
    cq = ControlQueue(target, lambda: None)
    _, resp = tmf(ctrl, vs.TmfSubtype.QUERY_TASK, vs.encode_virtio_lun(0, 0))
    cq.process(ctrl.vring)
    assert ctrl.read(resp) == bytes((wire,))


def test_tmf_bad_target_unknown_subtype_and_short(ctrl: Driver) -> None:
    target = FakeTarget()
    cq = ControlQueue(target, lambda: None)
    _, r1 = tmf(ctrl, vs.TmfSubtype.LOGICAL_UNIT_RESET, vs.encode_virtio_lun(2, 0))
    _, r2 = tmf(ctrl, 99, vs.encode_virtio_lun(0, 0))
    r3 = ctrl.space(1)
    ctrl.submit([ctrl.put(bytes(10)), r3])
    h4 = ctrl.submit([ctrl.put(bytes(2)), ctrl.space(1)])  # not even a type
    h5 = ctrl.submit([ctrl.put(vs.CtrlTmfReq(0, 5, vs.encode_virtio_lun(0, 0), 0).pack())])
    cq.process(ctrl.vring)
    assert ctrl.read(r1) == bytes((VR.BAD_TARGET,))
    assert ctrl.read(r2) == bytes((VR.FUNCTION_REJECTED,))
    assert ctrl.read(r3) == bytes((VR.FAILURE,))
    used = ctrl.used()
    assert used[h4] == 0 and used[h5] == 0
    assert len(used) == 5
    assert target.tmfs == []


def test_abort_completes_commands_before_the_tmf(ctrl: Driver) -> None:
    target = FakeTarget()
    req = Driver(index=2)
    try:
        rq = RequestQueues(target, CompletionChannel[PendingCommand, Response]())
        rq.start(req.vring)
        cq = ControlQueue(target, rq.finish_all)
        chead, cresp, _ = req.command(bytes([PENDING_OP]), tag=42)
        rq.process(req.vring)
        assert req.used() == {}
        _, resp = tmf(ctrl, vs.TmfSubtype.ABORT_TASK, vs.encode_virtio_lun(0, 0), tag=42)
        cq.process(ctrl.vring)
        # The aborted command was completed (ABORTED) by the time the TMF answer is out.
        assert req.used() == {chead: 108}
        r = req.response(cresp)
        assert (r.response, r.status) == (VR.ABORTED, Status.TASK_ABORTED)
        assert ctrl.read(resp) == bytes((VR.OK,))
    finally:
        req.close()


def test_an_query_and_subscribe(ctrl: Driver) -> None:
    cq = ControlQueue(FakeTarget(), lambda: None)
    resps = []
    for t, lun in (
        (vs.ControlType.AN_QUERY, vs.encode_virtio_lun(0, 0)),
        (vs.ControlType.AN_SUBSCRIBE, vs.encode_virtio_lun(0, 1)),
        (vs.ControlType.AN_QUERY, vs.encode_virtio_lun(5, 0)),
    ):
        resp = ctrl.space(5)
        ctrl.submit([ctrl.put(vs.CtrlAnReq(t, lun, 0x7E).pack()), resp])
        resps.append(resp)
    cq.process(ctrl.vring)
    assert [vs.CtrlAnResp.unpack(ctrl.read(r)) for r in resps] == [
        vs.CtrlAnResp(0, VR.OK),
        vs.CtrlAnResp(0, VR.OK),
        vs.CtrlAnResp(0, VR.BAD_TARGET),
    ]
    assert set(ctrl.used().values()) == {5}


# -- event queue ------------------------------------------------------------------------------


@pytest.fixture
def evq() -> Iterator[Driver]:
    d = Driver(index=1)
    yield d
    d.close()


def post_buffers(d: Driver, n: int, size: int = 16) -> list[tuple[int, int, bool]]:
    bufs = [d.space(size) for _ in range(n)]
    for b in bufs:
        d.dq.add_chain([b])
    d.dq.publish()
    return bufs


def events(d: Driver, bufs: list[tuple[int, int, bool]]) -> list[vs.VirtioScsiEvent]:
    """The events in the buffers the device used (the queue uses them in order)."""
    used = d.used()
    assert all(length == 16 for length in used.values())
    return [vs.VirtioScsiEvent.unpack(d.read(b)) for b in bufs[: len(used)]]


def test_hotplug_events_delivered(evq: Driver) -> None:
    q = EventQueue()
    q.hotplug = q.change = True
    bufs = post_buffers(evq, 8)
    q.start(evq.vring)
    q.lun_added(300)
    q.lun_removed(2)
    q.capacity_changed(0)
    got = events(evq, bufs)
    assert got == [
        vs.VirtioScsiEvent(vs.EventType.TRANSPORT_RESET, vs.encode_virtio_lun(0, 300), 1),
        vs.VirtioScsiEvent(vs.EventType.TRANSPORT_RESET, vs.encode_virtio_lun(0, 2), 2),
        vs.VirtioScsiEvent(
            vs.EventType.PARAM_CHANGE, vs.encode_virtio_lun(0, 0), CAPACITY_DATA_HAS_CHANGED
        ),
    ]
    assert evq.vring.notifies == 3


def test_events_wait_for_buffers_then_flow(evq: Driver) -> None:
    q = EventQueue()
    q.hotplug = True
    q.start(evq.vring)
    q.lun_added(1)
    q.lun_added(2)
    assert q.pending == 2
    bufs = post_buffers(evq, 4)
    q.flush()  # what an eventq kick does
    got = events(evq, bufs)
    assert [e.lun for e in got] == [vs.encode_virtio_lun(0, 1), vs.encode_virtio_lun(0, 2)]
    assert q.pending == 0


def test_overflow_sets_events_missed(evq: Driver) -> None:
    q = EventQueue()
    q.hotplug = True
    q.start(evq.vring)
    for lun in range(q.MAX_BACKLOG + 5):
        q.lun_added(lun)
    bufs = post_buffers(evq, 64)
    q.flush()
    got = events(evq, bufs)
    assert got[0].event == vs.EventType.TRANSPORT_RESET | vs.VIRTIO_SCSI_T_EVENTS_MISSED
    assert all(e.event == vs.EventType.TRANSPORT_RESET for e in got[1:])
    assert len(got) == 64


def test_missed_alone_reported_as_no_event(evq: Driver) -> None:
    q = EventQueue()
    q.hotplug = True
    q.MAX_BACKLOG = 0
    q.start(evq.vring)
    q.lun_added(1)
    bufs = post_buffers(evq, 2)
    q.flush()
    got = events(evq, bufs)
    assert got == [vs.VirtioScsiEvent(vs.VIRTIO_SCSI_T_EVENTS_MISSED, bytes(8), 0)]


def test_no_events_without_features_and_small_buffers_skipped(evq: Driver) -> None:
    q = EventQueue()
    q.start(evq.vring)
    q.lun_added(1)
    q.capacity_changed(1)
    assert q.pending == 0
    q.hotplug = True
    small = evq.space(8)
    evq.dq.add_chain([small])
    bufs = post_buffers(evq, 1)
    q.lun_added(3)
    used = evq.used()
    assert len(used) == 2 and sorted(used.values()) == [0, 16]
    assert vs.VirtioScsiEvent.unpack(evq.read(bufs[0])).lun == vs.encode_virtio_lun(0, 3)
