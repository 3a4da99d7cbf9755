"""Failed commands must not pin their requests: shared error instances carry no traceback."""

from __future__ import annotations

import gc
import weakref

from scsi_core.status import Status
from scsi_core.target import BytesReader, Request, Target
from scsi_emulation import block_device
from scsi_emulation.command_builders import ready, scratch_target


class TrackedReader(BytesReader):
    """A reader that can be weakly referenced, to see whether anything still holds it."""

    __slots__ = ("__weakref__",)


def test_repeated_failures_leave_no_traceback_and_free_their_buffers() -> None:
    with scratch_target(blocks=64) as target:
        ready(target)
        _fail_writes(target)


def _fail_writes(target: Target) -> None:
    readers: list[weakref.ref[TrackedReader]] = []
    for _ in range(50):
        # WRITE(10) past the end of the LU: LOGICAL BLOCK ADDRESS OUT OF RANGE, raised from a
        # shared instance.
        cdb = bytes([0x2A, 0, 0, 0, 1, 0, 0, 0, 8, 0])
        reader = TrackedReader(bytes(8 * 512))
        readers.append(weakref.ref(reader))
        response = target.execute(Request(0, cdb, reader, None), lambda r: None)
        assert response is not None and response.status == Status.CHECK_CONDITION
        del reader, response
    gc.collect()
    assert block_device._LBA_OUT_OF_RANGE.__traceback__ is None
    assert all(ref() is None for ref in readers), "a failed command's data buffer is still alive"
