"""A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs.

Holds only the archive format (Documentation/driver-api/early-userspace/buffer-format.rst in
the kernel tree): directories, regular files, symlinks and device nodes, written without root
privileges. Knows nothing about kernels, busybox or QEMU.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["NewcWriter"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
# Several archives may be concatenated (the kernel unpacks them in order); ending each on a
# 512-byte boundary keeps the next one aligned however it was produced.
_ARCHIVE_ALIGN = 512


class NewcWriter:
    """Streams entries into a newc archive; call :meth:`close` to write the trailer.

    Every entry is owned by root; parent directories must be added before their children.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._offset = 0
        self._closed = False

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._entry(path, stat.S_IFDIR | mode, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file holding ``data``."""
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path`` -> ``target``."""
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. /dev/console, which init needs before devtmpfs)."""
        self._entry(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer and pad the archive; the output stream stays open."""
        if self._closed:
            return
        self._entry(_TRAILER, 0, b"", count_ino=False)
        pad = -self._offset % _ARCHIVE_ALIGN
        self._write(b"\0" * pad)
        self._closed = True

    def _entry(
        self,
        path: str,
        mode: int,
        data: bytes,
        *,
        rdev: tuple[int, int] = (0, 0),
        count_ino: bool = True,
    ) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        name = path.lstrip("/").encode() + b"\0"
        ino = self._ino if count_ino else 0
        self._ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed, so identical inputs give identical archives
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(name),
            0,  # check (only for the "070702" crc variant)
        )
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        self._write(header + name)
        self._write(b"\0" * (-self._offset % 4))
        self._write(data)
        self._write(b"\0" * (-self._offset % 4))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)
