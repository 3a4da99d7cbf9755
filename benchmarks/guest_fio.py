#!/usr/bin/env python3
"""In-guest fio benchmark: our daemon over vhost-user-scsi vs QEMU's built-in scsi-hd.

Boots the e2e guest (tests/e2e/guest.py) once per device and round, and runs fio in it:
4 KiB random read at iodepth 32, 1 MiB sequential read and 1 MiB sequential write at
iodepth 8 (libaio, direct=1, time-based), on the same image in /dev/shm. fio's JSON output
is read back from the serial console and printed as a side-by-side table with ratios.

    python benchmarks/guest_fio.py                     # both devices, one round
    python benchmarks/guest_fio.py --rounds 3 --seconds 10
    python benchmarks/guest_fio.py --socket-daemon-cmd \
        'vhost-device-scsi --socket-path {socket} --num-queues {num_queues} {image}'

If the daemon cannot start (or the guest sees no disk), that is printed and the reference
figures are still shown. Small I/O under TCG is bound by the emulated guest CPU: compare the
two columns of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.daemon import DaemonError, RunningDaemon, daemon_command
from tests.e2e.guest import (
    BuiltinScsi,
    Device,
    Guest,
    GuestRun,
    ImageDisk,
    VhostUserScsi,
)
from tests.e2e.guest_kernel import GuestKernelError
from tests.e2e.initramfs import InitramfsError

MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    """One fio job and the figure reported for it."""

    name: str
    label: str
    fio_args: str
    #: "iops" or "MB/s" of the given direction ("read" / "write").
    metric: str
    direction: str


WORKLOADS: tuple[Workload, ...] = (
    # Queue depth 1: latency, where a kick (a VM exit) and a wake-up per request show.
    Workload(
        "randread4k1", "4 KiB randread QD1", "--rw=randread --bs=4k --iodepth=1", "iops", "read"
    ),
    Workload(
        "randread4k", "4 KiB randread QD32", "--rw=randread --bs=4k --iodepth=32", "iops", "read"
    ),
    Workload("seqread1m", "1 MiB seq read QD8", "--rw=read --bs=1M --iodepth=8", "MB/s", "read"),
    Workload(
        "seqwrite1m", "1 MiB seq write QD8", "--rw=write --bs=1M --iodepth=8", "MB/s", "write"
    ),
)

DEFAULT_DAEMON_TEMPLATE = "{daemon} --socket-path {socket} --num-queues {num_queues} {image}"


def guest_script(seconds: int, image_size: int) -> str:
    """The guest side: wait for the disk, then one fio step per workload (JSON output)."""
    lines = ["wait_disks 1 90", 'DISK=$(disk_for "*" 0)', 'step disk disk_info "$DISK"']
    for workload in WORKLOADS:
        lines.append(
            f'step {workload.name} fio --name={workload.name} --filename="$DISK"'
            f" {workload.fio_args} --ioengine=libaio --direct=1 --size={image_size}"
            f" --time_based --runtime={seconds} --ramp_time=1 --output-format=json"
        )
    return "\n".join(lines) + "\n"


def parse_fio_json(output: str) -> dict[str, Any]:
    """fio's JSON document from a step's output (warnings may precede it)."""
    start = output.find("{")
    end = output.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON in fio output")
    document: dict[str, Any] = json.loads(output[start : end + 1])
    return document


def figures(run: GuestRun) -> dict[str, float]:
    """Workload name -> IOPS or MB/s, for the workloads that succeeded."""
    results: dict[str, float] = {}
    for workload in WORKLOADS:
        try:
            step = run.step(workload.name)
        except AssertionError:
            continue
        if not step.ok:
            continue
        try:
            job = parse_fio_json(step.output)["jobs"][0][workload.direction]
        except (ValueError, KeyError, IndexError):
            continue
        if workload.metric == "iops":
            results[workload.name] = float(job["iops"])
        else:
            results[workload.name] = float(job["bw_bytes"]) / 1e6
    return results


def fill_image(path: Path, size: int) -> None:
    """A fully written image (not sparse), so reads hit real pages on both devices."""
    block = bytes(range(256)) * (MiB // 256)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def run_reference(guest: Guest, image: Path, args: argparse.Namespace, work: Path) -> GuestRun:
    """One guest boot on QEMU's virtio-scsi-pci + scsi-hd."""
    device = BuiltinScsi((ImageDisk(image),), num_queues=args.num_queues)
    return run_guest(guest, [device], args, work / "reference")


