"""Guest memory: regions, translation, memfd mappings."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_queue import GuestMemory, GuestMemoryError, MemoryRegion

PAGE = mmap.PAGESIZE


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 16 * PAGE)
    yield fd
    with contextlib.suppress(OSError):  # some tests close it themselves
        os.close(fd)


def two_regions() -> GuestMemory:
    return GuestMemory(
        [
            MemoryRegion.anonymous(0x1000, 0x1000, user_addr=0x7F00_0000_0000),
            MemoryRegion.anonymous(0x10000, 0x4000, user_addr=0x7F00_0010_0000),
        ]
    )


def test_slice_reads_and_writes_the_region() -> None:
    mem = two_regions()
    view = mem.slice(0x10010, 4)
    view[:] = b"abcd"
    assert bytes(mem.regions[1].view[0x10:0x14]) == b"abcd"
    assert bytes(mem.slice(0x1000, 2)) == b"\0\0"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x0, 1),  # below every region
        (0x1FFF, 2),  # crosses the end of region 0
        (0x2000, 1),  # in the hole
        (0xFFFF, 2),  # starts in the hole, ends in region 1
        (0x13FFF, 2),  # crosses the end of region 1
        (0x15000, 0),  # empty range outside every region
        (1 << 70, 1),  # far outside
        (0x10000, -1),  # negative length
    ],
)
def test_slice_outside_is_a_typed_error(gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions().slice(gpa, length)


def test_slice_switches_between_regions() -> None:
    mem = two_regions()
    mem.slice(0x10000, 1)[0] = 1
    mem.slice(0x1000, 1)[0] = 2
    assert mem.slice(0x10000, 1)[0] == 1
    assert mem.slice(0x1FFF, 1)[0] == 0
    assert len(mem.slice(0x13FFF, 1)) == 1
    assert len(mem.slice(0x14000, 0)) == 0  # an empty range at a region's end, either path
    mem.slice(0x1000, 1)
    assert len(mem.slice(0x14000, 0)) == 0


@given(st.integers(0, 0x20000), st.integers(0, 0x5000))
def test_slice_succeeds_iff_inside_one_region(gpa: int, length: int) -> None:
    mem = two_regions()
    inside = any(r.guest_phys_addr <= gpa and gpa + length <= r.end for r in mem.regions)
    try:
        view = mem.slice(gpa, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(view) == length


def test_user_to_guest() -> None:
    mem = two_regions()
    assert mem.user_to_guest(0x7F00_0000_0010) == 0x1010
    assert mem.user_to_guest(0x7F00_0010_3FFF) == 0x13FFF
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x7F00_0000_1000)


def test_overlapping_regions_rejected() -> None:
    mem = two_regions()
    for gpa, size in [(0x1800, 0x1000), (0x0, 0x1001), (0xF000, 0x2000), (0x13000, 0x10)]:
        with pytest.raises(GuestMemoryError):
            mem.add_region(MemoryRegion.anonymous(gpa, size))
    mem.add_region(MemoryRegion.anonymous(0x2000, 0x1000))  # touching is fine
    assert [r.guest_phys_addr for r in mem.regions] == [0x1000, 0x2000, 0x10000]


def test_remove_region() -> None:
    mem = two_regions()
    mem.slice(0x10000, 1)  # make region 1 the hot one
    region = mem.remove_region(0x10000)
    assert region.guest_phys_addr == 0x10000
    with pytest.raises(GuestMemoryError):
        mem.slice(0x10000, 1)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(0x10000)
    assert len(mem.slice(0x1000, 16)) == 16
    mem.remove_region(0x1000)
    assert mem.regions == ()
    with pytest.raises(GuestMemoryError):
        mem.slice(0x1000, 1)
    region.close()


def test_from_fd_shares_memory_and_outlives_the_fd(memfd: int) -> None:
    # What vhost-user does: map the fd received over SCM_RIGHTS, then close it at once.
    front_end = mmap.mmap(memfd, 16 * PAGE)  # the front-end's own mapping of guest RAM
    passed = os.dup(memfd)
    region = MemoryRegion.from_fd(passed, 0x40000, 4 * PAGE, 0x7F12_0000_0000, 2 * PAGE)
    os.close(passed)
    mem = GuestMemory([region])
    mem.slice(0x40000 + 5, 3)[:] = b"xyz"
    assert front_end[2 * PAGE + 5 : 2 * PAGE + 8] == b"xyz"
    front_end[2 * PAGE + 4 * PAGE - 1] = 0x5A
    assert mem.slice(0x40000 + 4 * PAGE - 1, 1)[0] == 0x5A
    assert region.mmap_offset == 2 * PAGE and region.user_addr == 0x7F12_0000_0000
    mem.close()
    front_end.close()


def test_from_fd_at_unaligned_offset(memfd: int) -> None:
    os.pwrite(memfd, b"hello", PAGE + 100)
    region = MemoryRegion.from_fd(memfd, 0x0, 0x200, 0, PAGE + 100)
    assert bytes(region.view[:5]) == b"hello"
    region.view[5:7] = b"!!"
    assert os.pread(memfd, 7, PAGE + 100) == b"hello!!"
    assert region.size == 0x200
    region.close()


def test_from_fd_writes_are_visible_through_the_fd(memfd: int) -> None:
    region = MemoryRegion.from_fd(memfd, 0x1000, 2 * PAGE, 0, PAGE)
    region.view[10:14] = b"ring"
    assert os.pread(memfd, 4, PAGE + 10) == b"ring"
    os.pwrite(memfd, b"back", PAGE + 100)
    assert bytes(region.view[100:104]) == b"back"
    region.close()


def test_from_fd_bad_fd_is_a_typed_error() -> None:
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(-1, 0, PAGE, 0, 0)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(0, 0, 0, 0, 0)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(999_999, 0, PAGE, 0, 0)


def test_close_with_views_in_flight_does_not_crash(memfd: int) -> None:
    region = MemoryRegion.from_fd(memfd, 0, PAGE, 0, 0)
    mem = GuestMemory([region])
    view = mem.slice(0, 16)  # e.g. a chain still being processed
    mem.close()
    view[:4] = b"late"  # still mapped: no crash, the write lands in the memfd
    assert os.pread(memfd, 4, 0) == b"late"
    view.release()
    assert mem.regions == ()


def test_from_fd_region_beyond_the_end_of_the_file_is_refused(memfd: int) -> None:
    """Mapping past EOF would SIGBUS on first touch: refuse it up front."""
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(memfd, 0, 17 * PAGE, 0, 0)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(memfd, 0, 2 * PAGE, 0, 15 * PAGE)
