"""An emulated SCSI target: SPC/SBC block devices over storage back-ends, dispatched by LUN.

Start at `EmulatedTarget` (the `scsi_core.target.Target`), `BlockDevice` (a disk LU),
`FileBackend` (a raw image) and `BlockDeviceOptions`.
"""

from scsi_emulation.backend import BackendError, FileBackend, StorageBackend
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.identity import DeviceIdentity
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.logical_unit import LogicalUnit, MissingLun, ReportLunsLogicalUnit
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.target import EmulatedTarget

__all__ = [
    "BackendError",
    "BlockDevice",
    "BlockDeviceOptions",
    "DeviceIdentity",
    "EmulatedTarget",
    "FileBackend",
    "IoWorkerPool",
    "LogicalUnit",
    "MissingLun",
    "ReportLunsLogicalUnit",
    "StorageBackend",
]
