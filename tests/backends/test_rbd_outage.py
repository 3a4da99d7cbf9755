"""Issue 8: an RBD back-end that loses its cluster fails each request within a bound, reports it,
and serves again once the cluster is back, on the same open image.

A cluster of this module's own (one mon, one memstore OSD; the shared session cluster is never
paused under other tests) whose daemons are frozen with SIGSTOP: their sockets stay open, so
librados sees silence, not a closed connection, the worst case (nothing tells it to give up).
The bound is the location's ``timeout=`` (`TIMEOUT` s here), which becomes librados'
``rados_osd_op_timeout``: the OSD request is abandoned and librbd completes the I/O with
-ETIMEDOUT (110), which is what every test asserts. Measured on this machine: 5.00 s for a
read or write (a write that first had to take the image's exclusive lock too, when it is the
only one waiting for it: see the strict xfail below for several).

- back-end level, with completions on the back-end's thread and polled, OSD or whole cluster
  frozen: a read and a write fail with ETIMEDOUT in [TIMEOUT - 1, TIMEOUT + 3] s; after
  SIGCONT the same object writes and reads back without being reopened;
- a frozen monitor alone does not stop I/O (the data path goes straight to the OSD);
- known gap (strict xfail): writes queued for the exclusive lock fail one timeout apart;
- SCSI level: READ(10) -> CHECK CONDITION, MEDIUM ERROR / UNRECOVERED READ ERROR; WRITE(10) and
  UNMAP -> MEDIUM ERROR / WRITE ERROR; a warning is logged;
- daemon level: an RBD LU and a file LU on one request queue; the file LU keeps serving while
  a command to the RBD LU waits for the frozen OSD; that one ends in CHECK CONDITION within the
  bound, and the RBD LU serves again after SIGCONT.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from scsi_core.sense import Asc, SenseKey
from scsi_emulation.backend import BackendError
from scsi_emulation.backends import librbd
from scsi_emulation.backends.rbd import RbdBackend
from scsi_emulation.io_pool import IoWorkerPool
from scsi_emulation.testing import CommandResult, poll_until, run_command

from tests.backends.queue_depth_guest import READ_10, RW10, WRITE_10, QueueDepthGuest
from tests.backends.scsi_checks import read16, scsi_disk, unmap, write16
from tests.backends.servers import CephCluster, ceph_cluster_in
from tests.e2e.daemon import RunningDaemon

pytestmark = pytest.mark.backends

MiB = 1 << 20
BLOCK = 4096
#: The location's timeout=: seconds before a request to a silent cluster fails.
TIMEOUT = 5
#: When a failure may arrive: not (much) before the timeout, and well before a second one
#: (5.00-5.01 s measured; librbd spends two when a request queues behind another for the
#: exclusive lock or an object map update, which the tests below avoid but for the xfail).
EARLIEST = TIMEOUT - 1
LATEST = TIMEOUT + 3


# -- the module's own cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A single-node cluster for this module alone: its daemons get frozen."""
    with ceph_cluster_in(tmp_path_factory.mktemp("ceph-outage")) as cluster:
        yield cluster


