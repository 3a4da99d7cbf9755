"""The LUN table: image files opened as emulated SCSI block devices of one target.

Holds `LunSpec` (what the operator asked for one LUN) and `LunTable`, which opens an image with
`scsi_emulation.FileBackend`, wraps it in a `BlockDevice` and places it in the
`EmulatedTarget`; and removes, resizes and lists LUNs for the control socket. Errors are
`LunError` with a message fit for the operator. Knows nothing about virtio or vhost-user.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from scsi_emulation.backend import FileBackend
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.identity import DeviceIdentity
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.target import EmulatedTarget

__all__ = ["IO_THREADS", "LunError", "LunSpec", "LunTable"]

logger = logging.getLogger(__name__)

#: Worker threads for reads that miss the page cache (RWF_NOWAIT said EAGAIN).
IO_THREADS = 4
MAX_LUN = 16383


class LunError(Exception):
    """A LUN cannot be added, removed or resized; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class LunSpec:
    """One LUN as configured: image path and presentation options."""

    lun: int
    path: str
    read_only: bool = False
    solid_state: bool = False
    block_size: int = 512
    write_cache: bool = True


def _serial(path: str) -> str:
    """A stable unit serial from the image's real path, so two daemons never share a WWN."""
    return hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:20]


class LunTable:
    """The LUNs of target 0 and their block devices; `target` is what the device executes on."""

    def __init__(self, *, io_threads: int = IO_THREADS) -> None:
        self.target = EmulatedTarget()
        self._pool = IoWorkerPool(io_threads, name="vhost-scsi-io")
        self._specs: dict[int, LunSpec] = {}
        self._devices: dict[int, BlockDevice] = {}

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, lun: object) -> bool:
        return lun in self._specs

    def add(self, spec: LunSpec) -> None:
        """Open `spec.path` and attach it at `spec.lun`."""
        if not 0 <= spec.lun <= MAX_LUN:
            raise LunError(f"LUN {spec.lun} is outside 0..{MAX_LUN}")
        if spec.lun in self._specs:
            raise LunError(f"LUN {spec.lun} is already attached ({self._specs[spec.lun].path})")
        try:
            backend = FileBackend(spec.path, read_only=spec.read_only)
        except OSError as exc:
            raise LunError(f"cannot open image {spec.path}: {exc.strerror or exc}") from None
        try:
            if backend.size < spec.block_size:
                raise LunError(
                    f"image {spec.path} is {backend.size} bytes, less than one "
                    f"{spec.block_size}-byte block"
                )
            if backend.size % spec.block_size:
                logger.warning(
                    "image %s: the last %d bytes (not a whole block) are not accessible",
                    spec.path,
                    backend.size % spec.block_size,
                )
            try:
                options = BlockDeviceOptions(
                    read_only=spec.read_only,
                    solid_state=spec.solid_state,
                    block_size=spec.block_size,
                    write_cache=spec.write_cache,
                    identity=DeviceIdentity(serial=_serial(spec.path)),
                )
            except ValueError as exc:
                raise LunError(str(exc)) from None
            device = BlockDevice(backend, options, io_pool=self._pool)
            self.target.attach(spec.lun, device)
        except BaseException:
            backend.close()
            raise
        self._specs[spec.lun] = spec
        self._devices[spec.lun] = device

    def remove(self, lun: int) -> None:
        """Detach LUN `lun` and close its image."""
        if lun not in self._specs:
            raise LunError(f"no LUN {lun}")
        device = self.target.detach(lun)
        del self._specs[lun]
        self._devices.pop(lun, None)
        device.close()

    def resize(self, lun: int) -> tuple[int, int]:
        """Re-read LUN `lun`'s image size (the device raises the unit attention); (old, new)."""
        device = self._devices.get(lun)
        if device is None:
            raise LunError(f"no LUN {lun}")
        old = device.backend.size
        device.resize()
        return old, device.backend.size

    def describe(self) -> str:
        """`LUN:PATH[:ro]` for every LUN, space separated."""
        return " ".join(
            f"{n}:{s.path}{':ro' if s.read_only else ''}" for n, s in sorted(self._specs.items())
        )

    def close(self) -> None:
        """Close every image and stop the worker threads."""
        for device in self._devices.values():
            try:
                device.close()
            except OSError as exc:
                logger.warning("closing LUN image: %s", exc)
        self._devices.clear()
        self._specs.clear()
        self._pool.close(wait=False)
