"""The full feature phase over the sans-IO Connection, driven by the test initiator."""

from __future__ import annotations

import struct

import pytest
from iscsi_fakes import BLOCK_SIZE, RamDiskTarget
from iscsi_initiator import LIBISCSI_KEYS, Initiator, LoopbackTransport, NoResponse
from iscsi_target.config import TargetConfig
from iscsi_target.connection import Connection, ConnectionState
from iscsi_target.constants import (
    LogoutResponseCode,
    RejectReason,
    TmfFunction,
    TmfResponseCode,
)
from iscsi_target.pdu import DataOut, ScsiCommand, ScsiResponse, SnackRequest
from iscsi_target.registry import SessionRegistry
from scsi_core.sense import parse_sense
from scsi_core.status import Status
from scsi_core.target import TaskManagementFunction

IQN = "iqn.2024-01.org.example:disk"


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def make(
    target: RamDiskTarget | None = None, **config: object
) -> tuple[RamDiskTarget, SessionRegistry, Connection, Initiator]:
    disk = target or RamDiskTarget()
    registry = SessionRegistry(disk, TargetConfig(iqn=IQN, block_sizes={0: BLOCK_SIZE}, **config))  # type: ignore[arg-type]
    connection = Connection(registry, peer="test")
    return disk, registry, connection, Initiator(LoopbackTransport(connection))


async def logged_in(
    keys: dict[str, str] | None = None, target: RamDiskTarget | None = None
) -> tuple[RamDiskTarget, SessionRegistry, Connection, Initiator]:
    disk, registry, connection, initiator = make(target)
    response = await initiator.login(IQN, keys=keys)
    assert response.status == 0
    assert connection.state is ConnectionState.FULL_FEATURE
    return disk, registry, connection, initiator


async def test_write_then_read_with_immediate_and_unsolicited_data() -> None:
    disk, _, _, initiator = await logged_in()
    payload = bytes(range(256)) * 8 * 300  # 600 KiB: immediate, unsolicited, then R2Ts
    blocks = len(payload) // BLOCK_SIZE
    result = await initiator.command(write10(10, blocks), data=payload)
    assert result.status == Status.GOOD
    assert result.residual_flags == 0
    assert result.r2ts, "data beyond FirstBurstLength needs R2Ts"
    assert all(r.desired_data_transfer_length <= 262144 for r in result.r2ts)
    assert disk.data[10 * BLOCK_SIZE : 10 * BLOCK_SIZE + len(payload)] == payload
    back = await initiator.command(read10(10, blocks), read=len(payload))
    assert back.status == Status.GOOD
    assert back.data == payload
    # Status rides in the last Data-In (phase collapse); DataSN counts up from 0.
    assert back.data_in[-1].status_present
    assert [p.datasn for p in back.data_in] == list(range(len(back.data_in)))
    assert all(len(p.data) <= 262144 for p in back.data_in)


async def test_write_with_initial_r2t_yes_uses_only_r2ts() -> None:
    keys = dict(LIBISCSI_KEYS, InitialR2T="Yes", ImmediateData="No", MaxOutstandingR2T="1")
    disk, _, _, initiator = await logged_in(keys)
    payload = b"\xa5" * (8 * BLOCK_SIZE)
    result = await initiator.command(write10(0, 8), data=payload)
    assert result.status == Status.GOOD
    assert [(r.r2tsn, r.buffer_offset) for r in result.r2ts] == [(0, 0)]
    assert disk.data[: len(payload)] == payload


