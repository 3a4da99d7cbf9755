"""One guest boot that exercises a virtio-scsi device end to end, whatever serves it.

Holds the layout (two controllers: a read-write one with several LUNs, each LUN with one job,
and a read-only solid-state 4 KiB-block one), the image files it uses, the guest script, and
the host-side checks after the guest powered off. The same scenario runs against QEMU's
built-in scsi-hd (proving the scenario and the harness) and against our daemon (proving the
daemon), so a failure on the daemon alone points at the daemon. Knows nothing about how the
daemon is started.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.guest import BuiltinScsi, GuestRun, ImageDisk

__all__ = [
    "VPD_PAGES",
    "Controller",
    "Lun",
    "Scenario",
    "flat_lun_hex",
    "linux_lun",
    "parse_info",
]

MiB = 1 << 20
#: VPD pages the device must list in page 0x00 and answer (SPC-4 7.8, SBC-3 6.6).
VPD_PAGES: tuple[str, ...] = ("0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2")
_PATTERN_GUEST_PATH = "/e2e/pattern.bin"
_PATTERN_SIZE = 1 * MiB
#: Where the probe LUN's O_DIRECT pattern goes (a 4 KiB multiple, away from LBA 0).
PROBE_PATTERN_OFFSET = 8 * MiB
_FILL_BYTE = 0xA5


@dataclass(frozen=True)
class Lun:
    """One LUN: its number, what the guest does with it, and its image."""

    role: str  # "probe", "ext4", "discard", "fio", "high" or "ro"
    lun: int
    image: Path
    size: int


@dataclass(frozen=True)
class Controller:
    """One virtio-scsi controller (one daemon, or one built-in virtio-scsi-pci)."""

    index: int
    luns: tuple[Lun, ...]
    num_queues: int = 1
    block_size: int = 512
    read_only: bool = False
    solid_state: bool = False
    write_cache: bool = True


def linux_lun(lun: int) -> int:
    """The LUN number Linux shows in sysfs: scsilun_to_int() keeps the flat-space method
    bits, so LUN 300 appears as 0x412c."""
    return lun if lun < 256 else 0x4000 | lun


def flat_lun_hex(lun: int) -> str:
    """The 8-byte LUN as sg_luns prints it (SAM-5 4.7: peripheral below 256, else flat)."""
    first = lun if lun < 256 else 0x4000 | lun
    return f"{first:04x}" + "0" * 12


def parse_info(output: str) -> dict[str, str]:
    """The ``key=value`` lines of a ``disk_info`` step."""
    info: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            info[key] = value
    return info


class Scenario:
    """The layout, the guest script and the host-side checks of one full-device run."""

    def __init__(self, directory: Path, *, high_lun: int | None = 300, seed: int = 5) -> None:
        self.directory = directory
        self.pattern = random.Random(seed).randbytes(_PATTERN_SIZE)
        rw_luns = [
            Lun("probe", 0, directory / "probe.img", 64 * MiB),
            Lun("ext4", 1, directory / "ext4.img", 64 * MiB),
            Lun("discard", 2, directory / "discard.img", 16 * MiB),
            Lun("fio", 3, directory / "fio.img", 64 * MiB),
        ]
        if high_lun is not None:
            rw_luns.append(Lun("high", high_lun, directory / "high.img", 16 * MiB))
        self.controllers = (
            Controller(0, tuple(rw_luns), num_queues=2, block_size=512, write_cache=True),
            Controller(
                1,
                (Lun("ro", 0, directory / "ro.img", 16 * MiB),),
                num_queues=1,
                block_size=4096,
                read_only=True,
                solid_state=True,
                write_cache=False,
            ),
        )

    # ----------------------------------------------------------------- before the boot

    def luns(self) -> list[tuple[Controller, Lun]]:
        """Every (controller, LUN) pair."""
        return [(c, lun) for c in self.controllers for lun in c.luns]

    def lun(self, role: str) -> Lun:
        """The LUN that plays ``role``."""
        for _, lun in self.luns():
            if lun.role == role:
                return lun
        raise KeyError(role)

    def prepare_images(self) -> None:
        """Create the images: sparse, except the discard LUN (fully written, so the punch
        shows in st_blocks) and the read-only LUN (holding the pattern the guest reads)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _, lun in self.luns():
            with lun.image.open("wb") as f:
                f.truncate(lun.size)
                if lun.role == "discard":
                    f.write(bytes([_FILL_BYTE]) * lun.size)
                elif lun.role == "ro":
                    f.write(self.pattern)

    def files(self) -> dict[str, bytes]:
        """Files the guest needs besides the script."""
        return {_PATTERN_GUEST_PATH: self.pattern}

    def builtin_devices(self) -> list[BuiltinScsi]:
        """The scenario on QEMU's built-in virtio-scsi-pci + scsi-hd (the reference)."""
        return [
            BuiltinScsi(
                tuple(
                    ImageDisk(
                        lun.image,
                        lun=lun.lun,
                        read_only=c.read_only,
                        block_size=c.block_size,
                        solid_state=c.solid_state,
                        serial=f"e2e-{c.index}-{lun.lun}",
                        write_cache=c.write_cache,
                    )
                    for lun in c.luns
                ),
                num_queues=c.num_queues,
            )
            for c in self.controllers
        ]

    def script(self) -> str:
        """The guest script: one step per check, all independent of each other."""
        pattern = _PATTERN_GUEST_PATH
        total = sum(len(c.luns) for c in self.controllers)
        lines = [f"wait_disks {total} 60", "step disks ls -l /sys/block"]
        for controller, lun in self.luns():
            var = lun.role.upper()
            lines.append(f"{var}=$(disk_for {controller.index} {linux_lun(lun.lun)})")
            lines.append(f'{var}_SG=$(sg_for "${var}")')
            lines.append(f'step {lun.role}_info disk_info "${var}"')
        for role in ("probe", "ro"):
            # sg nodes: opening a write-protected /dev/sdX read-write fails in the guest.
            dev = f'"${role.upper()}_SG"'
            lines += [
                f"step {role}_inq sg_inq {dev}",
                f"step {role}_readcap sg_readcap -l {dev}",
                *(f"step {role}_vpd_{page} sg_vpd -p {page} {dev}" for page in VPD_PAGES),
                f"step {role}_luns sg_luns {dev}",
                f"step {role}_modes sg_modes {dev}",
                f"step {role}_opcodes sg_opcodes {dev}",
            ]
        lines += [
            f'step probe_odirect odirect_roundtrip "$PROBE" {pattern} {PROBE_PATTERN_OFFSET}',
            f'step ro_read read_compare "$RO" {pattern} 0',
            # The guest's block layer refuses writes to a write-protected disk by itself, so
            # also send a WRITE(10) straight to the LUN: it must fail with DATA PROTECT.
            'step ro_dd_write /usr/bin/dd if=/dev/zero of="$RO" bs=4096 count=1 oflag=direct',
            f'step ro_sg_write sg_raw -s 4096 -i {pattern} "$RO_SG" 2a 00 00 00 00 00 00 00 01 00',
            'step ext4 ext4_cycle "$EXT4"',
            'step discard blkdiscard -v "$DISCARD"',
            f'step discard_zeroes reads_zero "$DISCARD" {MiB}',
            'step fio fio --name=verify --filename="$FIO" --ioengine=libaio --direct=1'
            " --rw=randrw --bs=4k --iodepth=32 --numjobs=2 --size=16M --offset_increment=16M"
            " --verify=crc32c --verify_fatal=1 --group_reporting",
        ]
        if any(lun.role == "high" for _, lun in self.luns()):
            lines.append(f'step high_odirect odirect_roundtrip "$HIGH" {pattern} 0')
        lines.append("sync")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ after the boot

    def read_image(self, role: str, offset: int, length: int) -> bytes:
        """Bytes of a LUN's image file as the host sees them."""
        with self.lun(role).image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def allocated_bytes(self, role: str) -> int:
        """How much of a LUN's image file is backed by storage (st_blocks)."""
        return os.stat(self.lun(role).image).st_blocks * 512

    def host_fsck(self) -> subprocess.CompletedProcess[str]:
        """e2fsck -f -n on the host, on the ext4 LUN's image."""
        return subprocess.run(
            ["e2fsck", "-f", "-n", str(self.lun("ext4").image)],
            capture_output=True,
            text=True,
            check=False,
        )

    def expected_info(self, role: str) -> dict[str, str]:
        """The disk_info values the configuration implies for ``role``'s disk."""
        for controller, lun in self.luns():
            if lun.role == role:
                return {
                    "size_bytes": str(lun.size),
                    "logical_block_size": str(controller.block_size),
                    "read_only": "1" if controller.read_only else "0",
                    "rotational": "0" if controller.solid_state else "1",
                    "cache_type": "write_back" if controller.write_cache else "write_through",
                    "hw_queues": str(controller.num_queues),
                }
        raise KeyError(role)

    def info(self, run: GuestRun, role: str) -> dict[str, str]:
        """The disk_info the guest reported for ``role``'s disk."""
        return parse_info(run.step(f"{role}_info").output)
