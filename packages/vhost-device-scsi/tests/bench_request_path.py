"""CPU per 4 KiB READ(10)/WRITE(10) through the whole request path, without a front-end.

Not a test (pytest does not collect it): run ``python3 packages/vhost-device-scsi/tests/
bench_request_path.py [--write] [--profile]``. A `DriverQueue` in anonymous memory keeps 32
commands shaped like vu-bench's (header, response, data: three direct descriptors) on one
request queue; each round `RequestQueues.process` drains them into an `EmulatedTarget` over a
`FileBackend` image, and the driver side makes the same chains available again. It prints the
process CPU time per command next to a straight-line loop doing the least the job needs (pop,
unpack header and CDB, preadv/pwritev, pack the response, add_used), so the difference is what
the layers cost. Thread CPU time, not wall time: other processes on the machine matter less.

``--polled`` serves the same commands through the asynchronous path a remote back-end takes
(submit, complete later): a file back-end that is `asynchronous` and polled does the I/O when
submitted and runs the completions in `service()`, as NBD and RBD do when their replies arrive;
each round is then process + service + finish_all under the poller's deferral. ``--depth 1``
is queue depth 1, where every per-batch cost is paid per command.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from scsi_core.target import Response
from scsi_emulation import BlockDevice, EmulatedTarget, FileBackend
from scsi_emulation.backend import Buffers, Done
from vhost_device_scsi import completions
from vhost_device_scsi.completions import CompletionChannel
from vhost_device_scsi.requestq import PendingCommand, RequestQueues
from vhost_device_scsi.virtio_scsi import CMD_REQ_HEADER, CMD_RESP_HEADER
from vhost_user.vring import Vring
from virtio_queue import DriverQueue, GuestMemory, MemoryRegion, QueueLayout
from virtio_queue.layout import LE16, RING_HEADER_SIZE

QUEUE_SIZE = 256
DEPTH = 32
BLOCK = 4096
IMAGE_MB = 64
HEADERS, RESPONSES, DATA = 1 << 20, 2 << 20, 4 << 20


class PolledFile(FileBackend):
    """A file back-end on the asynchronous, polled path: the I/O is done at submission and its
    completion runs in `service`, on the caller's thread (what NBD and RBD do on a reply)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._done: list[Done] = []

    @property
    def asynchronous(self) -> bool:
        return True

    def start_polling(self) -> bool:
        return True

    def submit_read(self, offset: int, buffers: Buffers, length: int, done: Done) -> None:
        os.preadv(self.fd, buffers, offset)
        self._done.append(done)

    def submit_write(
        self, offset: int, buffers: Buffers, length: int, durable: bool, done: Done
    ) -> None:
        os.pwritev(self.fd, buffers, offset)
        self._done.append(done)

    def service(self) -> None:
        done, self._done = self._done, []
        for callback in done:
            callback(None)


