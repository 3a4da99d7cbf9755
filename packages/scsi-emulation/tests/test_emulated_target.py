"""EmulatedTarget: LUN dispatch, MissingLun, the REPORT LUNS W-LUN, task management, and
`execute` never raising."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_core.lun import MAX_LUN, REPORT_LUNS_WLUN, decode_lun
from scsi_core.sense import Asc, SenseKey, parse_sense
from scsi_core.status import Status
from scsi_core.target import (
    BytesReader,
    BytesWriter,
    Request,
    Response,
    TaskManagementFunction,
    TmfResponse,
)
from scsi_emulation import BlockDevice, EmulatedTarget, FileBackend, IoWorkerPool
from scsi_emulation.testing import run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]


def report_luns_cdb(alloc: int = 1 << 20) -> bytes:
    return bytes((0xA0, 0, 0, 0, 0, 0)) + alloc.to_bytes(4, "big") + b"\0\0"


def test_missing_lun(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, bytes((0x12, 0, 0, 0, 36, 0)), data_in=36, lun=3)
    assert r.status == Status.GOOD and r.data[0] == 0x7F
    r = run_command(target, bytes(6), lun=3)
    assert r.status == Status.CHECK_CONDITION and r.sense is not None
    assert (r.sense.key, r.sense.code) == (SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
    r = run_command(target, bytes((0x03, 0, 0, 0, 18, 0)), data_in=18, lun=3)
    assert r.status == Status.GOOD
    assert parse_sense(r.data).code == Asc.LOGICAL_UNIT_NOT_SUPPORTED
    r = run_command(target, report_luns_cdb(), data_in=64, lun=3)
    assert r.status == Status.GOOD and r.data[3] == 8
    r = run_command(target, b"\x28" + bytes(9), data_in=512, lun=3)
    assert r.status == Status.CHECK_CONDITION


def test_report_luns_wlun(disk: Disk) -> None:
    target, _ = disk
    r = run_command(target, bytes((0x12, 0, 0, 0, 36, 0)), data_in=36, lun=REPORT_LUNS_WLUN)
    assert r.data[0] == 0x1E
    assert run_command(target, bytes(6), lun=REPORT_LUNS_WLUN).status == Status.GOOD
    r = run_command(target, b"\x28" + bytes(9), data_in=512, lun=REPORT_LUNS_WLUN)
    assert r.sense is not None and r.sense.code == Asc.INVALID_COMMAND_OPERATION_CODE
    r = run_command(target, report_luns_cdb(), data_in=64, lun=REPORT_LUNS_WLUN)
    assert r.data[:4] == b"\0\0\0\x08"


def test_16384_luns(image: pathlib.Path) -> None:
    backend = FileBackend(image)
    target = EmulatedTarget()
    for lun in (0, 1, 255, 256, 4000, MAX_LUN):
        target.attach(lun, BlockDevice(backend), announce=False)
    assert target.luns() == [0, 1, 255, 256, 4000, MAX_LUN]
    r = run_command(target, report_luns_cdb(), data_in=1024, lun=MAX_LUN)
    entries = [decode_lun(r.data[i : i + 8]) for i in range(8, len(r.data), 8)]
    assert entries == [0, 1, 255, 256, 4000, MAX_LUN]
    assert r.data[8 + 3 * 8] == 0x41  # LUN 256: flat space addressing
    assert run_command(target, b"\x28" + bytes(9), lun=4000).status == Status.CHECK_CONDITION
    backend.close()


def test_attach_announces_lun_change(make_disk: MakeDisk, image: pathlib.Path) -> None:
    target, _ = make_disk()
    target.attach(1, BlockDevice(FileBackend(image)))
    r = run_command(target, bytes(6))
    assert r.sense is not None and r.sense.code == Asc.REPORTED_LUNS_DATA_HAS_CHANGED
    target.attach(2, BlockDevice(FileBackend(image)))
    run_command(target, report_luns_cdb(), data_in=64)  # REPORT LUNS clears it
    assert run_command(target, bytes(6)).status == Status.GOOD


def test_task_management(disk: Disk) -> None:
    target, device = disk
    tmf = TaskManagementFunction
    assert target.task_management(tmf.ABORT_TASK, 0, tag=5) == TmfResponse.FUNCTION_COMPLETE
    assert target.task_management(tmf.ABORT_TASK, 9) == TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER
    assert target.task_management(tmf.CLEAR_ACA, 0) == TmfResponse.FUNCTION_REJECTED
    run_command(target, bytes((0x16,)) + bytes(5))  # RESERVE(6)
    assert target.task_management(tmf.LOGICAL_UNIT_RESET, 0) == TmfResponse.FUNCTION_COMPLETE
    assert device.reservation is None
    assert target.task_management(tmf.QUERY_ASYNCHRONOUS_EVENT, 0) == TmfResponse.FUNCTION_SUCCEEDED
    r = run_command(target, bytes(6))
    assert r.sense is not None and r.sense.code == Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED
    assert target.task_management(tmf.TARGET_WARM_RESET, 0) == TmfResponse.FUNCTION_COMPLETE
    r = run_command(target, bytes(6))
    assert r.sense is not None and r.sense.code == Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED
    target.task_management(tmf.I_T_NEXUS_RESET, 0, nexus=0)
    r = run_command(target, bytes(6))
    assert r.sense is not None and r.sense.code == Asc.I_T_NEXUS_LOSS_OCCURRED


def test_forget_nexus_releases_reservation(disk: Disk) -> None:
    target, device = disk
    run_command(target, bytes((0x16,)) + bytes(5), nexus="a")
    run_command(target, bytes((0x16,)) + bytes(5), nexus="a")
    assert device.reservation == "a"
    target.forget_nexus("a")
    assert device.reservation is None


def test_bytes_only_session(image: pathlib.Path) -> None:
    """A whole initiator-style session with nothing but bytes: the Linux sd probe order."""
    target = EmulatedTarget({0: BlockDevice(FileBackend(image))})
    done: list[Response] = []

    def run(cdb: bytes, out: bytes = b"", size: int = 0) -> tuple[Response, bytes]:
        writer = BytesWriter(size)
        request = Request(0, cdb.ljust(32, b"\0"), BytesReader(out), writer, tag=1, nexus="h")
        response = target.execute(request, done.append)
        assert response is not None
        return response, writer.getvalue()

    assert run(bytes(6))[0].status == Status.CHECK_CONDITION  # power-on UA
    assert run(bytes((0x12, 0, 0, 0, 36, 0)), size=36)[1][8:15] == b"PYVHOST"
    assert run(report_luns_cdb(4096), size=4096)[1][:4] == b"\0\0\0\x08"
    assert run(bytes((0x9E, 0x10)) + bytes(8) + b"\0\0\0\x20", size=32)[0].status == 0
    assert run(bytes((0x2A, 0, 0, 0, 0, 7, 0, 0, 1, 0)), out=b"s" * 512)[0].status == 0
    response, data = run(bytes((0x28, 0, 0, 0, 0, 7, 0, 0, 1, 0)), size=512)
    assert (response.status, data) == (0, b"s" * 512)
    assert done == []
    target.close()


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cdb=st.binary(min_size=0, max_size=32)
    | st.builds(
        lambda op, rest: bytes((op,)) + rest,
        st.integers(0, 255),
        st.binary(min_size=0, max_size=31),
    ),
    lun=st.sampled_from([0, 1, REPORT_LUNS_WLUN, 70000]),
    data_in=st.integers(0, 600),
    data_out=st.none() | st.binary(max_size=600),
)
def test_execute_never_raises(
    disk: Disk, cdb: bytes, lun: int, data_in: int, data_out: bytes | None
) -> None:
    target, _ = disk
    r = run_command(target, cdb, data_in=data_in, data_out=data_out, lun=lun, nexus=cdb[:1])
    assert r.status in (Status.GOOD, Status.CHECK_CONDITION, Status.RESERVATION_CONFLICT)
    if r.status == Status.CHECK_CONDITION:
        assert r.sense is not None
    assert 0 <= r.residual <= max(data_in, len(data_out or b""))


class SlowBackend(FileBackend):
    """read_nowait serves only the first 512 bytes: the rest goes to the pool."""

    def read_nowait(self, offset: int, buffers: Sequence[memoryview], length: int) -> int:
        n = min(512, length)
        self.read(offset, [buffers[0][:n]], n)
        return n


def test_pool_completes_reads_later(image: pathlib.Path) -> None:
    pool = IoWorkerPool(2)
    backend = SlowBackend(image)
    target = EmulatedTarget({0: BlockDevice(backend, io_pool=pool)})
    run_command(target, bytes(6))
    data = bytes(range(256)) * 8
    assert (
        run_command(target, b"\x2a" + bytes(4) + b"\x00\x00\x00\x04\x00", data_out=data).status == 0
    )
    completions: list[Response] = []
    writer = BytesWriter(4096)
    request = Request(0, b"\x28" + bytes(6) + b"\x00\x04\x00", data_in=writer)
    assert target.execute(request, completions.append) is None
    pool.close()
    assert completions == [Response(Status.GOOD, b"", 2048)]
    assert writer.getvalue() == data
    r = run_command(
        EmulatedTarget({0: BlockDevice(backend)}),
        b"\x28" + bytes(6) + b"\x00\x04\x00",
        data_in=2048,
    )
    assert r.status == Status.CHECK_CONDITION  # fresh target: UA, proving no pool path here
    backend.close()


class _Plugged(FileBackend):
    """A file back-end that records the batch hooks and says it is asynchronous."""

    def __init__(self, path: pathlib.Path, log: list[str], name: str, fail: bool = False) -> None:
        super().__init__(path)
        self.log, self.name, self.fail = log, name, fail

    @property
    def asynchronous(self) -> bool:
        return True

    def plug(self) -> None:
        self.log.append(f"plug {self.name}")

    def unplug(self) -> None:
        self.log.append(f"unplug {self.name}")
        if self.fail:
            raise OSError("cannot send")


def test_batch_hooks_reach_only_asynchronous_back_ends(tmp_path: pathlib.Path) -> None:
    log: list[str] = []
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    remote_a = BlockDevice(_Plugged(image, log, "a", fail=True))
    remote_b = BlockDevice(_Plugged(image, log, "b"))
    local = BlockDevice(FileBackend(image))
    target = EmulatedTarget({0: remote_a, 1: local, 2: remote_b})
    try:
        target.begin_batch()
        target.end_batch()  # a's unplug fails: b is still unplugged, nothing raises
        assert log == ["plug a", "plug b", "unplug a", "unplug b"]
        log.clear()
        target.detach(2).close()
        target.begin_batch()
        target.end_batch()
        assert log == ["plug a", "unplug a"]
    finally:
        remote_a.close()
        local.close()
