"""A removable-medium LU: START STOP UNIT load/eject, PREVENT ALLOW MEDIUM REMOVAL (per I_T
nexus), MEDIUM NOT PRESENT, and who hears about a load."""

from __future__ import annotations

from collections.abc import Callable

from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_emulation import BlockDevice, EmulatedTarget
from scsi_emulation.command_builders import A, B, assert_check, read10, ready
from scsi_emulation.testing import run_command

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]

EJECT = b"\x1b\0\0\0\x02\0"
LOAD = b"\x1b\0\0\0\x03\0"


def prevent(on: bool) -> bytes:
    return bytes((0x1E, 0, 0, 0, 1 if on else 0, 0))


def test_prevent_blocks_eject_and_load(make_disk: MakeDisk) -> None:
    target, _ = make_disk(removable=True)
    ready(target, A, B)
    assert run_command(target, prevent(True), nexus=A).status == Status.GOOD
    assert_check(
        run_command(target, EJECT, nexus=B), SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED
    )
    assert run_command(target, bytes(6), nexus=A).status == Status.GOOD  # still there
    assert run_command(target, prevent(False), nexus=A).status == Status.GOOD
    assert run_command(target, EJECT, nexus=A).status == Status.GOOD
    for nexus in (A, B):
        assert_check(
            run_command(target, read10(), data_in=512, nexus=nexus),
            SenseKey.NOT_READY,
            Asc.MEDIUM_NOT_PRESENT,
        )
    # PREVENT works without a medium, and then a load is refused too.
    assert run_command(target, prevent(True), nexus=A).status == Status.GOOD
    assert_check(
        run_command(target, LOAD, nexus=A), SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED
    )
    assert run_command(target, prevent(False), nexus=A).status == Status.GOOD
    assert run_command(target, LOAD, nexus=A).status == Status.GOOD
    # The loader carries on; the other nexus learns the medium may have changed.
    assert run_command(target, bytes(6), nexus=A).status == Status.GOOD
    assert_check(
        run_command(target, bytes(6), nexus=B),
        SenseKey.UNIT_ATTENTION,
        Asc.NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED,
    )
    assert run_command(target, read10(), data_in=512, nexus=B).status == Status.GOOD


def test_prevent_is_per_nexus_and_cleared_by_nexus_loss(make_disk: MakeDisk) -> None:
    target, _ = make_disk(removable=True)
    ready(target, A, B)
    assert run_command(target, prevent(True), nexus=A).status == Status.GOOD
    assert run_command(target, prevent(False), nexus=B).status == Status.GOOD  # B's own state
    assert run_command(target, EJECT, nexus=B).status == Status.CHECK_CONDITION
    target.forget_nexus(A)
    assert run_command(target, EJECT, nexus=B).status == Status.GOOD


def test_fixed_lu_ignores_loej(disk: Disk) -> None:
    target, _ = disk
    assert run_command(target, EJECT).status == Status.GOOD
    assert run_command(target, read10(), data_in=512).status == Status.GOOD
