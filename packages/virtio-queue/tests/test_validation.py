"""Every rule a hostile driver could break: the chain is reported, the queue goes on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from virtio_queue import (
    DriverQueue,
    InvalidAvailIndex,
    InvalidChain,
    QueueError,
    SplitQueue,
    VirtioQueueError,
    VirtqDesc,
    VirtqUsedElem,
)
from virtio_queue.layout import (
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vq_guest import RAM_SIZE, Guest

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def write_table(guest: Guest, descs: list[VirtqDesc]) -> None:
    table = guest.memory.slice(guest.tables, 16 * len(descs))
    for i, d in enumerate(descs):
        VIRTQ_DESC.pack_into(table, 16 * i, d.addr, d.len, d.flags, d.next)


def indirect(guest: Guest, count: int, flags: int = 0) -> VirtqDesc:
    return VirtqDesc(guest.tables, 16 * count, INDIRECT | flags, 0)


# Each case writes descriptors starting at index 10 (the head) and returns the head to push.
Case = Callable[[Guest, DriverQueue], int]


def direct(*descs: VirtqDesc) -> Case:
    def build(guest: Guest, drv: DriverQueue) -> int:
        for i, d in enumerate(descs):
            drv.write_descriptor(10 + i, d)
        return 10

    return build


def via_table(head: VirtqDesc, *table: VirtqDesc) -> Case:
    def build(guest: Guest, drv: DriverQueue) -> int:
        write_table(guest, list(table))
        drv.write_descriptor(10, head)
        return 10

    return build


D = 0x10000  # a valid data address
T = 0x80000  # where the tables go (Guest.tables)

CASES: dict[str, Case] = {
    "loop of two": direct(VirtqDesc(D, 1, NEXT, 11), VirtqDesc(D, 1, NEXT, 10)),
    "self loop": direct(VirtqDesc(D, 1, NEXT, 10)),
    "loop of writable descriptors": direct(
        VirtqDesc(D, 1, NEXT | WRITE, 11), VirtqDesc(D, 1, NEXT | WRITE, 10)
    ),
    "next index beyond the table": direct(VirtqDesc(D, 1, NEXT, 16)),
    "next index far beyond": direct(VirtqDesc(D, 1, NEXT, 0xFFFF)),
    "buffer outside memory": direct(VirtqDesc(RAM_SIZE, 1, 0, 0)),
    "buffer crossing the end of memory": direct(VirtqDesc(RAM_SIZE - 4, 8, WRITE, 0)),
    "buffer at a huge address": direct(VirtqDesc((1 << 64) - 1, 0xFFFFFFFF, 0, 0)),
    "second buffer outside memory": direct(
        VirtqDesc(D, 1, NEXT, 11), VirtqDesc(1 << 40, 1, WRITE, 0)
    ),
    "readable after writable": direct(VirtqDesc(D, 1, NEXT | WRITE, 11), VirtqDesc(D, 1, 0, 0)),
    "indirect table length not a multiple of 16": via_table(
        VirtqDesc(T, 24, INDIRECT, 0), VirtqDesc(D, 1, 0, 0), VirtqDesc(D, 1, 0, 0)
    ),
    "zero-length indirect table": via_table(VirtqDesc(T, 0, INDIRECT, 0)),
    "INDIRECT together with NEXT": via_table(
        VirtqDesc(T, 16, INDIRECT | NEXT, 11), VirtqDesc(D, 1, 0, 0)
    ),
    "nested indirect": via_table(
        VirtqDesc(T, 32, INDIRECT, 0), VirtqDesc(D, 1, NEXT, 1), VirtqDesc(T, 16, INDIRECT, 0)
    ),
    "indirect table outside memory": direct(VirtqDesc(RAM_SIZE - 16, 32, INDIRECT, 0)),
    "indirect table longer than the queue": via_table(
        VirtqDesc(T, 16 * 17, INDIRECT, 0),
        *[VirtqDesc(D, 1, NEXT, i + 1) for i in range(16)],
        VirtqDesc(D, 1, 0, 0),
    ),
    "loop inside an indirect table": via_table(
        VirtqDesc(T, 32, INDIRECT, 0), VirtqDesc(D, 1, NEXT, 1), VirtqDesc(D, 1, NEXT, 0)
    ),
    "next beyond the indirect table": via_table(
        VirtqDesc(T, 32, INDIRECT, 0), VirtqDesc(D, 1, NEXT, 2), VirtqDesc(D, 1, 0, 0)
    ),
    "buffer in an indirect table outside memory": via_table(
        VirtqDesc(T, 16, INDIRECT, 0), VirtqDesc(RAM_SIZE, 1, WRITE, 0)
    ),
}


def _readable_after_writable_across_table(guest: Guest, drv: DriverQueue) -> int:
    write_table(guest, [VirtqDesc(D, 1, 0, 0)])
    drv.write_descriptor(10, VirtqDesc(D, 1, WRITE | NEXT, 11))
    drv.write_descriptor(11, VirtqDesc(T, 16, INDIRECT, 0))
    return 10


CASES["readable after writable across the table"] = _readable_after_writable_across_table


def _head_out_of_range(guest: Guest, drv: DriverQueue) -> int:
    return 16


def _head_way_out_of_range(guest: Guest, drv: DriverQueue) -> int:
    return 0xFFFF


CASES["head index = queue size"] = _head_out_of_range
CASES["head index 65535"] = _head_way_out_of_range


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_chain_is_reported_and_the_queue_goes_on(
    guest: Guest, name: str, event_idx: bool
) -> None:
    drv = guest.driver(event_idx=event_idx, start_index=65534)
    dev = drv.device_queue()
    good_before = drv.add_chain([(D, 4, False), (D + 64, 4, True)])
    bad_head = CASES[name](guest, drv)
    drv.push_avail(bad_head)
    good_after = drv.add_chain([(D + 128, 4, True)])
    drv.publish()

    first = dev.pop()
    assert first is not None and first.head == good_before
    with pytest.raises(InvalidChain) as info:
        dev.pop()
    assert info.value.head == bad_head
    assert info.value.reason
    assert isinstance(info.value, VirtioQueueError)
    dev.add_used(info.value.head, 0)  # what a device does with a bad chain: never raises
    last = dev.pop()
    assert last is not None and last.head == good_after
    dev.add_used(first.head, 4)
    dev.add_used(last.head, 4)
    assert dev.pop() is None
    used = drv.get_used()
    if bad_head < 16:
        assert used == [
            VirtqUsedElem(bad_head, 0),
            VirtqUsedElem(good_before, 4),
            VirtqUsedElem(good_after, 4),
        ]
    else:  # a head outside the queue cannot be completed; it is logged and skipped
        assert used == [VirtqUsedElem(good_before, 4), VirtqUsedElem(good_after, 4)]


def test_indirect_refused_when_not_negotiated(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue(indirect=False)
    head = drv.add_chain([(D, 4, False)], indirect_table=guest.tables)
    drv.publish()
    with pytest.raises(InvalidChain) as info:
        dev.pop()
    assert info.value.head == head
    assert "feature" in str(info.value)


def test_avail_idx_too_far_ahead_is_a_queue_error(guest: Guest) -> None:
    drv = guest.driver(start_index=65530)
    dev = drv.device_queue()
    drv.set_avail_idx(65530 + 17)
    for _ in range(2):  # nothing is consumed: the error is stable
        with pytest.raises(InvalidAvailIndex) as info:
            dev.pop()
        assert isinstance(info.value, QueueError)
        assert info.value.avail_idx == (65530 + 17) & 0xFFFF
        assert info.value.next_avail == 65530
        assert dev.next_avail == 65530
    drv.set_avail_idx(65530 + 16)  # exactly a ring-full is legal
    popped = 0
    while dev.pop() is not None:
        popped += 1
    assert popped == 16


def test_avail_idx_going_backwards_is_a_queue_error(guest: Guest) -> None:
    drv = guest.driver(start_index=10)
    dev = drv.device_queue()
    drv.set_avail_idx(9)
    with pytest.raises(InvalidAvailIndex):
        dev.pop()


def test_descriptor_table_changing_under_the_device(guest: Guest) -> None:
    """A driver rewriting a chain after publishing it can only produce a bad chain."""
    drv = guest.driver()
    dev: SplitQueue = drv.device_queue()
    head = drv.add_chain([(D, 4, False), (D + 8, 4, True)])
    drv.publish()
    drv.write_descriptor(head, VirtqDesc(D, 4, NEXT, head))
    with pytest.raises(InvalidChain):
        dev.pop()
    assert dev.pop() is None


def test_add_used_of_foreign_head_is_ignored(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    dev.add_used(16, 0)
    dev.add_used(-1, 0)
    assert dev.next_used == 0 and drv.used_idx() == 0


@pytest.mark.parametrize("extra", [0x8, 0x80, 0x8000])
@pytest.mark.parametrize("through_table", [False, True])
def test_undefined_flag_bits_are_ignored(guest: Guest, extra: int, through_table: bool) -> None:
    """Bits a split ring does not define change nothing: same buffers, same rules."""
    d = guest.data
    descs = [
        VirtqDesc(d, 8, NEXT | extra, 1 if through_table else 11),
        VirtqDesc(d + 8, 16, WRITE | NEXT | extra, 2 if through_table else 12),
        VirtqDesc(d + 24, 32, WRITE | extra, 0),
    ]
    drv = guest.driver()
    build = via_table(indirect(guest, 3), *descs) if through_table else direct(*descs)
    drv.push_avail(build(guest, drv))
    drv.publish()
    chain = drv.device_queue().pop()
    assert chain is not None
    assert [len(b) for b in chain.readable] == [8]
    assert [len(b) for b in chain.writable] == [16, 32]
    assert (chain.readable_len, chain.writable_len) == (8, 48)
    # ...and a readable buffer after a writable one is still refused.
    bad = [VirtqDesc(d, 16, WRITE | NEXT | extra, 11), VirtqDesc(d, 8, extra, 0)]
    drv2 = guest.driver(start_index=drv.avail_idx)
    drv2.push_avail(direct(*bad)(guest, drv2))
    drv2.publish()
    with pytest.raises(InvalidChain, match="readable descriptor after a writable"):
        drv2.device_queue().pop()
