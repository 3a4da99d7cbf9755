"""One Linux guest boot against our daemon with one LUN per storage back-end: an image file,
a loop device, an NBD export (qemu-nbd, else nbdkit, serving an image file) and a Ceph RBD
image (where the single-node cluster comes up). On every LUN the guest runs the checks of
tests/e2e/scenario_checks.py: an O_DIRECT pattern round trip, fio verify on two queues,
blkdiscard (the range then reads as zeros), mkfs.ext4 + files + e2fsck; afterwards the host
runs e2fsck on what the storage holds (so the data really reached it).

A back-end whose server or tool is missing is left out of the boot and its checks skip with
the reason; the others still run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.backends.servers import CephCluster, NbdServer, free_port, start_nbd
from tests.e2e.daemon import RunningDaemon
from tests.e2e.guest import QEMU, Guest, GuestRun, VhostUserScsi
from tests.e2e.guest_kernel import default_cache_dir, find_kernel_package
from tests.e2e.scsi_scenario import linux_lun, parse_info

pytestmark = pytest.mark.backends

MiB = 1 << 20
LUN_SIZE = 64 * MiB
BACKENDS = ("file", "loop", "nbd", "rbd")
NUM_QUEUES = 2
#: Four LUNs of fio and ext4 under TCG: a healthy run takes 1-3 minutes.
GUEST_TIMEOUT = 600.0
_PATTERN_PATH = "/e2e/pattern.bin"
_PATTERN_OFFSET = 8 * MiB
#: How much of each LUN the guest reads back after blkdiscard (covers the pattern).
_ZERO_CHECK = 16 * MiB


@dataclass
class BackendLun:
    """One back-end as a LUN: where the daemon finds it, and how the host reads it back."""

    name: str
    lun: int
    uri: str
    #: A path e2fsck can read on the host after the guest finished (None: `export` makes it).
    host_path: pathlib.Path | None = None
    export: list[str] | None = None


@dataclass
class BackendsRun:
    run: GuestRun
    luns: dict[str, BackendLun]
    skipped: dict[str, str]
    daemon_log: str
    work: pathlib.Path

    def require(self, name: str) -> BackendLun:
        if name in self.skipped:
            pytest.skip(f"no {name} LUN: {self.skipped[name]}")
        return self.luns[name]

    def context(self) -> str:
        tail = "\n".join(self.daemon_log.splitlines()[-30:])
        return f"{self.run.report(tail=30)}\n--- daemon log (tail):\n{tail}"

    def check(self, *steps: str) -> None:
        try:
            self.run.check(*steps)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- daemon log (tail):\n{self.daemon_log[-3000:]}"
            ) from None


def _sparse(path: pathlib.Path, size: int = LUN_SIZE) -> pathlib.Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _guest() -> Guest:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not found: run scripts/install-deps")
    if find_kernel_package(default_cache_dir()) is None:
        pytest.skip(f"no guest kernel package in {default_cache_dir()}: run scripts/install-deps")
    return Guest.prepare()


def _loop_lun(stack: contextlib.ExitStack, work: pathlib.Path, lun: int) -> BackendLun | str:
    losetup = shutil.which("losetup")
    if losetup is None:
        return "losetup is not installed"
    backing = _sparse(work / "loop.img")
    proc = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode:
        return f"losetup is not permitted here: {proc.stderr.strip()}"
    device = proc.stdout.strip()
    stack.callback(subprocess.run, [losetup, "-d", device], check=False)
    return BackendLun("loop", lun, device, host_path=pathlib.Path(device))


def _nbd_lun(stack: contextlib.ExitStack, work: pathlib.Path, lun: int) -> BackendLun | str:
    image = _sparse(work / "nbd.img")
    port = free_port()
    qemu_nbd, nbdkit = shutil.which("qemu-nbd"), shutil.which("nbdkit")
    if qemu_nbd is not None:
        argv = [
            qemu_nbd, "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "disk",
            "--persistent", "--shared=8", "--discard=unmap", str(image),
        ]  # fmt: skip
        uri = f"nbd://127.0.0.1:{port}/disk"
    elif nbdkit is not None:
        argv = [nbdkit, "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port)]
        argv += ["file", str(image)]
        uri = f"nbd://127.0.0.1:{port}/"
    else:
        return "neither qemu-nbd nor nbdkit is installed"
    server: NbdServer = start_nbd(argv, uri, ("127.0.0.1", port))
    stack.callback(server.stop)
    return BackendLun("nbd", lun, uri, host_path=image)


def _rbd_lun(
    stack: contextlib.ExitStack, request: pytest.FixtureRequest, work: pathlib.Path, lun: int
) -> BackendLun | str:
    try:
        cluster: CephCluster = request.getfixturevalue("ceph_cluster")
    except pytest.skip.Exception as exc:
        return str(exc) or "no Ceph cluster"
    rbd = shutil.which("rbd")
    if rbd is None:
        return "the rbd tool is not installed"
    conf = ["--conf", str(cluster.conf)]
    name = f"guest-{os.getpid()}"
    size_mb = str(LUN_SIZE // MiB)
    proc = subprocess.run([rbd, *conf, "create", "--size", size_mb, f"rbd/{name}"],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        pytest.fail(f"rbd create failed: {proc.stderr.strip()}")
    stack.callback(subprocess.run, [rbd, *conf, "rm", f"rbd/{name}"], capture_output=True)
    exported = work / "rbd-export.img"
    return BackendLun(
        "rbd",
        lun,
        f"rbd:rbd/{name}?conf={cluster.conf}",
        export=[rbd, *conf, "export", f"rbd/{name}", str(exported)],
        host_path=exported,
    )


def guest_script(luns: list[BackendLun]) -> str:
    lines = [f"wait_disks {len(luns)} 90", "step disks ls -l /sys/block"]
    for b in luns:
        var = b.name.upper()
        lines += [
            f"{var}=$(disk_for 0 {linux_lun(b.lun)})",
            f'step {b.name}_info disk_info "${var}"',
        ]
    for b in luns:
        dev = f'"${b.name.upper()}"'
        lines += [
            f"step {b.name}_odirect odirect_roundtrip {dev} {_PATTERN_PATH} {_PATTERN_OFFSET}",
            f"step {b.name}_fio fio --name=verify --filename={dev} --ioengine=libaio --direct=1"
            " --rw=randrw --bs=4k --iodepth=32 --numjobs=2 --offset=16M --size=16M"
            " --offset_increment=16M --verify=crc32c --verify_fatal=1 --group_reporting",
            f"step {b.name}_discard blkdiscard -v {dev}",
            f"step {b.name}_discard_zeroes reads_zero {dev} {_ZERO_CHECK}",
            f"step {b.name}_ext4 ext4_cycle {dev}",
        ]
    lines.append("sync")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def backends_run(request: pytest.FixtureRequest) -> Iterator[BackendsRun]:
    guest = _guest()
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = pathlib.Path(tempfile.mkdtemp(prefix="vds-backends-", dir=base))
    luns: dict[str, BackendLun] = {}
    skipped: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            made: dict[str, BackendLun | str] = {
                "file": BackendLun("file", 0, str(_sparse(work / "file.img")), work / "file.img"),
                "loop": _loop_lun(stack, work, 1),
                "nbd": _nbd_lun(stack, work, 2),
                "rbd": _rbd_lun(stack, request, work, 3),
            }
            for name, outcome in made.items():
                if isinstance(outcome, str):
                    skipped[name] = outcome
                    print(f"\nbackends guest: no {name} LUN: {outcome}", file=sys.stderr)
                else:
                    luns[name] = outcome
            socket = work / "vds.sock"
            argv = [
                sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(socket),
                "--num-queues", str(NUM_QUEUES), "--control-socket", "none",
                *(f"{b.lun}={b.uri}" for b in luns.values()),
            ]  # fmt: skip
            daemon = RunningDaemon(argv, socket, work / "daemon.log")
            pattern = random.Random(8).randbytes(MiB)
            with daemon:
                run = guest.run(
                    guest_script(list(luns.values())),
                    [VhostUserScsi(socket, num_queues=NUM_QUEUES)],
                    files={_PATTERN_PATH: pattern},
                    workdir=work / "guest",
                    timeout=GUEST_TIMEOUT,
                )
            result = BackendsRun(run, luns, skipped, daemon.log(), work)
            # While the servers still run: copy out what only they can hand over (RBD).
            for b in luns.values():
                if b.export is not None:
                    subprocess.run(b.export, capture_output=True, check=False)
            yield result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_guest_ran_to_the_end(backends_run: BackendsRun) -> None:
    run = backends_run.run
    assert run.booted and not run.timed_out, backends_run.context()
    assert run.exit_code == 0, backends_run.context()
    assert "Traceback" not in backends_run.daemon_log, backends_run.daemon_log


@pytest.mark.parametrize("name", BACKENDS)
def test_disk_appears_with_its_size(backends_run: BackendsRun, name: str) -> None:
    backends_run.require(name)
    backends_run.check(f"{name}_info")
    info = parse_info(backends_run.run.step(f"{name}_info").output)
    assert info.get("size_bytes") == str(LUN_SIZE), info
    assert info.get("hw_queues") == str(NUM_QUEUES), info
    assert int(info.get("discard_max_bytes", "0")) > 0, f"{name} offers no discard: {info}"


@pytest.mark.parametrize("name", BACKENDS)
def test_odirect_pattern_round_trip(backends_run: BackendsRun, name: str) -> None:
    backends_run.require(name)
    backends_run.check(f"{name}_odirect")


@pytest.mark.parametrize("name", BACKENDS)
def test_fio_verify_on_two_queues(backends_run: BackendsRun, name: str) -> None:
    backends_run.require(name)
    backends_run.check(f"{name}_fio")
    output = backends_run.run.step(f"{name}_fio").output
    assert "err= 0" in output and "READ:" in output and "WRITE:" in output, output


@pytest.mark.parametrize("name", BACKENDS)
def test_discard_then_reads_zero(backends_run: BackendsRun, name: str) -> None:
    backends_run.require(name)
    backends_run.check(f"{name}_discard", f"{name}_discard_zeroes")


@pytest.mark.parametrize("name", BACKENDS)
def test_ext4_in_the_guest_and_fsck_on_the_host(backends_run: BackendsRun, name: str) -> None:
    lun = backends_run.require(name)
    backends_run.check(f"{name}_ext4")
    assert lun.host_path is not None and lun.host_path.exists(), f"{name}: nothing to fsck"
    fsck = subprocess.run(
        ["e2fsck", "-f", "-n", str(lun.host_path)], capture_output=True, text=True, check=False
    )
    assert fsck.returncode == 0, f"host e2fsck of {name}:\n{fsck.stdout}{fsck.stderr}"
