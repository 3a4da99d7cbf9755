"""SplitQueue against DriverQueue: popping, completing, index wrap-around, resuming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_queue import (
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    QueueError,
    SplitQueue,
    VirtqUsedElem,
)
from vq_guest import Guest


def test_round_trip(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    guest.fill(guest.data, b"request-header")
    head = drv.add_chain(
        [(guest.data, 14, False), (guest.data + 0x1000, 100, True), (guest.data + 0x2000, 8, True)]
    )
    assert dev.pop() is None  # added but not yet published
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    assert chain.head == head
    assert chain.readable_len == 14 and chain.writable_len == 108
    assert [len(b) for b in chain.writable] == [100, 8]
    assert chain.reader().read(100) == b"request-header"
    writer = chain.writer()
    writer.write(b"r" * 104)
    dev.add_used(chain.head, writer.written)
    assert dev.pop() is None
    assert guest.read(guest.data + 0x1000, 100) == b"r" * 100
    assert guest.read(guest.data + 0x2000, 8) == b"rrrr\0\0\0\0"
    assert drv.get_used() == [VirtqUsedElem(head, 104)]
    assert drv.num_free == 16
    assert dev.next_avail == 1 and dev.next_used == 1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_indices_wrap_from_65530(guest: Guest, batch: int) -> None:
    drv = guest.driver(start_index=65530)
    dev = drv.device_queue()
    assert dev.next_avail == 65530 and dev.next_used == 65530  # read from the used ring
    done = 0
    while done < 40:
        heads = [
            drv.add_chain(
                [(guest.data + 64 * i, 16, False), (guest.data + 0x8000 + 64 * i, 32, True)]
            )
            for i in range(batch)
        ]
        drv.publish()
        popped = []
        while (chain := dev.pop()) is not None:
            popped.append(chain.head)
            dev.add_used(chain.head, chain.writable_len)
        assert popped == heads
        assert drv.get_used() == [VirtqUsedElem(h, 32) for h in heads]
        done += batch
    assert dev.next_avail == (65530 + done) & 0xFFFF
    assert dev.next_used == dev.next_avail == drv.used_idx()
    assert dev.next_avail < 65530  # really wrapped


def test_out_of_order_completion(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    heads = [drv.add_chain([(guest.data + 16 * i, 16, True)]) for i in range(4)]
    drv.publish()
    chains = [dev.pop() for _ in range(4)]
    for chain in reversed(chains):
        assert chain is not None
        dev.add_used(chain.head, 1)
    assert [e.id for e in drv.get_used()] == list(reversed(heads))


def test_resume_at_next_avail(guest: Guest) -> None:
    """vhost-user SET_VRING_BASE: a new device queue picks up where the old one stopped."""
    drv = guest.driver(start_index=100)
    dev = drv.device_queue()
    heads = [drv.add_chain([(guest.data, 1, False)]) for _ in range(3)]
    drv.publish()
    first = dev.pop()
    assert first is not None and first.head == heads[0]
    resumed = drv.device_queue(next_avail=dev.next_avail)
    assert resumed.next_used == 100  # nothing was used yet: read from the ring
    second = resumed.pop()
    assert second is not None and second.head == heads[1]
    resumed.add_used(first.head, 0)  # an in-flight chain of the old queue completes
    resumed.add_used(second.head, 0)
    assert [e.id for e in drv.get_used()] == heads[:2]
    assert resumed.next_avail == 102


def test_read_chain_rebuilds_an_inflight_chain(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    head = drv.add_chain(
        [(guest.data, 8, False), (guest.data + 8, 8, True)], indirect_table=guest.tables
    )
    drv.publish()
    popped = dev.pop()
    assert popped is not None
    again = dev.read_chain(head)
    assert (again.readable_len, again.writable_len) == (8, 8)
    assert [bytes(b) for b in again.readable] == [bytes(b) for b in popped.readable]
    assert dev.pop() is None and dev.next_avail == 1  # read_chain leaves the ring alone


def test_indirect_and_direct_prefix(guest: Guest) -> None:
    """2.7.5.3.2: zero or more direct descriptors followed by one INDIRECT descriptor."""
    from virtio_queue import VirtqDesc
    from virtio_queue.layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    drv = guest.driver()
    dev = drv.device_queue()
    table = guest.memory.slice(guest.tables, 32)
    table[:16] = VirtqDesc(guest.data + 100, 20, VIRTQ_DESC_F_NEXT, 1).pack()
    table[16:] = VirtqDesc(guest.data + 200, 30, VIRTQ_DESC_F_WRITE, 0).pack()
    drv.write_descriptor(5, VirtqDesc(guest.data, 10, VIRTQ_DESC_F_NEXT, 6))
    # WRITE on the descriptor that points at a table must be ignored (2.7.5.3.2).
    drv.write_descriptor(
        6, VirtqDesc(guest.tables, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0)
    )
    drv.push_avail(5)
    drv.publish()
    chain = dev.pop()
    assert chain is not None
    assert [len(b) for b in chain.readable] == [10, 20]
    assert [len(b) for b in chain.writable] == [30]


def test_chain_as_long_as_the_queue_is_accepted(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    drv.add_chain([(guest.data + i, 1, False) for i in range(16)])
    drv.publish()
    chain = dev.pop()
    assert chain is not None and len(chain.readable) == 16
    drv2 = guest.driver()
    dev2 = drv2.device_queue()
    drv2.add_chain([(guest.data + i, 1, True) for i in range(16)], indirect_table=guest.tables)
    drv2.publish()
    chain = dev2.pop()
    assert chain is not None and chain.writable_len == 16


def test_chains_spanning_two_regions() -> None:
    memory = GuestMemory(
        [MemoryRegion.anonymous(0, 0xA0000), MemoryRegion.anonymous(0xC0000, 0x100000)]
    )
    from virtio_queue import DriverQueue, QueueLayout

    drv = DriverQueue(memory, QueueLayout.at(0x1000, 8))
    dev = drv.device_queue()
    drv.add_chain([(0x9FF00, 0x100, False), (0xC0000, 0x10, True), (0x50000, 4, True)])
    drv.add_chain([(0x100000, 0x100, False)])
    drv.publish()
    first, second = dev.pop(), dev.pop()
    assert first is not None and second is not None
    assert [len(b) for b in first.readable + first.writable] == [0x100, 0x10, 4]
    first.writable[0][:2] = b"hi"
    assert bytes(memory.slice(0xC0000, 2)) == b"hi"
    assert second.readable_len == 0x100
    memory.close()


@settings(max_examples=50, deadline=None)
@given(
    start=st.integers(0, 0xFFFF),
    batches=st.lists(st.integers(1, 16), min_size=1, max_size=10),
)
def test_pop_all_published_chains_in_order(start: int, batches: list[int]) -> None:
    memory = GuestMemory([MemoryRegion.anonymous(0, 1 << 16)])
    from virtio_queue import DriverQueue, QueueLayout

    drv = DriverQueue(memory, QueueLayout.at(0, 16), start_index=start)
    dev = drv.device_queue()
    for n in batches:
        heads = [drv.add_chain([(0x2000 + 8 * i, 8, True)]) for i in range(n)]
        drv.publish()
        got = []
        while (chain := dev.pop()) is not None:
            got.append(chain.head)
            dev.add_used(chain.head, 8)
        assert got == heads
        assert [e.id for e in drv.get_used()] == heads
    assert dev.next_avail == dev.next_used == (start + sum(batches)) & 0xFFFF
    memory.close()


def test_bad_queue_configuration(guest: Guest) -> None:
    lay = guest.layout
    rings = (lay.desc_addr, lay.avail_addr, lay.used_addr)
    for size in (0, 3, 65536):
        with pytest.raises(QueueError):
            SplitQueue(guest.memory, size, *rings)
    with pytest.raises(QueueError):
        SplitQueue(
            guest.memory, 16, lay.desc_addr, lay.avail_addr, lay.used_addr, next_avail=1 << 16
        )
    with pytest.raises(QueueError):
        SplitQueue(guest.memory, 16, *rings, next_used=-1)
    with pytest.raises(GuestMemoryError):
        SplitQueue(guest.memory, 16, (1 << 20) - 16, lay.avail_addr, lay.used_addr)
    with pytest.raises(GuestMemoryError):
        SplitQueue(guest.memory, 16, lay.desc_addr, lay.avail_addr, 1 << 30)


def test_next_avail_setter(guest: Guest) -> None:
    drv = guest.driver()
    dev = drv.device_queue()
    for _ in range(3):
        drv.add_chain([(guest.data, 1, False)])
    drv.publish()
    dev.next_avail = 2
    chain = dev.pop()
    assert chain is not None and chain.head == 2
    with pytest.raises(QueueError):
        dev.next_avail = 70000
