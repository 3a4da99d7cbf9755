"""Fixtures: small raw images on FileBackends behind EmulatedTargets."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import pytest
from scsi_emulation import BlockDevice, BlockDeviceOptions, EmulatedTarget, FileBackend
from scsi_emulation.testing import run_command

BLOCKS = 2048  # 1 MiB of 512-byte blocks

Disk = tuple[EmulatedTarget, BlockDevice]
MakeDisk = Callable[..., Disk]


@pytest.fixture
def image(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(BLOCKS * 512)
    return path


@pytest.fixture
def make_disk(image: pathlib.Path) -> Iterator[MakeDisk]:
    """Build a target with one BlockDevice at LUN 0 (power-on unit attention consumed)."""
    targets: list[EmulatedTarget] = []

    def make(**options: object) -> Disk:
        device = BlockDevice(FileBackend(image), BlockDeviceOptions(**options))  # type: ignore[arg-type]
        target = EmulatedTarget({0: device})
        run_command(target, bytes(6))
        targets.append(target)
        return target, device

    yield make
    for t in targets:
        t.close()


@pytest.fixture
def disk(make_disk: MakeDisk) -> Disk:
    return make_disk()
