"""The LUN table: storage opened as emulated SCSI block devices of one target.

Holds `LunSpec` (what the operator asked for one LUN) and `LunTable`, which opens the storage
(an image file, a block device, an NBD export or an RBD image: any location
`scsi_emulation.backends.uri` parses), wraps it in a `BlockDevice` and places it in the
`EmulatedTarget`; and removes, resizes and lists LUNs for the control socket. Errors are
`LunError` with a message fit for the operator. A remote back-end is handed to the optional
`BackendWatcher` (the daemon's `polling.BackendPoller`) so that its completions arrive on the
daemon's own thread. Knows nothing about virtio or vhost-user.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from scsi_emulation.backend import StorageBackend
from scsi_emulation.backends.uri import FileLocation, LocationError, open_backend, parse_location
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.identity import DeviceIdentity
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.target import EmulatedTarget

__all__ = ["IO_THREADS", "BackendWatcher", "LunError", "LunSpec", "LunTable"]

logger = logging.getLogger(__name__)

#: Worker threads for reads that miss the page cache (RWF_NOWAIT said EAGAIN).
IO_THREADS = 4
MAX_LUN = 16383


class LunError(Exception):
    """A LUN cannot be added, removed or resized; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class LunSpec:
    """One LUN as configured: storage location (path or URI) and presentation options."""

    lun: int
    path: str
    read_only: bool = False
    solid_state: bool = False
    block_size: int = 512
    write_cache: bool = True


def _serial(path: str) -> str:
    """A stable unit serial from the image's real path (or the URI of remote storage), so two
    daemons never share a WWN."""
    try:
        location = parse_location(path)
    except LocationError:
        location = FileLocation(path)
    key = os.path.realpath(location.path) if isinstance(location, FileLocation) else str(location)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


class BackendWatcher(Protocol):
    """Who polls remote back-ends (`polling.BackendPoller`)."""

    def watch(self, backend: StorageBackend) -> bool: ...

    def unwatch(self, backend: StorageBackend) -> None: ...


class LunTable:
    """The LUNs of target 0 and their block devices; `target` is what the device executes on.

    With a ``watcher``, every back-end opened is offered to it (before any I/O), and taken
    back before it is closed."""

    def __init__(
        self, *, io_threads: int = IO_THREADS, watcher: BackendWatcher | None = None
    ) -> None:
        self.target = EmulatedTarget()
        self._watcher = watcher
        self._pool = IoWorkerPool(io_threads, name="vhost-scsi-io")
        self._specs: dict[int, LunSpec] = {}
        self._devices: dict[int, BlockDevice] = {}

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def io_busy(self) -> int:
        """Back-end jobs queued or running on the I/O worker threads."""
        return self._pool.busy

    def __contains__(self, lun: object) -> bool:
        return lun in self._specs

    def add(self, spec: LunSpec) -> None:
        """Open `spec.path` and attach it at `spec.lun`."""
        if not 0 <= spec.lun <= MAX_LUN:
            raise LunError(f"LUN {spec.lun} is outside 0..{MAX_LUN}")
        if spec.lun in self._specs:
            raise LunError(f"LUN {spec.lun} is already attached ({self._specs[spec.lun].path})")
        try:
            backend = open_backend(
                spec.path, read_only=spec.read_only, write_cache=spec.write_cache
            )
        except LocationError as exc:
            raise LunError(f"bad storage location {exc}") from None
        except OSError as exc:
            raise LunError(exc.strerror or f"cannot open {spec.path}: {exc}") from None
        try:
            if spec.block_size % backend.logical_block_size:
                raise LunError(
                    f"{spec.path} has {backend.logical_block_size}-byte logical blocks: "
                    f"use --block-size {max(backend.logical_block_size, 512)}"
                )
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
            # The SCSI answers follow the back-end: no UNMAP / LBPME where it cannot
            # deallocate, and its physical block (when it is a multiple of the logical one).
            pbs = backend.physical_block_size
            physical = pbs if pbs >= spec.block_size and not pbs & (pbs - 1) else None
            try:
                options = BlockDeviceOptions(
                    physical_block_size=physical,
                    thin_provisioning=backend.supports_discard,
                    read_only=spec.read_only,
                    solid_state=spec.solid_state,
                    block_size=spec.block_size,
                    write_cache=spec.write_cache,
                    identity=DeviceIdentity(serial=_serial(spec.path)),
                )
            except ValueError as exc:
                raise LunError(str(exc)) from None
            device = BlockDevice(backend, options, io_pool=self._pool)
            if self._watcher is not None:
                self._watcher.watch(backend)
            self.target.attach(spec.lun, device)
        except BaseException:
            self._unwatch(backend)
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
        if isinstance(device, BlockDevice):
            self._unwatch(device.backend)
        device.close()

    def _unwatch(self, backend: StorageBackend) -> None:
        if self._watcher is not None:
            self._watcher.unwatch(backend)

    def resize(self, lun: int) -> tuple[int, int]:
        """Re-read LUN `lun`'s image size (the device raises the unit attention); (old, new)."""
        device = self._devices.get(lun)
        if device is None:
            raise LunError(f"no LUN {lun}")
        old = device.backend.size
        device.resize()
        return old, device.backend.size

    def resized_outside(self) -> list[int]:
        """The LUNs whose storage reported a resize of its own (`take_size_change`): each
        is reported once per change; `resize` then makes it visible."""
        return [
            lun
            for lun, device in self._devices.items()
            if device.backend.take_size_change() is not None
        ]

    def describe(self) -> str:
        """`LUN:PATH[:ro]` for every LUN, space separated."""
        return " ".join(
            f"{n}:{s.path}{':ro' if s.read_only else ''}" for n, s in sorted(self._specs.items())
        )

    def close(self) -> None:
        """Close every image and stop the worker threads."""
        for device in self._devices.values():
            self._unwatch(device.backend)
            try:
                device.close()
            except OSError as exc:
                logger.warning("closing LUN image: %s", exc)
        self._devices.clear()
        self._specs.clear()
        self._pool.close(wait=False)
