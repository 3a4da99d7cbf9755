"""A Linux block device (``/dev/...``) as a storage back-end, described by the kernel.

Holds `BlockDeviceBackend`: a `FileBackend` on a block device node whose size, logical and
physical block sizes and read-only state come from the kernel's ioctls (``BLKGETSIZE64``,
``BLKSSZGET``, ``BLKPBSZGET``, ``BLKROGET``), whose discard capability comes from sysfs, and
which zeroes and deallocates through ``fallocate(2)`` on the device (the kernel turns it into
REQ_OP_WRITE_ZEROES, with unmap for PUNCH_HOLE; see block/fops.c ``blkdev_fallocate``).
Knows nothing about SCSI.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

from scsi_emulation.backend import BackendError, FileBackend

__all__ = ["BlockDeviceBackend", "is_block_device"]

logger = logging.getLogger(__name__)

# include/uapi/linux/fs.h: _IO(0x12, n), and _IOR(0x12, 114, size_t) for BLKGETSIZE64.
BLKROGET = 0x125E
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")
_RANGE = struct.Struct("=QQ")  # uint64_t range[2]: start, length (BLKZEROOUT)

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


def is_block_device(path: str) -> bool:
    """Whether ``path`` names a block device node (following symlinks)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _ioctl_int(fd: int, request: int, layout: struct.Struct) -> int:
    value: int = layout.unpack(fcntl.ioctl(fd, request, bytes(layout.size)))[0]
    return value


def _queue_limit(fd: int, name: str) -> int:
    """A value from /sys/dev/block/MAJ:MIN/queue (a partition's queue is its disk's); 0 if
    unknown."""
    rdev = os.fstat(fd).st_rdev
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/{name}") as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
    return 0


class BlockDeviceBackend(FileBackend):
    """A block device node. ``read_only`` is forced when the kernel says the device is
    read-only (``BLKROGET``); ``direct`` opens it with ``O_DIRECT``.

    `discard` deallocates and guarantees zeros (fallocate PUNCH_HOLE, i.e. write-zeroes with
    unmap, no fallback) where the device can; elsewhere it writes zeros, so the contract
    "reads as zeros afterwards" holds either way. Plain ``BLKDISCARD`` is not used for it:
    the kernel does not promise zeros after a discard.
    """

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        if not is_block_device(path):
            raise BackendError(errno.ENOTBLK, f"{path} is not a block device")
        if not read_only:
            read_only = self._device_read_only(path)
        super().__init__(path, read_only=read_only, direct=direct)
        fd = self.fd
        try:
            self._logical = _ioctl_int(fd, BLKSSZGET, _INT)
            self._physical = _ioctl_int(fd, BLKPBSZGET, _INT) or self._logical
        except OSError as e:
            self.close()
            raise BackendError(e.errno, f"{path}: block size ioctl: {e.strerror}") from e
        self._discard_granularity = _queue_limit(fd, "discard_granularity")
        # Deallocation needs discard; zeroing with unmap is REQ_OP_WRITE_ZEROES.
        self._can_deallocate = (
            _queue_limit(fd, "discard_max_bytes") > 0
            and _queue_limit(fd, "write_zeroes_max_bytes") > 0
        )

    @staticmethod
    def _device_read_only(path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # let the real open report the error
        try:
            return _ioctl_int(fd, BLKROGET, _INT) != 0
        except OSError:
            return False
        finally:
            os.close(fd)

    def _query_size(self) -> int:
        try:
            return _ioctl_int(self.fd, BLKGETSIZE64, _U64)
        except OSError:
            return super()._query_size()

    @property
    def logical_block_size(self) -> int:
        return self._logical

    @property
    def physical_block_size(self) -> int:
        return self._physical

    @property
    def allocation_granularity(self) -> int:
        return max(self._discard_granularity, self._physical)

    @property
    def supports_discard(self) -> bool:
        return self._can_deallocate

    def discard(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        if end <= offset:
            return
        if self._can_deallocate and self._fallocate_range(
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, end - offset
        ):
            return
        if self._can_deallocate:
            logger.info("%s: cannot deallocate with zeroes; discarding by zeroing", self._path)
            self._can_deallocate = False
        self.write_zeroes(offset, end - offset)

    def write_zeroes(self, offset: int, length: int, may_discard: bool = False) -> None:
        end = min(offset + length, self.size)
        if end <= offset:
            return
        if may_discard and self._can_deallocate:
            self.discard(offset, end - offset)
            return
        if self.read_only:
            raise BackendError(errno.EROFS, f"{self._path} is read-only")
        # ZERO_RANGE: write-zeroes without unmap, with the kernel's own fallback to writing
        # zero pages; BLKZEROOUT does the same on kernels whose fallocate lacks it.
        mode = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        if self._fallocate_range(mode, offset, end - offset):
            return
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, _RANGE.pack(offset, end - offset))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise BackendError(e.errno, f"zero out at {offset}: {e.strerror}") from e
            self._write_zero_bytes(offset, end - offset)

    def allocation(self, offset: int) -> tuple[bool, int]:
        size = self.size
        if offset >= size:
            return False, 0
        return True, size - offset