@pytest.fixture
def image(own_cluster: CephCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh 64 MiB image; yields its location URI with ``timeout=TIMEOUT``."""
    name = f"outage-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    conf = str(own_cluster.conf)
    with _pool(conf) as ioctx:
        librbd.create_image(ioctx, name, 64 * MiB)
    yield f"rbd:rbd/{name}?conf={conf}&timeout={TIMEOUT}"
    with _pool(conf) as ioctx:
        librbd.remove_image(ioctx, name)


@contextlib.contextmanager
def _pool(conf: str) -> Iterator[librbd.IoCtx]:
    """Pool ``rbd`` through a connection of its own."""
    with (
        librbd.Cluster(librbd.ClusterSettings(conf=conf)) as cluster,
        cluster.open_ioctx("rbd") as ioctx,
    ):
        yield ioctx


def _pid(cluster: CephCluster, daemon: str) -> int:
    """The pid of ``daemon`` (``osd.0``, ``mon.a``) of this cluster, from its own pid file:
    never a process found by name (other clusters run on this machine)."""
    return int((cluster.dir / "run" / f"{daemon}.pid").read_text().strip())


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat (T: stopped)."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def frozen(cluster: CephCluster, *daemons: str) -> Iterator[None]:
    """SIGSTOP ``daemons`` for the block; SIGCONT whatever happens."""
    pids = [_pid(cluster, d) for d in daemons]
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for pid in pids:  # SIGSTOP is asynchronous: be sure before measuring anything
            deadline = time.monotonic() + 5
            while _state(pid) != "T":
                assert time.monotonic() < deadline, f"pid {pid} did not stop"
                time.sleep(0.01)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


# -- back-end level -----------------------------------------------------------------------------


class Outcomes:
    """``done`` callbacks by name, each recording its error and when it ran."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.seen: dict[str, tuple[BackendError | None, float]] = {}
        self.lock = threading.Lock()

    def done(self, name: str) -> Callable[[BackendError | None], None]:
        def record(error: BackendError | None) -> None:
            with self.lock:
                self.seen[name] = (error, time.monotonic() - self.start)

        return record

    def wait(self, backend: RbdBackend, polled: bool, n: int, timeout: float) -> None:
        """Until ``n`` callbacks ran: the caller's poll loop when ``polled``, else a sleep."""

        def finished() -> bool:
            return len(self.seen) >= n

        if polled:
            poll_until(backend, finished, timeout)
            return
        deadline = time.monotonic() + timeout
        while not finished():
            assert time.monotonic() < deadline, f"only {self.seen} after {timeout} s"
            time.sleep(0.02)


@pytest.mark.parametrize(
    ("mode", "daemons"),
    [("threaded", ("osd.0",)), ("polled", ("osd.0",)), ("polled", ("mon.a", "osd.0"))],
    ids=["threaded-osd", "polled-osd", "polled-whole-cluster"],
)
def test_requests_fail_within_the_bound_and_the_same_backend_recovers(
    own_cluster: CephCluster, image: str, mode: str, daemons: tuple[str, ...]
) -> None:
    polled = mode == "polled"
    backend = RbdBackend.open(image)
    try:
        # The URI's timeout is what librados runs with.
        assert backend._cluster.conf_get("rados_osd_op_timeout") == str(TIMEOUT)
        assert backend._cluster.conf_get("rados_mon_op_timeout") == str(TIMEOUT)
        if polled:
            assert backend.start_polling()
        before = os.urandom(BLOCK)
        # Before the outage: this write also takes the image's exclusive lock.
        backend.write(0, [memoryview(before)], BLOCK, durable=True)
        out = bytearray(BLOCK)
        with frozen(own_cluster, *daemons):
            outcomes = Outcomes()
            backend.submit_read(0, [memoryview(out)], BLOCK, outcomes.done("read"))
            payload = os.urandom(BLOCK)
            backend.submit_write(MiB, [memoryview(payload)], BLOCK, False, outcomes.done("write"))
            outcomes.wait(backend, polled, 2, LATEST + 5)
        print(f"\n{mode}, {'+'.join(daemons)} frozen: " + ", ".join(
            f"{name} failed after {took:.2f} s" for name, (_, took) in outcomes.seen.items()
        ))  # fmt: skip
        for name, (error, took) in outcomes.seen.items():
            assert isinstance(error, BackendError), (name, error)
            assert error.errno == errno.ETIMEDOUT, (name, error)
            assert "Connection timed out" in str(error) and "rbd:rbd/outage-" in str(error)
            assert EARLIEST <= took <= LATEST, (name, took)

        # The cluster is back: the same object serves, nothing reopened.
        recovered = Outcomes()
        after = os.urandom(2 * BLOCK)
        backend.submit_write(2 * MiB, [memoryview(after)], len(after), True, recovered.done("w"))
        recovered.wait(backend, polled, 1, LATEST)
        got = bytearray(len(after))
        old = bytearray(BLOCK)
        backend.submit_read(2 * MiB, [memoryview(got)], len(got), recovered.done("r"))
        backend.submit_read(0, [memoryview(old)], BLOCK, recovered.done("old"))
        recovered.wait(backend, polled, 3, LATEST)
        assert {name: error for name, (error, _) in recovered.seen.items()} == {
            "w": None,
            "r": None,
            "old": None,
        }
        assert got == after and old == before
        print(f"recovered: {', '.join(f'{n} {t:.3f} s' for n, (_, t) in recovered.seen.items())}")
    finally:
        backend.close()


def test_a_frozen_monitor_alone_does_not_stop_io(own_cluster: CephCluster, image: str) -> None:
    """The data path goes to the OSD directly: with only the monitor silent, reads and writes
    (asynchronous and blocking) complete at the usual speed."""
    backend = RbdBackend.open(image)
    try:
        assert backend.start_polling()
        backend.write(0, [memoryview(bytes(BLOCK))], BLOCK)  # takes the exclusive lock
        data = os.urandom(BLOCK)
        with frozen(own_cluster, "mon.a"):
            outcomes = Outcomes()
            backend.submit_write(BLOCK, [memoryview(data)], BLOCK, True, outcomes.done("write"))
            outcomes.wait(backend, True, 1, 5)
            got = bytearray(BLOCK)
            backend.submit_read(BLOCK, [memoryview(got)], BLOCK, outcomes.done("read"))
            outcomes.wait(backend, True, 2, 5)
            blocking = bytearray(BLOCK)
            backend.read(BLOCK, [memoryview(blocking)], BLOCK)
            took = time.monotonic() - outcomes.start
        assert [e for e, _ in outcomes.seen.values()] == [None, None]
        assert got == data and blocking == data
        assert took < 2, took
    finally:
        backend.close()


@pytest.mark.xfail(
    strict=True,
    reason="librbd 16.2: writes queued for the exclusive lock fail one timeout apart",
)
def test_writes_queued_for_the_exclusive_lock_fail_within_the_bound(
    own_cluster: CephCluster, image: str
) -> None:
    """Known gap, librbd's: on an image this client has not written yet (it does not hold the
    exclusive lock), every write waits for the lock to be taken. When taking it times out,
    librbd (exclusive_lock/ImageDispatch.cc, handle_acquire_lock) fails only the first waiter
    and makes the others try again, one after the other: write k fails after k timeouts
    (measured: 2, 4, 6, ... s with timeout=2; a user flush waits for the lock too). Nothing the
    back-end does can shorten it safely: completing a request before librbd gives its buffers
    back would let a late write land on data written since, or a late read scribble on guest
    memory. Strict xfail: this test starts passing (and fails as XPASS) when librbd or the
    back-end bounds every request."""
    timeout = 2
    backend = RbdBackend.open(image.replace(f"timeout={TIMEOUT}", f"timeout={timeout}"))
    try:
        assert backend.start_polling()
        outcomes = Outcomes()
        with frozen(own_cluster, "osd.0"):
            outcomes.start = time.monotonic()
            for i in range(3):  # one per object: no write waits for another
                data = memoryview(os.urandom(BLOCK))
                backend.submit_write(i * 4 * MiB, [data], BLOCK, False, outcomes.done(f"w{i}"))
            outcomes.wait(backend, True, 3, 3 * timeout + 10)
        took = {name: round(t, 2) for name, (_, t) in sorted(outcomes.seen.items())}
        print(f"\nwrites queued for the lock failed after {took} s (timeout={timeout})")
        assert all(
            isinstance(e, BackendError) and e.errno == errno.ETIMEDOUT
            for e, _ in outcomes.seen.values()
        )
        assert max(took.values()) <= timeout + 1, took
    finally:
        backend.close()


# -- SCSI level ---------------------------------------------------------------------------------


def _rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return RW10.pack(opcode, 0, lba, 0, blocks, 0)


def test_scsi_commands_end_in_medium_error_within_the_bound(
    own_cluster: CephCluster, image: str, caplog: pytest.LogCaptureFixture
) -> None:
    """READ(10), WRITE(10) and UNMAP while the OSD is frozen, all at once (the first two on the
    asynchronous path, UNMAP on a worker's blocking call): each ends in CHECK CONDITION with
    the sense SBC prescribes for a medium that failed, within the bound; a warning names the
    cause. The same LU serves again afterwards."""
    caplog.set_level(logging.WARNING)
    pool = IoWorkerPool(4, name="rbd-outage")
    target = scsi_disk(RbdBackend.open(image), pool)
    blocks = 8
    # A write first takes the image's exclusive lock: with it still to take, WRITE and UNMAP
    # would queue for it and fail one timeout apart (see the test above). It also fills the
    # object all three commands go to: librbd's object map answers for an object that does
    # not exist without asking an OSD (a read gives zeros and an UNMAP succeeds even now), and
    # a write that creates one first updates the object map, one update after another (a
    # second writer fails after two timeouts).
    unmapped = 9 * 2048  # LBA of 9 MiB: an object of its own
    assert write16(target, unmapped, os.urandom(64 * 1024)).status == 0
    commands: dict[str, Callable[[], CommandResult]] = {
        "READ(10)": lambda: run_command(
            target, _rw10(READ_10, unmapped + 64, blocks), data_in=blocks * 512, timeout=LATEST + 15
        ),
        "WRITE(10)": lambda: run_command(
            target,
            _rw10(WRITE_10, unmapped + 96, blocks),
            data_out=os.urandom(blocks * 512),
            timeout=LATEST + 15,
        ),
        "UNMAP": lambda: unmap(target, unmapped, 64),
    }
    try:

        def timed(name: str) -> tuple[CommandResult, float]:
            start = time.monotonic()
            result = commands[name]()
            return result, time.monotonic() - start

        with frozen(own_cluster, "osd.0"), ThreadPoolExecutor(len(commands)) as executor:
            futures = {name: executor.submit(timed, name) for name in commands}
            results = {name: future.result() for name, future in futures.items()}
        expected = {
            "READ(10)": Asc.UNRECOVERED_READ_ERROR,
            "WRITE(10)": Asc.WRITE_ERROR,
            "UNMAP": Asc.WRITE_ERROR,
        }
        for name, (result, took) in results.items():
            print(f"\n{name}: status {result.status:#x} after {took:.2f} s", end="")
            assert result.status == 0x02, (name, result)  # CHECK CONDITION
            assert result.sense is not None, name
            assert result.sense.key == SenseKey.MEDIUM_ERROR, (name, result.sense)
            assert result.sense.code == expected[name], (name, result.sense)
            assert EARLIEST <= took <= LATEST, (name, took)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "scsi_emulation.block_device" and r.levelno == logging.WARNING
        ]
        for kind in ("read", "write"):
            assert any(
                m.startswith(f"back-end {kind} error") and "Connection timed out" in m
                for m in warnings
            ), (kind, warnings)

        data = os.urandom(64 * 1024)
        assert write16(target, 4096, data, fua=True).status == 0
        result = read16(target, 4096, len(data) // 512)
        assert result.status == 0 and result.data == data
    finally:
        target.close()
        pool.close()


# -- daemon level -------------------------------------------------------------------------------

#: Guest memory slots: 0-3 carry the file LU's load, 40 the RBD command, 41 the checks after.
_RBD_SLOT = 40
_CHECK_SLOT = 41


async def _command(guest: QueueDepthGuest, slot: int, cdb: bytes, size: int, write: bool) -> bool:
    """One command on its own (nothing else in flight); True when it returned GOOD."""
    guest._put_request(slot, cdb, size, write, 7000 + slot)
    guest.queue.submit()
    with trio.fail_after(LATEST):
        await guest.queue.wait_used(1)
    return guest._succeeded(slot, size)


async def test_daemon_serves_the_file_lu_while_the_rbd_lu_waits_then_fails_and_recovers(
    own_cluster: CephCluster, image: str, tmp_path: pathlib.Path
) -> None:
    local = tmp_path / "local.img"
    with local.open("wb") as f:
        f.truncate(16 * MiB)
    socket = tmp_path / "vds.sock"
    argv = [
        sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
        "--log-level", "info", "--control-socket", "none", f"0={local}", f"1={image}",
    ]  # fmt: skip
    daemon = RunningDaemon(argv, socket, tmp_path / "daemon.log")
    size = 8 * 512
    with daemon:
        guest = await QueueDepthGuest.connect(str(socket))
        try:
            for lun in (0, 1):
                guest.lun = lun
                await guest.clear_unit_attention()
            guest.lun = 1  # a write first: the RBD LU takes the image's exclusive lock
            assert await _command(guest, _CHECK_SLOT, _rw10(WRITE_10, 0, 8), size, True)

            local_done: list[float] = []
            with frozen(own_cluster, "osd.0"):
                guest.lun = 1
                rbd_head = guest._put_request(_RBD_SLOT, _rw10(READ_10, 0, 8), size, False, 999)
                guest.queue.submit()
                start = trio.current_time()
                # The file LU's load, 4 deep, until the RBD command comes back.
                guest.lun = 0
                heads: dict[int, int] = {}
                issued = 0

                def issue(slot: int) -> None:
                    nonlocal issued
                    cdb = _rw10(READ_10, (issued * 8) % (16 * MiB // 512), 8)
                    heads[guest._put_request(slot, cdb, size, False, issued)] = slot
                    issued += 1

                for slot in range(4):
                    issue(slot)
                guest.queue.submit()
                rbd_took: float | None = None
                with trio.fail_after(LATEST + 15):
                    while rbd_took is None or heads:
                        (elem,) = await guest.queue.wait_used(1)
                        now = trio.current_time() - start
                        if elem.id == rbd_head:
                            rbd_took = now
                            continue
                        slot = heads.pop(elem.id)
                        assert guest._succeeded(slot, size), f"file LU command failed at {now}"
                        local_done.append(now)
                        if rbd_took is None:
                            issue(slot)
                            guest.queue.submit()
            assert not guest._succeeded(_RBD_SLOT, size)
            _, resp, _ = guest._slot(_RBD_SLOT, size)
            header = bytes(guest.memory.memory.slice(resp, 32))

            # The cluster is back: the RBD LU writes and reads back.
            pattern = os.urandom(size)
            _, _, data = guest._slot(_CHECK_SLOT, size)
            guest.lun = 1
            guest.memory.memory.slice(data, size)[:] = pattern
            assert await _command(guest, _CHECK_SLOT, _rw10(WRITE_10, 256, 8), size, True)
            guest.memory.memory.slice(data, size)[:] = bytes(size)
            assert await _command(guest, _CHECK_SLOT, _rw10(READ_10, 256, 8), size, False)
            assert bytes(guest.memory.memory.slice(data, size)) == pattern
        finally:
            await guest.aclose()
    log = daemon.log()
    assert rbd_took is not None
    during = [t for t in local_done if t < rbd_took]
    late = [t for t in during if t > rbd_took - 1.5]
    print(
        f"\nthe RBD READ(10) failed after {rbd_took:.2f} s; the file LU completed {len(during)}"
        f" commands meanwhile, {len(late)} of them in the last 1.5 s"
    )
    # virtio_scsi_cmd_resp: status CHECK CONDITION (byte 10); fixed sense from byte 12: MEDIUM
    # ERROR, ASC 11h (UNRECOVERED READ ERROR).
    assert header[10] == 0x02, header.hex()
    assert header[12 + 2] & 0x0F == SenseKey.MEDIUM_ERROR, header.hex()
    assert struct.unpack_from(">H", header, 12 + 12)[0] == Asc.UNRECOVERED_READ_ERROR
    assert EARLIEST <= rbd_took <= LATEST, rbd_took
    # The file LU was served all along, not only before or after the RBD command was stuck.
    assert len(during) > 50 and late, (len(during), late[:5])
    assert "Connection timed out" in log and "back-end read error" in log, log
    assert "Traceback" not in log, log
