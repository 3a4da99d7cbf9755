#!/usr/bin/env python3
"""The whole system in one command (`nox -s demo`): daemon, QEMU, a Linux guest using the disk.

Creates a fresh sparse image, starts ``vhost-device-scsi`` on it, boots the e2e guest attached
with vhost-user-scsi-pci, and narrates, live, the guest identifying the disk, partitioning it,
formatting and mounting the partition, writing files, and checking them and the file system.
Afterwards the host reads the image file itself to show that the partition table and the ext4
file system really landed there through the daemon.

    python tests/e2e/demo.py [--size-mb 1024] [--num-queues 2] [--raw]
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.daemon import DaemonConfig, DaemonError, RunningDaemon
from tests.e2e.guest import Guest, GuestError, GuestRun, VhostUserScsi
from tests.e2e.guest_kernel import GuestKernelError
from tests.e2e.initramfs import InitramfsError

#: The partition starts at 1 MiB, as modern partitioning tools place it.
PARTITION_START_SECTOR = 2048
LABEL = "demo"

#: What each guest step shows, printed when the step begins.
STEP_TITLES = {
    "identify": "SCSI INQUIRY: who is this disk? (sg_inq)",
    "capacity": "READ CAPACITY(16): how big is it? (sg_readcap)",
    "partition": f"partition: one primary partition from sector {PARTITION_START_SECTOR} (fdisk)",
    "format": f"format the partition as ext4, label {LABEL!r} (mkfs.ext4)",
    "mount": "mount it",
    "write": "write three 8 MiB random files and a greeting, record their SHA-256",
    "unmount": "unmount (flushes everything through the daemon)",
    "remount": "mount it again, read-only",
    "verify": "read the files back and compare the SHA-256 sums",
    "unmount_again": "unmount",
    "fsck": "check the whole file system (e2fsck -f -n)",
}

GUEST_SCRIPT = f"""\
wait_disks 1 90
DISK=$(disk_for 0 0)
step identify sg_inq "$DISK"
step capacity sg_readcap -l "$DISK"
# busybox fdisk reads its answers from stdin: new DOS label, primary partition 1 from sector
# {PARTITION_START_SECTOR} to the end, write.
step partition bash -c "printf 'o\\nn\\np\\n1\\n{PARTITION_START_SECTOR}\\n\\nw\\n' | fdisk $DISK \\
    >/dev/null; sleep 1; fdisk -l $DISK"
step format mkfs.ext4 -q -L {LABEL} "${{DISK}}1"
mkdir -p /mnt/demo
step mount mount -t ext4 "${{DISK}}1" /mnt/demo
step write bash -c "for i in 1 2 3; do /usr/bin/dd if=/dev/urandom of=/mnt/demo/file\\$i \\
    bs=1M count=8 status=none; done; echo hello from the guest > /mnt/demo/hello.txt; \\
    sha256sum /mnt/demo/file* > /tmp/sums; sync; ls -l /mnt/demo; df -h /mnt/demo"
step unmount umount /mnt/demo
step remount mount -t ext4 -o ro "${{DISK}}1" /mnt/demo
step verify bash -c "sha256sum -c /tmp/sums && cat /mnt/demo/hello.txt"
step unmount_again umount /mnt/demo
step fsck e2fsck -f -n "${{DISK}}1"
"""

_MARKER = re.compile(r"@@(READY|BEGIN|STEP|EXIT)(?: (?!rc=)(\S+))?(?: rc=(-?\d+))?")
#: Terminal control sequences SeaBIOS and the kernel write to the serial console.
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[@-_c])")


class Narrator:
    """Turns console lines into the demo's output: step titles, indented output, results."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.booted = False

    def line(self, text: str) -> str | None:
        """What to print for one console line (None: nothing)."""
        if self.raw:
            return text
        text = _ESCAPES.sub("", text).rstrip()
        match = _MARKER.search(text)
        if match is None:
            if not text.strip():
                return None
            return f"    {text}" if self.booted else f"  [boot] {text}"
        kind, name, rc = match.groups()
        if kind == "READY":
            self.booted = True
            return "guest booted: modules loaded, running the demo script\n"
        if kind == "BEGIN" and name:
            return f"==> {STEP_TITLES.get(name, name)}"
        if kind == "STEP" and name:
            return f"    ... {name}: {'ok' if rc == '0' else f'FAILED (exit status {rc})'}\n"
        if kind == "EXIT":
            return f"guest script finished (exit status {rc}); powering off"
        return None


def follow(path: Path, stop: threading.Event, narrator: Narrator) -> None:
    """Print what QEMU writes to the console log, line by line, as it appears."""
    offset = 0
    pending = ""
    while True:
        done = stop.is_set()
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk.decode(errors="replace").replace("\r", "")
            *lines, pending = pending.split("\n")
            if done and pending:
                lines.append(pending)
            for line in lines:
                shown = narrator.line(line)
                if shown is not None:
                    print(shown, flush=True)
        if done:
            return
        time.sleep(0.2)