@pytest.mark.parametrize(
    ("blocks", "edtl", "flags", "residual", "received"),
    [
        (1, 0, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE, 0),
        (1, 10000, ScsiResponse.FLAG_UNDERFLOW, 10000 - BLOCK_SIZE, BLOCK_SIZE),
        (1, 200, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE - 200, 200),
        (2, BLOCK_SIZE, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE, BLOCK_SIZE),
    ],
)
async def test_read_residuals(
    blocks: int, edtl: int, flags: int, residual: int, received: int
) -> None:
    disk, _, _, initiator = await logged_in()
    disk.data[:1024] = b"\x11" * 1024
    result = await initiator.command(read10(0, blocks), read=edtl, read_flag=True)
    assert result.status == Status.GOOD
    assert (result.residual_flags, result.residual) == (flags, residual)
    assert len(result.data) == received


@pytest.mark.parametrize(
    ("blocks", "edtl", "flags", "residual", "written"),
    [
        (1, 0, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE, 0),
        (1, 10000, ScsiResponse.FLAG_UNDERFLOW, 10000 - BLOCK_SIZE, 1),
        (1, 200, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE - 200, 0),
        (2, BLOCK_SIZE, ScsiResponse.FLAG_OVERFLOW, BLOCK_SIZE, 1),
        (1, 2 * BLOCK_SIZE, ScsiResponse.FLAG_UNDERFLOW, BLOCK_SIZE, 1),
    ],
)
async def test_write_residuals(
    blocks: int, edtl: int, flags: int, residual: int, written: int
) -> None:
    """libiscsi 1.19 iSCSIResiduals: GOOD, the O/U flag, and only whole blocks of the EDTL
    (never more than the CDB asks) reach the medium."""
    disk, _, _, initiator = await logged_in()
    disk.data[: 2 * BLOCK_SIZE] = b"a" * (2 * BLOCK_SIZE)
    result = await initiator.command(
        write10(0, blocks), data=b"b" * edtl, edtl=edtl, write_flag=True
    )
    assert result.status == Status.GOOD
    assert (result.residual_flags, result.residual) == (flags, residual)
    cut = written * BLOCK_SIZE
    assert disk.data[: 2 * BLOCK_SIZE] == b"b" * cut + b"a" * (2 * BLOCK_SIZE - cut)


async def test_compare_and_write_needs_exactly_its_data() -> None:
    _, _, _, initiator = await logged_in()
    cdb = bytes((0x89, 0)) + bytes(8) + bytes(3) + bytes((1, 0, 0))  # 1 block: 2 blocks of data
    result = await initiator.command(cdb, data=b"x" * (4 * BLOCK_SIZE))
    assert result.status == Status.CHECK_CONDITION
    sense = parse_sense(result.sense)
    assert (sense.key, sense.asc) == (0x05, 0x24)
    assert (result.residual_flags, result.residual) == (
        ScsiResponse.FLAG_UNDERFLOW,
        2 * BLOCK_SIZE,
    )


async def test_read_flagged_as_write_succeeds() -> None:
    _, _, _, initiator = await logged_in()
    result = await initiator.command(read10(0, 1), data=b"x" * BLOCK_SIZE)
    assert result.status == Status.GOOD
    assert result.data == b""


@pytest.mark.parametrize("bad_datasn", ["duplicate", "27", "-1", "reversed"])
async def test_invalid_datasn_fails_the_command(bad_datasn: str) -> None:
    keys = dict(LIBISCSI_KEYS, ImmediateData="No", MaxRecvDataSegmentLength="512")
    disk, _, connection, initiator = await logged_in(keys)
    initiator.negotiated["MaxRecvDataSegmentLength"] = "512"  # two Data-Outs of one block
    itt = initiator.next_itt()
    await initiator.send(
        ScsiCommand(itt=itt, cdb=write10(100, 2), expected_data_transfer_length=1024,
                    cmdsn=initiator.cmdsn, write=True, final=False)
    )  # fmt: skip
    initiator.cmdsn += 1
    datasns = {"duplicate": (0, 0), "27": (27, 1), "-1": (0xFFFFFFFF, 1), "reversed": (1, 0)}
    for index, datasn in enumerate(datasns[bad_datasn]):
        await initiator.send(
            DataOut(itt=itt, datasn=datasn, buffer_offset=index * 512, final=index == 1,
                    data=b"\xa6" * 512)
        )  # fmt: skip
    response = await initiator.receive()
    assert isinstance(response, ScsiResponse)
    assert response.status == Status.CHECK_CONDITION
    assert parse_sense(response.sense).key == 0x0B  # ABORTED COMMAND, DATA PHASE ERROR
    assert disk.data[100 * 512 : 102 * 512] == bytes(1024)
    # The session goes on.
    assert (await initiator.command(bytes(6))).status == Status.GOOD
    assert connection.state is ConnectionState.FULL_FEATURE


