"""CDB and parameter builders for tests and tools that drive a target with bytes.

Holds builders for PERSISTENT RESERVE IN/OUT, READ(10)/WRITE(10), a helper that consumes the
power-on unit attention of I_T nexuses, a scratch target on a temporary image, and
`assert_check` for CHECK CONDITION outcomes. Knows nothing about transports.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Hashable, Iterator

from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_core.target import Target

from scsi_emulation.backend import FileBackend
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.target import EmulatedTarget
from scsi_emulation.testing import CommandResult, run_command

__all__ = [
    "A",
    "B",
    "assert_check",
    "prin",
    "prout",
    "prout_params",
    "read10",
    "ready",
    "scratch_target",
    "write10",
]

#: Two I_T nexus names in the iSCSI initiator port form.
A = "iqn.2026-11.test:a,i,0x000000000001"
B = "iqn.2026-11.test:b,i,0x000000000002"


@contextlib.contextmanager
def scratch_target(blocks: int = 2048, **options: object) -> Iterator[EmulatedTarget]:
    """A target with one `BlockDevice` at LUN 0 on a temporary sparse image."""
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(blocks * 512)
        device = BlockDevice(FileBackend(f.name), BlockDeviceOptions(**options))  # type: ignore[arg-type]
        target = EmulatedTarget({0: device})
        try:
            yield target
        finally:
            target.close()


def ready(target: Target, *nexuses: Hashable, lun: int = 0) -> None:
    """Consume the power-on unit attention of each nexus."""
    for nexus in nexuses:
        for _ in range(4):
            if run_command(target, bytes(6), nexus=nexus, lun=lun).status == Status.GOOD:
                break


def prin(sa: int, allocation: int = 1024) -> bytes:
    return bytes((0x5E, sa, 0, 0, 0, 0, 0)) + allocation.to_bytes(2, "big") + b"\0"


def prout(sa: int, kind: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return bytes((0x5F, sa, (scope << 4) | kind, 0, 0)) + length.to_bytes(4, "big") + b"\0"


def prout_params(key: int = 0, sa_key: int = 0, flags: int = 0) -> bytes:
    return key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(4) + bytes((flags, 0, 0, 0))


def read10(lba: int = 1, blocks: int = 1) -> bytes:
    return bytes((0x28, 0)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def write10(lba: int = 1, blocks: int = 1) -> bytes:
    return bytes((0x2A, 0)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def assert_check(r: CommandResult, key: SenseKey, code: Asc | int, byte: int | None = None) -> None:
    assert r.status == Status.CHECK_CONDITION, r
    assert r.sense is not None
    assert (r.sense.key, r.sense.code) == (key, int(code)), r.sense
    if byte is not None:
        fp = r.sense.field_pointer
        assert fp is not None and fp.byte == byte, fp