class Bench:
    """One request queue with ``depth`` commands that are made available again each round."""

    def __init__(
        self, image: str, write: bool, *, polled: bool = False, depth: int = DEPTH
    ) -> None:
        self.memory = GuestMemory([MemoryRegion.anonymous(0, 16 << 20)])
        self.layout = QueueLayout.at(0, QUEUE_SIZE)
        self.driver = DriverQueue(self.memory, self.layout)
        self.queue = self.driver.device_queue(indirect=False)
        self.write = write
        self.depth = depth
        self.heads: list[int] = []
        for slot in range(depth):
            hdr = (HEADERS + 64 * slot, CMD_REQ_HEADER.size + 32, False)
            resp = (RESPONSES + 128 * slot, CMD_RESP_HEADER.size + 96, True)
            data = (DATA + BLOCK * slot, BLOCK, not write)
            segments = [hdr, data, resp] if write else [hdr, resp, data]
            self.heads.append(self.driver.add_chain(segments))
            self._fill(slot)
        self.driver.publish()
        self.avail = self.memory.slice(self.layout.avail_addr, 4 + 2 * QUEUE_SIZE)
        self.backend = PolledFile(image) if polled else FileBackend(image)
        if polled:
            self.backend.start_polling()
        self.target = EmulatedTarget({0: BlockDevice(self.backend)})
        channel: CompletionChannel[PendingCommand, Response] = CompletionChannel()
        self.requests = RequestQueues(self.target, channel)
        self.vring = Vring(2, self.queue)
        self.requests.start(self.vring)
        self.requests.process(self.vring)  # the power-on unit attention
        self.refill()

    def polled_round(self) -> Callable[[], None]:
        """One wake-up of the daemon on a polled back-end: drain the ring, then the back-end's
        completions (run inside the deferral, as `polling.BackendPoller` does), finished on
        the ring."""
        process = self.requests.process
        vring = self.vring
        service = self.backend.service
        finish_all = self.requests.finish_all
        deferral = completions.deferral
        ident = threading.get_ident()

        def run() -> None:
            process(vring)
            deferral.thread = ident
            try:
                service()
            finally:
                deferral.thread = 0
            finish_all()

        return run

    def _fill(self, slot: int) -> None:
        rng = random.Random(slot)
        lba = rng.randrange((IMAGE_MB << 20) // BLOCK) * (BLOCK // 512)
        cdb = struct.pack(">BBIBHB", 0x2A if self.write else 0x28, 0, lba, 0, BLOCK // 512, 0)
        header = CMD_REQ_HEADER.pack(b"\x01\x00\x40\x00" + bytes(4), slot, 0, 0, 0)
        self.memory.slice(HEADERS + 64 * slot, 64)[:51] = header + cdb.ljust(32, b"\0")

    def refill(self) -> None:
        """The driver side: the same chains made available again (as vu-bench does)."""
        idx = self.driver.avail_idx
        for head in self.heads:
            LE16.pack_into(self.avail, RING_HEADER_SIZE + 2 * (idx % QUEUE_SIZE), head)
            idx = (idx + 1) & 0xFFFF
        self.driver.avail_idx = idx
        self.driver.publish()

    def straight_line(self) -> Callable[[], None]:
        """The least a back-end must do per command, with no layers (the floor)."""
        queue = self.queue
        fd = self.backend.fd
        unpack_req = struct.Struct(CMD_REQ_HEADER.format + "32s").unpack_from
        unpack_cdb = struct.Struct(">xBIxH").unpack_from
        pack_resp = CMD_RESP_HEADER.pack_into
        write = self.write

        def run() -> None:
            while (chain := queue.pop()) is not None:
                _lun, _tag, _attr, _prio, _crn, cdb = unpack_req(chain.readable[0])
                _flags, lba, _n = unpack_cdb(cdb)
                if write:
                    os.pwritev(fd, chain.readable[1:], lba << 9)
                    resp = chain.writable[0]
                else:
                    os.preadv(fd, chain.writable[1:], lba << 9)
                    resp = chain.writable[0]
                pack_resp(resp, 0, 0, 0, 0, 0, 0)
                queue.add_used(chain.head, 108 if write else 108 + BLOCK)
            queue.needs_notification()

        return run

    def measure(self, drain: Callable[[], None], rounds: int) -> float:
        """Best of five: thread CPU nanoseconds per command."""
        clock = time.thread_time_ns
        best = None
        for _ in range(5):
            total = 0
            for _ in range(rounds):
                start = clock()
                drain()
                total += clock() - start
                self.refill()
            best = total if best is None else min(best, total)
        assert best is not None
        return best / (rounds * self.depth)

    def close(self) -> None:
        self.target.close()
        self.memory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile the request path")
    parser.add_argument(
        "--polled", action="store_true", help="the asynchronous path of a polled back-end"
    )
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"commands per round ({DEPTH})")
    opts = parser.parse_args()
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, image = tempfile.mkstemp(dir=directory)
    try:
        chunk = bytes(range(256)) * 4096
        for i in range(IMAGE_MB):
            os.pwrite(fd, chunk, i << 20)
        os.close(fd)
        bench = Bench(image, opts.write, polled=opts.polled, depth=opts.depth)
        try:
            process = bench.requests.process
            vring = bench.vring

            def plain() -> None:
                process(vring)

            layered = bench.polled_round() if opts.polled else plain

            floor = bench.straight_line()
            kind = "WRITE(10)" if opts.write else "READ(10)"
            kind += f" depth {opts.depth}" + (" polled" if opts.polled else "")
            for _ in range(3):
                ours = bench.measure(layered, opts.rounds)
                least = bench.measure(floor, opts.rounds)
                print(
                    f"{kind} 4 KiB: request path {ours:6.0f} ns/command, "
                    f"straight line {least:6.0f} ns, layers add {ours - least:5.0f} ns"
                )
            if opts.profile:
                profiler = cProfile.Profile()
                profiler.runcall(bench.measure, layered, opts.rounds // 5)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        finally:
            bench.close()
    finally:
        os.unlink(image)


if __name__ == "__main__":
    main()