async def test_cmdsn_outside_window_is_silently_ignored() -> None:
    _, _, connection, initiator = await logged_in()
    for cmdsn in (connection.max_cmdsn + 1, connection.exp_cmdsn - 1):
        await initiator.send(ScsiCommand(itt=initiator.next_itt(), cdb=bytes(6), cmdsn=cmdsn))
        with pytest.raises(NoResponse):
            await initiator.receive()
    assert (await initiator.command(bytes(6))).status == Status.GOOD


async def test_commands_out_of_cmdsn_order_wait_for_the_gap() -> None:
    _, _, connection, initiator = await logged_in()
    first, second = initiator.cmdsn, initiator.cmdsn + 1
    await initiator.send(ScsiCommand(itt=1, cdb=bytes(6), cmdsn=second))
    with pytest.raises(NoResponse):
        await initiator.receive()
    await initiator.send(ScsiCommand(itt=2, cdb=bytes(6), cmdsn=first))
    answers = [await initiator.receive(), await initiator.receive()]
    assert [a.itt for a in answers if isinstance(a, ScsiResponse)] == [2, 1]
    assert connection.exp_cmdsn == second + 1


async def test_pending_command_completes_later_and_abort_task() -> None:
    disk = RamDiskTarget(pending=True)
    _, _, _, initiator = await logged_in(target=disk)
    itt = initiator.next_itt()
    await initiator.send(ScsiCommand(itt=itt, cdb=bytes(6), cmdsn=initiator.cmdsn))
    initiator.cmdsn += 1
    with pytest.raises(NoResponse):
        await initiator.receive()
    response = await initiator.tmf(TmfFunction.ABORT_TASK, itt)
    assert response.response == TmfResponseCode.FUNCTION_COMPLETE
    assert disk.tmfs[-1][:3] == (TaskManagementFunction.ABORT_TASK, 0, itt)
    disk.finish_all()  # the aborted command's late completion is not reported
    with pytest.raises(NoResponse):
        await initiator.receive()
    again = await initiator.tmf(TmfFunction.ABORT_TASK, itt)
    assert again.response == TmfResponseCode.TASK_DOES_NOT_EXIST


async def test_pending_completion_reaches_the_initiator() -> None:
    disk = RamDiskTarget(pending=True)
    _, _, connection, initiator = await logged_in(target=disk)
    woken: list[bool] = []
    connection.on_output = lambda: woken.append(True)
    await initiator.send(ScsiCommand(itt=5, cdb=bytes(6), cmdsn=initiator.cmdsn))
    disk.finish_all()
    assert woken == [True]
    response = await initiator.receive()
    assert isinstance(response, ScsiResponse) and response.status == Status.GOOD


async def test_lun_reset_and_unknown_lun() -> None:
    disk, _, _, initiator = await logged_in()
    response = await initiator.tmf(TmfFunction.LOGICAL_UNIT_RESET)
    assert response.response == TmfResponseCode.FUNCTION_COMPLETE
    assert disk.tmfs[-1][0] == TaskManagementFunction.LOGICAL_UNIT_RESET
    missing = await initiator.tmf(TmfFunction.LOGICAL_UNIT_RESET, lun=bytes((0, 7)) + bytes(6))
    assert missing.response == TmfResponseCode.LUN_DOES_NOT_EXIST
    reassign = await initiator.tmf(TmfFunction.TASK_REASSIGN)
    assert reassign.response == TmfResponseCode.REASSIGNMENT_NOT_SUPPORTED


