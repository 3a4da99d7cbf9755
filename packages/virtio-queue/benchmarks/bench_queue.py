"""Benchmark: chains/s for SplitQueue.pop() + add_used() of 1-, 3- and 34-descriptor chains.

Run as ``python packages/virtio-queue/benchmarks/bench_queue.py`` (``nox -s bench``). The
driver lays the chains out once and fills the whole avail ring; each round only republishes
the avail idx, so what is timed is the device side alone: pop + add_used per chain and one
needs_notification() per ring-full batch, as a device loop would do.
"""

from __future__ import annotations

import argparse
import time

from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout, Segment

QUEUE_SIZE = 256
RAM = 4 << 20
DATA_BASE = 0x10000
TABLE_BASE = 0x200000
PAGE = 4096


def _segments(count: int, chain: int) -> list[Segment]:
    """A request-shaped chain: one readable header, then writable data pages."""
    base = DATA_BASE + chain * count * PAGE
    segments: list[Segment] = [(base, 51, False)]
    segments += [(base + PAGE * (i + 1), PAGE, True) for i in range(count - 1)]
    return segments


def bench(count: int, indirect: bool, rounds: int) -> float:
    """Return chains per second for chains of ``count`` descriptors."""
    memory = GuestMemory([MemoryRegion.anonymous(0, RAM)])
    driver = DriverQueue(memory, QueueLayout.at(0x1000, QUEUE_SIZE), start_index=65000)
    device = driver.device_queue()
    distinct = min(QUEUE_SIZE // (1 if indirect else count), 16)
    heads = [
        driver.add_chain(
            _segments(count, c), indirect_table=TABLE_BASE + c * 1024 if indirect else None
        )
        for c in range(distinct)
    ]
    for slot in range(distinct, QUEUE_SIZE):
        driver.push_avail(heads[slot % distinct])
    avail = driver.start_index
    pop = device.pop
    add_used = device.add_used
    best = float("inf")
    for _ in range(rounds):
        avail = (avail + QUEUE_SIZE) & 0xFFFF
        driver.set_avail_idx(avail)
        start = time.perf_counter()
        while (chain := pop()) is not None:
            add_used(chain.head, chain.writable_len)
        device.needs_notification()
        best = min(best, time.perf_counter() - start)
    memory.close()
    return QUEUE_SIZE / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=400, help="ring-fulls per case")
    args = parser.parse_args()
    print(f"virtio-queue: pop + add_used, queue size {QUEUE_SIZE}, best of {args.rounds} rounds")
    for indirect in (False, True):
        for count in (1, 3, 34):
            rate = bench(count, indirect, args.rounds)
            kind = "indirect" if indirect else "direct"
            print(
                f"  {count:2d} descriptors, {kind:8s}: {rate:12,.0f} chains/s "
                f"({1e6 / rate:6.2f} us/chain)"
            )


if __name__ == "__main__":
    main()