def inspect_image(image: Path) -> list[str]:
    """What the host finds in the image: the guest's MBR partition and ext4 superblock."""
    findings: list[str] = []
    with image.open("rb") as f:
        mbr = f.read(512)
        if mbr[510:512] != b"\x55\xaa":
            return ["no MBR boot signature at byte 510"]
        kind = mbr[446 + 4]
        (start, sectors) = struct.unpack_from("<II", mbr, 446 + 8)
        findings.append(
            f"MBR partition 1: type {kind:#04x}, sectors {start}..{start + sectors - 1}"
            f" ({sectors * 512 >> 20} MiB)"
        )
        f.seek(start * 512 + 1024)  # the ext4 superblock is 1024 bytes into the partition
        superblock = f.read(1024)
    (magic,) = struct.unpack_from("<H", superblock, 0x38)
    if magic != 0xEF53:
        findings.append(f"no ext4 superblock in partition 1 (magic {magic:#06x})")
        return findings
    blocks_lo, free_lo = struct.unpack_from("<I4xI", superblock, 0x04)
    (log_block,) = struct.unpack_from("<I", superblock, 0x18)
    label = superblock[0x78:0x88].rstrip(b"\0").decode(errors="replace")
    block = 1024 << log_block
    findings.append(
        f"ext4 superblock: label {label!r}, {blocks_lo} blocks of {block} bytes,"
        f" {(blocks_lo - free_lo) * block >> 20} MiB in use"
    )
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="image size (sparse)")
    parser.add_argument("--num-queues", type=int, default=2, help="request queues")
    parser.add_argument("--raw", action="store_true", help="show the guest console unfiltered")
    args = parser.parse_args()
    if args.size_mb < 64:
        parser.error("--size-mb must be at least 64 (ext4 and three 8 MiB files)")
    print("preparing the guest (kernel and initramfs, cached after the first run)...")
    try:
        guest = Guest.prepare()
    except (GuestKernelError, InitramfsError) as exc:
        print(f"cannot prepare the guest: {exc} (run scripts/install-deps)", file=sys.stderr)
        return 2
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="vds-demo-", dir=base) as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with image.open("wb") as f:
            f.truncate(args.size_mb << 20)
        print(f"created a sparse {args.size_mb} MiB image: {image}")
        socket = work / "vhost-scsi.sock"
        config = DaemonConfig(images=(image,), num_queues=args.num_queues, log_level="warning")
        print(f"starting the daemon:\n$ {' '.join(config.argv(socket))}")
        daemon = RunningDaemon.from_config(config, socket, work / "daemon.log")
        try:
            daemon.start()
        except DaemonError as exc:
            print(f"the daemon did not start: {exc}", file=sys.stderr)
            return 1
        print(f"daemon listening on {socket} (pid {daemon.pid})")
        device = VhostUserScsi(socket, num_queues=args.num_queues)
        print(f"booting the guest ({guest.accelerator.reason}):")
        print(f"$ {' '.join(guest.qemu_command(work / 'initrd.cpio', [device]))}\n")
        stop = threading.Event()
        follower = threading.Thread(
            target=follow, args=(work / "console.log", stop, Narrator(args.raw))
        )
        follower.start()
        try:
            run: GuestRun = guest.run(GUEST_SCRIPT, [device], workdir=work, timeout=300)
        except GuestError as exc:
            print(f"cannot start QEMU: {exc}", file=sys.stderr)
            return 1
        finally:
            stop.set()
            follower.join()
            daemon.stop()
        print(
            f"\nguest finished in {run.seconds:.1f}s; daemon exited with status {daemon.returncode}"
        )
        allocated = image.stat().st_blocks * 512 >> 20
        print(f"the image uses {allocated} MiB of {args.size_mb} MiB on the host (still sparse)")
        print("the host reads the image file directly:")
        for finding in inspect_image(image):
            print(f"    {finding}")
        failed = [step.name for step in run.steps if not step.ok]
        expected = set(STEP_TITLES)
        missing = sorted(expected - {step.name for step in run.steps})
        if run.timed_out or failed or missing or run.exit_code != 0:
            print(
                f"demo FAILED: failed steps {failed}, missing steps {missing},"
                f" timed out {run.timed_out}\n{run.report(tail=20)}\n--- daemon log:\n"
                f"{daemon.log()}",
                file=sys.stderr,
            )
            return 1
        print("demo OK: partitioned, formatted, written, verified and checked through the daemon")
        return 0


if __name__ == "__main__":
    sys.exit(main())