def run_daemon(
    guest: Guest, image: Path, args: argparse.Namespace, work: Path, round_no: int
) -> GuestRun:
    """One guest boot on our daemon over vhost-user-scsi; DaemonError if it will not start."""
    socket = work / f"vds-{round_no}.sock"
    argv = shlex.split(
        args.socket_daemon_cmd.format(
            daemon=shlex.join(daemon_command()),
            socket=socket,
            image=image,
            num_queues=args.num_queues,
        )
    )
    log = work / f"daemon-{round_no}.log"
    with RunningDaemon(argv, socket, log):
        device = VhostUserScsi(socket, num_queues=args.num_queues)
        return run_guest(guest, [device], args, work / f"daemon-{round_no}")


def run_guest(
    guest: Guest, devices: Sequence[Device], args: argparse.Namespace, workdir: Path
) -> GuestRun:
    timeout = len(WORKLOADS) * (args.seconds + 1) * 3 + 180
    return guest.run(
        guest_script(args.seconds, args.image_mb * MiB), devices, timeout=timeout, workdir=workdir
    )


def explain_failure(name: str, run: GuestRun) -> None:
    """Say why a device produced no figures."""
    print(f"{name}: no fio results", file=sys.stderr)
    print(run.report(tail=25), file=sys.stderr)


def format_value(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f} {metric}"


def print_table(reference: dict[str, list[float]], daemon: dict[str, list[float]]) -> None:
    """Medians per workload, side by side, with daemon / reference ratios."""
    header = f"{'workload':<22}{'scsi-hd (built-in)':>22}{'vhost-device-scsi':>22}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for workload in WORKLOADS:
        ref = reference.get(workload.name)
        ours = daemon.get(workload.name)
        ref_median = statistics.median(ref) if ref else None
        our_median = statistics.median(ours) if ours else None
        ratio = f"{our_median / ref_median:.2f}" if ref_median and our_median is not None else "n/a"
        print(
            f"{workload.label:<22}{format_value(ref_median, workload.metric):>22}"
            f"{format_value(our_median, workload.metric):>22}{ratio:>8}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=10, help="run time of each fio job")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per device")
    parser.add_argument("--image-mb", type=int, default=1024, help="image size in MiB")
    parser.add_argument("--num-queues", type=int, default=1, help="request queues per device")
    parser.add_argument(
        "--socket-daemon-cmd",
        default=DEFAULT_DAEMON_TEMPLATE,
        help="daemon command line; {socket}, {image}, {num_queues} and {daemon} (our"
        " daemon's command) are substituted (default: %(default)s)",
    )
    parser.add_argument("--skip-daemon", action="store_true", help="only the reference")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    try:
        guest = Guest.prepare()
    except (GuestKernelError, InitramfsError) as exc:
        print(f"cannot prepare the guest: {exc}", file=sys.stderr)
        return 2
    print(f"guest: kernel {guest.kernel.version}, {guest.accelerator.reason}", file=sys.stderr)

    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="vds-bench-", dir=base))
    image = work / "bench.img"
    fill_image(image, args.image_mb * MiB)
    reference: dict[str, list[float]] = {}
    daemon: dict[str, list[float]] = {}
    daemon_broken = args.skip_daemon
    try:
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}: reference (scsi-hd)...", file=sys.stderr)
            run = run_reference(guest, image, args, work)
            got = figures(run)
            if not got:
                explain_failure("scsi-hd", run)
            for name, value in got.items():
                reference.setdefault(name, []).append(value)
            if daemon_broken:
                continue
            print(f"round {round_no + 1}/{args.rounds}: vhost-device-scsi...", file=sys.stderr)
            try:
                run = run_daemon(guest, image, args, work, round_no)
            except DaemonError as exc:
                print(f"the daemon is not usable yet: {exc}", file=sys.stderr)
                daemon_broken = True
                continue
            got = figures(run)
            if not got:
                explain_failure("vhost-device-scsi", run)
            for name, value in got.items():
                daemon.setdefault(name, []).append(value)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            image.unlink(missing_ok=True)
            for leftover in sorted(work.rglob("*"), reverse=True):
                if leftover.is_dir():
                    leftover.rmdir()
                else:
                    leftover.unlink()
            work.rmdir()

    print(
        f"\nIn-guest fio (libaio, direct=1, {args.seconds}s per job, {args.rounds} round(s),"
        f" median; {args.num_queues} queue(s); image {args.image_mb} MiB in /dev/shm;"
        f" {guest.accelerator.reason})"
    )
    print_table(reference, daemon)
    return 0 if reference else 1


if __name__ == "__main__":
    sys.exit(main())
