"""PERSISTENT RESERVE IN/OUT over two I_T nexuses: registrations, the six reservation types,
the access rules, unit attentions, errors, and the interplay with RESERVE(6)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_core.target import TaskManagementFunction
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.command_builders import (
    A,
    B,
    assert_check,
    prin,
    prout,
    prout_params,
    read10,
    ready,
    scratch_target,
    write10,
)
from scsi_emulation.persistent_reservation import PersistentReservations, transport_id
from scsi_emulation.testing import CommandResult, run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]

REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE = 0, 1, 2, 3, 4, 5, 6
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
K1, K2 = 0x1111222233334444, 0x5555666677778888


@pytest.fixture
def two(disk: Disk) -> Disk:
    target, _ = disk
    ready(target, A, B)
    return disk


def out(
    target: EmulatedTarget, nexus: str, sa: int, key: int = 0, sa_key: int = 0, kind: int = 0
) -> CommandResult:
    return run_command(target, prout(sa, kind), data_out=prout_params(key, sa_key), nexus=nexus)


def keys(target: EmulatedTarget, nexus: str = A) -> tuple[int, list[int]]:
    r = run_command(target, prin(READ_KEYS), data_in=1024, nexus=nexus)
    assert r.status == Status.GOOD
    generation, length = struct.unpack_from(">II", r.data)
    return generation, [int.from_bytes(r.data[8 + i : 16 + i], "big") for i in range(0, length, 8)]


def reservation(target: EmulatedTarget, nexus: str = A) -> tuple[int, int] | None:
    r = run_command(target, prin(READ_RESERVATION), data_in=1024, nexus=nexus)
    assert r.status == Status.GOOD
    if struct.unpack_from(">I", r.data, 4)[0] == 0:
        return None
    return int.from_bytes(r.data[8:16], "big"), r.data[21]


def register_both(target: EmulatedTarget) -> None:
    assert out(target, A, REGISTER_IGNORE, sa_key=K1).status == Status.GOOD
    assert out(target, B, REGISTER_IGNORE, sa_key=K2).status == Status.GOOD


def test_register_read_keys_and_generation(two: Disk) -> None:
    target, _ = two
    assert keys(target) == (0, [])
    assert out(target, A, REGISTER, sa_key=K1).status == Status.GOOD
    assert out(target, B, REGISTER, sa_key=K2).status == Status.GOOD
    assert keys(target, B) == (2, [K1, K2])
    # A registered nexus changes its key with the right RESERVATION KEY.
    assert out(target, A, REGISTER, key=K1, sa_key=0x99).status == Status.GOOD
    assert keys(target) == (3, [0x99, K2])
    # ... and unregisters with SERVICE ACTION RESERVATION KEY 0.
    assert out(target, A, REGISTER, key=0x99).status == Status.GOOD
    assert keys(target) == (4, [K2])


def test_register_conflicts(two: Disk) -> None:
    target, _ = two
    # Unregistered with a non-zero RESERVATION KEY.
    assert out(target, A, REGISTER, key=K1, sa_key=K1).status == Status.RESERVATION_CONFLICT
    assert out(target, A, REGISTER, sa_key=K1).status == Status.GOOD
    # Registered, wrong RESERVATION KEY: conflict; REGISTER AND IGNORE EXISTING KEY works.
    assert out(target, A, REGISTER, key=K2, sa_key=K2).status == Status.RESERVATION_CONFLICT
    assert out(target, A, REGISTER_IGNORE, key=K2, sa_key=K2).status == Status.GOOD
    assert keys(target)[1] == [K2]
    # Unregistered nexus with key 0 and SARK 0: nothing happens, GOOD, no generation change.
    gen = keys(target)[0]
    assert out(target, B, REGISTER).status == Status.GOOD
    assert keys(target)[0] == gen


def test_unregistered_nexus_cannot_reserve_release_clear_or_preempt(two: Disk) -> None:
    target, _ = two
    for sa in (RESERVE, RELEASE, PREEMPT, PREEMPT_ABORT):
        r = out(target, B, sa, key=K2, sa_key=K1, kind=WE)
        assert r.status == Status.RESERVATION_CONFLICT
    assert out(target, B, CLEAR, key=K2).status == Status.RESERVATION_CONFLICT


@pytest.mark.parametrize("kind", [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR])
def test_reserve_and_read_reservation(two: Disk, kind: int) -> None:
    target, _ = two
    register_both(target)
    gen = keys(target)[0]
    assert out(target, A, RESERVE, key=K1, kind=kind).status == Status.GOOD
    expected_key = 0 if kind in (WE_AR, EA_AR) else K1  # all registrants: key 0 (6.15.3)
    assert reservation(target, B) == (expected_key, kind)
    assert keys(target)[0] == gen  # RESERVE does not change PRgeneration
    # The same reservation again is GOOD; another type or another nexus conflicts.
    assert out(target, A, RESERVE, key=K1, kind=kind).status == Status.GOOD
    other = WE if kind != WE else EA
    assert out(target, A, RESERVE, key=K1, kind=other).status == Status.RESERVATION_CONFLICT
    if kind not in (WE_AR, EA_AR):
        assert out(target, B, RESERVE, key=K2, kind=kind).status == Status.RESERVATION_CONFLICT
    # Wrong key conflicts.
    assert out(target, A, RESERVE, key=K2, kind=kind).status == Status.RESERVATION_CONFLICT


# (type, registered B can read, can write, unregistered B can read, can write): libiscsi's
# ProutReserve.Access* expectations, which follow SPC-4 5.12.3 tables.
ACCESS = [
    (EA, False, False, False, False),
    (WE, True, False, True, False),
    (EA_RO, True, True, False, False),
    (WE_RO, True, True, True, False),
    (EA_AR, True, True, False, False),
    (WE_AR, True, True, True, False),
]


def _works(r: CommandResult) -> bool:
    if r.status == Status.GOOD:
        return True
    assert r.status == Status.RESERVATION_CONFLICT, r
    return False


@pytest.mark.parametrize(("kind", "reg_read", "reg_write", "unreg_read", "unreg_write"), ACCESS)
def test_access_rules(
    two: Disk, kind: int, reg_read: bool, reg_write: bool, unreg_read: bool, unreg_write: bool
) -> None:
    target, _ = two
    register_both(target)
    block = bytes(range(256)) * 2
    # B reads before the reservation, so B is on the fast path: the reservation must end that.
    assert run_command(target, read10(), data_in=512, nexus=B).status == Status.GOOD
    assert out(target, A, RESERVE, key=K1, kind=kind).status == Status.GOOD
    assert run_command(target, read10(), data_in=512, nexus=A).status == Status.GOOD
    assert run_command(target, write10(), data_out=block, nexus=A).status == Status.GOOD
    assert _works(run_command(target, read10(), data_in=512, nexus=B)) == reg_read
    assert _works(run_command(target, write10(), data_out=block, nexus=B)) == reg_write
    assert out(target, B, REGISTER, key=K2).status == Status.GOOD  # unregister B
    assert _works(run_command(target, read10(), data_in=512, nexus=B)) == unreg_read
    assert _works(run_command(target, write10(), data_out=block, nexus=B)) == unreg_write
    # Commands that never conflict.
    for cdb, n in ((bytes(6), 0), (b"\x12\0\0\0\xff\0", 255), (prin(READ_KEYS), 64)):
        assert run_command(target, cdb, data_in=n, nexus=B).status == Status.GOOD
    read_capacity_16 = b"\x9e\x10" + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
    assert run_command(target, read_capacity_16, data_in=32, nexus=B).status == Status.GOOD
    # MODE SELECT is a write: it conflicts for B (unregistered) under every type.
    select = b"\x15\x10\0\0\x04\0"
    r = run_command(target, select, data_out=bytes(4), nexus=B)
    assert r.status == Status.RESERVATION_CONFLICT
    # Release: B has full access again.
    assert out(target, A, RELEASE, key=K1, kind=kind).status == Status.GOOD
    assert run_command(target, write10(), data_out=block, nexus=B).status == Status.GOOD


@pytest.mark.parametrize(("kind", "shared"), [(EA, False), (WE_RO, False), (EA_AR, True)])
def test_holder_unregistering(two: Disk, kind: int, shared: bool) -> None:
    """libiscsi ProutReserve.Ownership*: the reservation ends with its holder's registration,
    except for all-registrants types, which last while any registrant remains."""
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=kind).status == Status.GOOD
    assert out(target, A, REGISTER, key=K1).status == Status.GOOD
    if shared:
        assert reservation(target) == (0, kind)
        assert out(target, B, RELEASE, key=K2, kind=kind).status == Status.GOOD
    assert reservation(target) is None
    if kind == WE_RO:
        # SPC-4 5.12.11.2: the other registrants of a registrants-only reservation are told.
        assert_check(
            run_command(target, bytes(6), nexus=B),
            SenseKey.UNIT_ATTENTION,
            Asc.RESERVATIONS_RELEASED,
        )


def test_all_registrants_reservation_ends_with_last_registrant(two: Disk) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=WE_AR).status == Status.GOOD
    assert out(target, A, REGISTER, key=K1).status == Status.GOOD
    assert reservation(target) == (0, WE_AR)
    assert out(target, B, REGISTER, key=K2).status == Status.GOOD
    assert reservation(target) is None


def test_release_rules(two: Disk) -> None:
    target, _ = two
    register_both(target)
    # No reservation: GOOD.
    assert out(target, A, RELEASE, key=K1, kind=WE).status == Status.GOOD
    assert out(target, A, RESERVE, key=K1, kind=EA_RO).status == Status.GOOD
    # A registrant that is not the holder: GOOD, nothing released.
    assert out(target, B, RELEASE, key=K2, kind=EA_RO).status == Status.GOOD
    assert reservation(target) == (K1, EA_RO)
    # The holder with another type: INVALID RELEASE OF PERSISTENT RESERVATION.
    r = out(target, A, RELEASE, key=K1, kind=EA)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert out(target, A, RELEASE, key=K1, kind=EA_RO).status == Status.GOOD
    assert reservation(target) is None
    assert_check(
        run_command(target, bytes(6), nexus=B), SenseKey.UNIT_ATTENTION, Asc.RESERVATIONS_RELEASED
    )
    assert run_command(target, bytes(6), nexus=A).status == Status.GOOD  # not the releaser


def test_clear(two: Disk) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=WE).status == Status.GOOD
    gen = keys(target)[0]
    assert out(target, B, CLEAR, key=K2).status == Status.GOOD
    assert keys(target, B) == (gen + 1, [])
    assert reservation(target, B) is None
    assert_check(
        run_command(target, bytes(6), nexus=A), SenseKey.UNIT_ATTENTION, Asc.RESERVATIONS_PREEMPTED
    )
    assert run_command(target, bytes(6), nexus=B).status == Status.GOOD


def test_preempt_removes_registration_without_reservation(two: Disk) -> None:
    """libiscsi ProutPreempt.RemoveRegistration."""
    target, _ = two
    register_both(target)
    gen = keys(target)[0]
    assert out(target, B, PREEMPT, key=K2, sa_key=K1, kind=EA).status == Status.GOOD
    assert keys(target, B) == (gen + 1, [K2])
    assert_check(
        run_command(target, bytes(6), nexus=A), SenseKey.UNIT_ATTENTION, Asc.REGISTRATIONS_PREEMPTED
    )
    assert reservation(target) is None
    # A key nobody holds: RESERVATION CONFLICT. Key 0 without a reservation: invalid field.
    assert out(target, B, PREEMPT, key=K2, sa_key=0x77, kind=EA).status == (
        Status.RESERVATION_CONFLICT
    )
    r = out(target, B, PREEMPT, key=K2, sa_key=0, kind=EA)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 8)


@pytest.mark.parametrize("sa", [PREEMPT, PREEMPT_ABORT])
def test_preempt_the_holder(two: Disk, sa: int) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=EA).status == Status.GOOD
    assert out(target, B, sa, key=K2, sa_key=K1, kind=WE).status == Status.GOOD
    assert reservation(target, B) == (K2, WE)
    assert keys(target, B)[1] == [K2]
    assert_check(
        run_command(target, bytes(6), nexus=A), SenseKey.UNIT_ATTENTION, Asc.REGISTRATIONS_PREEMPTED
    )
    # A is unregistered now: WE lets it read but not write.
    assert run_command(target, read10(), data_in=512, nexus=A).status == Status.GOOD
    r = run_command(target, write10(), data_out=bytes(512), nexus=A)
    assert r.status == Status.RESERVATION_CONFLICT


def test_preempt_all_registrants_with_key_zero(two: Disk) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=WE_AR).status == Status.GOOD
    assert out(target, B, PREEMPT, key=K2, sa_key=0, kind=EA).status == Status.GOOD
    assert reservation(target, B) == (K2, EA)
    assert keys(target, B)[1] == [K2]


def test_prout_field_errors(two: Disk) -> None:
    target, _ = two
    assert out(target, A, REGISTER, sa_key=K1).status == Status.GOOD
    # PARAMETER LIST LENGTH other than 24.
    r = run_command(target, prout(REGISTER, length=23), data_out=bytes(23), nexus=A)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    # SCOPE other than LU, TYPE not defined.
    r = run_command(target, prout(RESERVE, WE, scope=1), data_out=prout_params(K1), nexus=A)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)
    r = run_command(target, prout(RESERVE, 2), data_out=prout_params(K1), nexus=A)
    assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2)
    # APTPL / ALL_TG_PT / SPEC_I_PT are not supported.
    for flags in (0x01, 0x04, 0x08):
        params = prout_params(K1, K2, flags)
        r = run_command(target, prout(REGISTER), data_out=params, nexus=A)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 20)
    # REGISTER AND MOVE / REPLACE LOST RESERVATION are not supported service actions.
    for sa in (7, 8, 0x1F):
        r = run_command(target, prout(sa), data_out=prout_params(K1), nexus=A)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    assert keys(target)[1] == [K1]


def test_prin_service_action_range_and_truncation(two: Disk) -> None:
    target, _ = two
    for sa in range(4):
        assert run_command(target, prin(sa), data_in=1024, nexus=A).status == Status.GOOD
    for sa in range(4, 0x20):
        r = run_command(target, prin(sa), data_in=1024, nexus=A)
        assert_check(r, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1)
    register_both(target)
    r = run_command(target, prin(READ_KEYS, allocation=12), data_in=1024, nexus=A)
    assert r.status == Status.GOOD and len(r.data) == 12
    assert struct.unpack_from(">I", r.data, 4)[0] == 16  # ADDITIONAL LENGTH is not truncated


def test_report_capabilities(two: Disk) -> None:
    target, _ = two
    r = run_command(target, prin(REPORT_CAPABILITIES), data_in=1024, nexus=A)
    d = r.data
    assert len(d) == 8 and struct.unpack_from(">H", d)[0] == 8
    assert d[2] == 0x10  # CRH; no SIP_C, ATP_C, PTPL_C
    assert d[3] & 0x80 and (d[3] >> 4) & 7 <= 5  # TMV, ALLOW COMMANDS
    assert d[4:6] == b"\xea\x01"  # all six types


def test_read_full_status(two: Disk) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=EA).status == Status.GOOD
    d = run_command(target, prin(READ_FULL_STATUS), data_in=4096, nexus=B).data
    generation, length = struct.unpack_from(">II", d)
    assert generation == 2 and length == len(d) - 8
    found = {}
    pos = 8
    while pos < len(d):
        key = int.from_bytes(d[pos : pos + 8], "big")
        holder, scope_type = d[pos + 12] & 1, d[pos + 13]
        port = int.from_bytes(d[pos + 18 : pos + 20], "big")
        tid_len = int.from_bytes(d[pos + 20 : pos + 24], "big")
        tid = d[pos + 24 : pos + 24 + tid_len]
        found[key] = (holder, scope_type, port, tid)
        pos += 24 + tid_len
    assert found[K1][:3] == (1, EA, 1) and found[K2][:3] == (0, 0, 1)
    tid = found[K1][3]
    assert tid[0] == 0x45  # iSCSI initiator port format, protocol 5
    assert tid[4:].rstrip(b"\0") == A.encode()


def test_reserve6_and_persistent_reservations(two: Disk) -> None:
    target, _ = two
    # A RESERVE(6) holder blocks B's PERSISTENT RESERVE OUT.
    assert run_command(target, b"\x16" + bytes(5), nexus=A).status == Status.GOOD
    assert out(target, B, REGISTER, sa_key=K2).status == Status.RESERVATION_CONFLICT
    assert run_command(target, b"\x17" + bytes(5), nexus=A).status == Status.GOOD
    # With a registration present, RESERVE(6) and RELEASE(6) conflict (CRH=1).
    assert out(target, B, REGISTER, sa_key=K2).status == Status.GOOD
    assert run_command(target, b"\x16" + bytes(5), nexus=A).status == Status.RESERVATION_CONFLICT
    assert run_command(target, b"\x17" + bytes(5), nexus=B).status == Status.RESERVATION_CONFLICT


def test_state_survives_nexus_loss_and_resets(two: Disk) -> None:
    target, _ = two
    register_both(target)
    assert out(target, A, RESERVE, key=K1, kind=WE).status == Status.GOOD
    target.forget_nexus(A)
    target.task_management(TaskManagementFunction.LOGICAL_UNIT_RESET, 0, nexus=B)
    target.task_management(TaskManagementFunction.TARGET_WARM_RESET, 0, nexus=B)
    ready(target, A, B)
    assert keys(target)[1] == [K1, K2]
    assert reservation(target) == (K1, WE)
    r = run_command(target, write10(), data_out=bytes(512), nexus=B)
    assert r.status == Status.RESERVATION_CONFLICT


def test_rsoc_lists_the_service_actions(two: Disk) -> None:
    target, _ = two
    rsoc = b"\xa3\x0c\x00" + bytes(3) + (8192).to_bytes(4, "big") + b"\0\0"
    d = run_command(target, rsoc, data_in=8192, nexus=A).data
    found = {
        (d[i], int.from_bytes(d[i + 2 : i + 4], "big"))
        for i in range(4, 4 + int.from_bytes(d[:4], "big"), 8)
    }
    assert {(0x5E, sa) for sa in range(4)} <= found
    assert {(0x5F, sa) for sa in range(7)} <= found
    # One command, with service action (reporting option 2).
    one = b"\xa3\x0c\x02\x5f\x00\x04" + (64).to_bytes(4, "big") + b"\0\0"
    r = run_command(target, one, data_in=64, nexus=A)
    assert r.data[1] & 0x07 == 0x03 and r.data[4:6] == b"\x5f\x04"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([A, B]), st.booleans(), st.integers(0, 3)),
        max_size=20,
    )
)
def test_register_model(ops: list[tuple[str, bool, int]]) -> None:
    """Random REGISTER / REGISTER AND IGNORE sequences match a dictionary model."""
    with scratch_target(64) as target:
        ready(target, A, B)
        model: dict[str, int] = {}
        generation = 0
        for nexus, ignore, new in ops:
            current = model.get(nexus, 0)
            r = run_command(
                target,
                prout(REGISTER_IGNORE if ignore else REGISTER),
                data_out=prout_params(current, new),
                nexus=nexus,
            )
            assert r.status == Status.GOOD
            if new:
                model[nexus] = new
                generation += 1
            elif nexus in model:
                del model[nexus]
                generation += 1
        gen, listed = keys(target)
        assert gen == generation and sorted(listed) == sorted(model.values())


@given(st.text(min_size=1, max_size=300))
def test_transport_id_layout(name: str) -> None:
    tid = transport_id(name)
    length = int.from_bytes(tid[2:4], "big")
    assert len(tid) == 4 + length and length >= 20 and length % 4 == 0
    assert tid[4:].rstrip(b"\0") == name.encode("utf-8", "replace").rstrip(b"\0")
    assert isinstance(PersistentReservations().registrations, dict)