async def test_cold_reset_closes_every_session() -> None:
    disk, registry, connection, initiator = await logged_in()
    other = Connection(registry, peer="other")
    closed: list[bool] = []
    other.on_close_request = lambda: closed.append(True)
    other_initiator = Initiator(LoopbackTransport(other), isid=0x99)
    assert (await other_initiator.login(IQN, initiator="iqn.x:two")).status == 0
    assert len(registry) == 2
    response = await initiator.tmf(TmfFunction.TARGET_COLD_RESET)
    assert response.response == TmfResponseCode.FUNCTION_COMPLETE
    assert connection.wants_close and other.wants_close and closed == [True]
    assert len(registry) == 0
    nexus_resets = [t for t in disk.tmfs if t[0] == TaskManagementFunction.I_T_NEXUS_RESET]
    assert len(nexus_resets) == 2


async def test_connection_loss_is_an_i_t_nexus_loss_and_relogin_works() -> None:
    disk, registry, connection, _initiator = await logged_in()
    connection.connection_lost()
    assert disk.tmfs[-1][0] == TaskManagementFunction.I_T_NEXUS_RESET
    assert str(disk.tmfs[-1][3]).startswith("iqn.2024-01.org.example:initiator,i,0x")
    again = Connection(registry)
    assert (await Initiator(LoopbackTransport(again)).login(IQN)).status == 0


async def test_session_reinstatement_closes_the_old_connection() -> None:
    _, registry, connection, _initiator = await logged_in()
    newer = Connection(registry)
    assert (await Initiator(LoopbackTransport(newer)).login(IQN)).status == 0
    assert connection.wants_close
    assert len(registry) == 1


async def test_nop_text_and_logout() -> None:
    _, registry, connection, initiator = await logged_in()
    nop = await initiator.nop(b"ping")
    assert nop.data == b"ping" and nop.ttt == 0xFFFFFFFF
    answers = await initiator.text({"SendTargets": ""})
    assert ("TargetName", IQN) in answers
    logout = await initiator.logout()
    assert logout.response == LogoutResponseCode.SUCCESS
    assert connection.wants_close
    assert len(registry) == 0


async def test_discovery_session_send_targets() -> None:
    _, _registry, _connection, initiator = make()
    assert (await initiator.login("", session_type="Discovery")).status == 0
    answers = await initiator.text({"SendTargets": "All"})
    assert answers == [("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")]
    # SCSI commands have no place in a discovery session.
    await initiator.send(ScsiCommand(itt=9, cdb=bytes(6), cmdsn=initiator.cmdsn))
    reject = await initiator.expect_reject()
    assert reject.reason == RejectReason.PROTOCOL_ERROR


async def test_snack_and_unknown_opcode_are_rejected() -> None:
    _, _, connection, initiator = await logged_in()
    await initiator.send(SnackRequest(itt=1))
    assert (await initiator.expect_reject()).reason == RejectReason.PROTOCOL_ERROR
    bogus = bytearray(48)
    bogus[0] = 0x1C
    await initiator.transport.send(bytes(bogus))
    reject = await initiator.expect_reject()
    assert reject.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert bytes(reject.data) == bytes(bogus)
    assert connection.state is ConnectionState.FULL_FEATURE


async def test_header_and_data_digests() -> None:
    keys = dict(LIBISCSI_KEYS, HeaderDigest="CRC32C", DataDigest="CRC32C")
    _disk, _, _, initiator = await logged_in(keys)
    assert initiator.header_digest and initiator.data_digest
    payload = b"digest!!" * 64
    assert (await initiator.command(write10(3, 1), data=payload)).status == Status.GOOD
    back = await initiator.command(read10(3, 1), read=BLOCK_SIZE)
    assert back.data == payload
