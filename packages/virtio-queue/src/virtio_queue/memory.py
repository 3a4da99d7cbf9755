"""Guest memory: regions of mapped memory addressed by guest physical address (GPA).

A MemoryRegion is one contiguous piece of guest RAM (typically an mmap of a memfd received over
a unix socket) together with the front-end's virtual address for it, so vhost-user ring
addresses can be translated. GuestMemory is the set of regions and turns a GPA range into a
memoryview without copying. This module knows nothing about virtqueues or transports.
"""

from __future__ import annotations

import bisect
import logging
import mmap
from collections.abc import Iterable

from .errors import GuestMemoryError

__all__ = ["GuestMemory", "MemoryRegion"]

log = logging.getLogger(__name__)

_U64_LIMIT = 1 << 64
# Start of the "hot" sentinel when there are no regions: every offset from it is negative.
_NOWHERE = _U64_LIMIT + 1
_EMPTY = memoryview(b"")


class MemoryRegion:
    """One contiguous region of guest memory.

    ``view`` is a writable memoryview of exactly ``size`` bytes whose byte 0 is guest physical
    address ``guest_phys_addr`` and front-end virtual address ``user_addr``.
    """

    __slots__ = ("_mapping", "guest_phys_addr", "mmap_offset", "size", "user_addr", "view")

    def __init__(
        self,
        guest_phys_addr: int,
        view: memoryview,
        *,
        user_addr: int = 0,
        mmap_offset: int = 0,
        mapping: mmap.mmap | None = None,
    ) -> None:
        """Wrap an existing writable byte buffer. Prefer ``from_fd`` / ``anonymous``."""
        if view.readonly or view.ndim != 1 or view.itemsize != 1:
            raise ValueError("a memory region needs a writable, flat, byte-format buffer")
        size = view.nbytes
        if size <= 0:
            raise ValueError("a memory region cannot be empty")
        if guest_phys_addr < 0 or guest_phys_addr + size > _U64_LIMIT:
            raise ValueError(f"region {guest_phys_addr:#x}+{size:#x} is not in the 64-bit space")
        if user_addr < 0 or user_addr + size > _U64_LIMIT:
            raise ValueError(f"user address {user_addr:#x}+{size:#x} is not in the 64-bit space")
        self.guest_phys_addr = guest_phys_addr
        self.size = size
        self.user_addr = user_addr
        self.mmap_offset = mmap_offset
        self.view = view
        self._mapping = mapping

    @classmethod
    def from_fd(
        cls, fd: int, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` from ``mmap_offset`` shared and read-write.

        The mapping does not depend on ``fd`` staying open: the caller may close it at once.
        ``mmap_offset`` need not be page aligned (the mapping starts at the page below it).
        Raises GuestMemoryError if the fd cannot be mapped.
        """
        if fd < 0 or size <= 0 or mmap_offset < 0:
            raise GuestMemoryError(f"bad region: size {size:#x}, mmap_offset {mmap_offset:#x}")
        start = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        lead = mmap_offset - start
        try:
            mapping = mmap.mmap(
                fd,
                lead + size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(
                f"cannot map fd {fd} ({size:#x} bytes at offset {mmap_offset:#x}): {exc}"
            ) from exc
        view = memoryview(mapping)[lead : lead + size]
        try:
            return cls(
                guest_phys_addr,
                view,
                user_addr=user_addr,
                mmap_offset=mmap_offset,
                mapping=mapping,
            )
        except ValueError as exc:
            view.release()
            mapping.close()
            raise GuestMemoryError(str(exc)) from exc

    @classmethod
    def anonymous(cls, guest_phys_addr: int, size: int, *, user_addr: int = 0) -> MemoryRegion:
        """A zero-filled private anonymous mapping (for tests and tools)."""
        mapping = mmap.mmap(-1, size)
        return cls(guest_phys_addr, memoryview(mapping), user_addr=user_addr, mapping=mapping)

    @property
    def end(self) -> int:
        """First guest physical address after the region."""
        return self.guest_phys_addr + self.size

    def close(self) -> None:
        """Drop the mapping.

        If memoryviews into the region are still alive (chains in flight), unmapping now would
        be unsafe; the mapping then stays until the last of them is released and garbage
        collected, so a late access reads stale memory instead of crashing the process.
        """
        mapping, self._mapping = self._mapping, None
        self.view.release()
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError:
            log.debug(
                "region at %#x: views still exported, unmap deferred until they are released",
                self.guest_phys_addr,
            )

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(gpa={self.guest_phys_addr:#x}, size={self.size:#x}, "
            f"user_addr={self.user_addr:#x}, mmap_offset={self.mmap_offset:#x})"
        )


class GuestMemory:
    """The guest's memory: non-overlapping regions looked up by guest physical address."""

    __slots__ = ("_hot", "_regions", "_starts")

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        # The region that served the last lookup, as (start, size, view): nearly every buffer
        # of a guest lives in its one big RAM region, so this is checked first.
        self._hot: tuple[int, int, memoryview] = (_NOWHERE, 0, _EMPTY)
        for region in regions:
            self.add_region(region)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, in order of guest physical address."""
        return tuple(self._regions)

    def add_region(self, region: MemoryRegion) -> None:
        """Add a region; GuestMemoryError if it overlaps one already present."""
        i = bisect.bisect_left(self._starts, region.guest_phys_addr)
        if i > 0 and self._regions[i - 1].end > region.guest_phys_addr:
            raise GuestMemoryError(f"{region!r} overlaps {self._regions[i - 1]!r}")
        if i < len(self._regions) and region.end > self._regions[i].guest_phys_addr:
            raise GuestMemoryError(f"{region!r} overlaps {self._regions[i]!r}")
        self._regions.insert(i, region)
        self._starts.insert(i, region.guest_phys_addr)
        self._hot = (region.guest_phys_addr, region.size, region.view)

    def remove_region(self, guest_phys_addr: int) -> MemoryRegion:
        """Remove and return the region starting at ``guest_phys_addr`` (not closed)."""
        i = bisect.bisect_left(self._starts, guest_phys_addr)
        if i == len(self._starts) or self._starts[i] != guest_phys_addr:
            raise GuestMemoryError(f"no region starts at {guest_phys_addr:#x}")
        del self._starts[i]
        region = self._regions.pop(i)
        if self._regions:
            r = self._regions[0]
            self._hot = (r.guest_phys_addr, r.size, r.view)
        else:
            self._hot = (_NOWHERE, 0, _EMPTY)
        return region

    def find_region(self, gpa: int) -> MemoryRegion | None:
        """The region containing ``gpa``, or None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        return None

    def slice(self, gpa: int, length: int) -> memoryview:
        """A memoryview of ``length`` bytes at ``gpa``, without copying.

        GuestMemoryError if any byte of the range is outside guest memory or the range crosses
        from one region into another (regions are separate mappings). An empty range is
        valid anywhere inside a region or at its end.
        """
        start, size, view = self._hot
        off = gpa - start
        if off >= 0 and length >= 0 and off + length <= size:
            return view[off : off + length]
        return self._slice_slow(gpa, length)

    def _slice_slow(self, gpa: int, length: int) -> memoryview:
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        region = self.find_region(gpa)
        if region is None and length == 0:
            region = self.find_region(gpa - 1)  # an empty range may sit at a region's end
        if region is None:
            raise GuestMemoryError(f"range {gpa:#x}+{length:#x} is outside guest memory")
        off = gpa - region.guest_phys_addr
        if off + length > region.size:
            raise GuestMemoryError(
                f"range {gpa:#x}+{length:#x} crosses the end of region {region!r}"
            )
        self._hot = (region.guest_phys_addr, region.size, region.view)
        return region.view[off : off + length]

    def user_to_guest(self, user_addr: int) -> int:
        """Translate a front-end virtual address (vhost-user ring addresses) to a GPA."""
        for region in self._regions:
            off = user_addr - region.user_addr
            if 0 <= off < region.size:
                return region.guest_phys_addr + off
        raise GuestMemoryError(f"user address {user_addr:#x} is in no region")

    def close(self) -> None:
        """Remove and close every region."""
        regions, self._regions, self._starts = self._regions, [], []
        self._hot = (_NOWHERE, 0, _EMPTY)
        for region in regions:
            region.close()
