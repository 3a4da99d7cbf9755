#!/usr/bin/env python3
"""The whole system in one command (`nox -s demo`): daemon, QEMU, a Linux guest using the disk.

Creates a fresh sparse image, starts ``vhost-device-scsi`` on it, boots the e2e guest attached
with vhost-user-scsi-pci, and shows its console live while the guest identifies the disk,
partitions it, formats and mounts the partition, writes files, and checks the file system.

    python tests/e2e/demo.py [--size-mb 1024] [--num-queues 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.daemon import DaemonConfig, DaemonError, RunningDaemon
from tests.e2e.guest import Guest, GuestRun, VhostUserScsi
from tests.e2e.guest_kernel import GuestKernelError
from tests.e2e.initramfs import InitramfsError

GUEST_SCRIPT = """\
wait_disks 1 90
DISK=$(disk_for 0 0)
step identify sg_inq "$DISK"
step capacity sg_readcap -l "$DISK"
# busybox fdisk reads its commands from stdin: one primary partition over the whole disk.
step partition bash -c "printf 'o\\nn\\np\\n1\\n\\n\\nw\\n' | fdisk $DISK >/dev/null; \\
    sleep 1; fdisk -l $DISK"
step format mkfs.ext4 -q -L demo "${DISK}1"
mkdir -p /mnt/demo
step mount mount -t ext4 "${DISK}1" /mnt/demo
step write bash -c "for i in 1 2 3; do /usr/bin/dd if=/dev/urandom of=/mnt/demo/file\\$i \\
    bs=1M count=8 status=none; done; echo hello from the guest > /mnt/demo/hello.txt; \\
    sha256sum /mnt/demo/file* > /tmp/sums; sync; ls -l /mnt/demo; df -h /mnt/demo"
step unmount umount /mnt/demo
step remount mount -t ext4 -o ro "${DISK}1" /mnt/demo
step verify bash -c "sha256sum -c /tmp/sums && cat /mnt/demo/hello.txt"
step unmount_again umount /mnt/demo
step fsck e2fsck -f -n "${DISK}1"
"""


def _follow(path: Path, stop: threading.Event) -> None:
    """Print what QEMU writes to the console log as it appears."""
    offset = 0
    while True:
        done = stop.is_set()
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace").replace("\r", ""))
            sys.stdout.flush()
        if done:
            return
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="image size (sparse)")
    parser.add_argument("--num-queues", type=int, default=2, help="request queues")
    args = parser.parse_args()
    try:
        guest = Guest.prepare()
    except (GuestKernelError, InitramfsError) as exc:
        print(f"cannot prepare the guest: {exc}", file=sys.stderr)
        return 2
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="vds-demo-", dir=base) as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with image.open("wb") as f:
            f.truncate(args.size_mb << 20)
        socket = work / "vhost-scsi.sock"
        config = DaemonConfig(images=(image,), num_queues=args.num_queues, log_level="warning")
        print(f"$ {' '.join(config.argv(socket))}")
        daemon = RunningDaemon.from_config(config, socket, work / "daemon.log")
        try:
            daemon.start()
        except DaemonError as exc:
            print(f"the daemon did not start: {exc}", file=sys.stderr)
            return 1
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(work / "console.log", stop))
        follower.start()
        try:
            device = VhostUserScsi(socket, num_queues=args.num_queues)
            print(f"$ {' '.join(guest.qemu_command(work / 'initrd.cpio', [device]))}\n")
            run: GuestRun = guest.run(GUEST_SCRIPT, [device], workdir=work, timeout=300)
        finally:
            stop.set()
            follower.join()
            daemon.stop()
        failed = [step.name for step in run.steps if not step.ok]
        print(f"\nguest finished in {run.seconds:.1f}s; image uses", end=" ")
        print(f"{image.stat().st_blocks * 512 >> 20} MiB of {args.size_mb} MiB on the host")
        if run.timed_out or failed or run.exit_code is None:
            print(f"demo FAILED: failed steps {failed}\n{daemon.log()}", file=sys.stderr)
            return 1
        print("demo OK: partitioned, formatted, written, verified and checked through the daemon")
        return 0


if __name__ == "__main__":
    sys.exit(main())
