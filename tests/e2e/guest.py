"""Boots a Linux guest under QEMU, runs a shell script in it, and reports per-step results.

Holds the QEMU command line (TCG by default, KVM only when asked for and usable), the two
kinds of SCSI attachment the tests compare (QEMU's built-in virtio-scsi-pci + scsi-hd, and
vhost-user-scsi-pci to a back-end socket), and parsing of the guest's serial console into
step results. The guest script uses the helpers in guest_files/lib.sh; its ``step NAME CMD``
prints ``@@BEGIN NAME`` ... ``@@STEP NAME rc=N``. Knows nothing about our daemon or about what
any particular test checks.

Example::

    guest = Guest.prepare()
    run = guest.run("wait_disks 1\\nstep inq sg_inq /dev/sda\\n",
                    [BuiltinScsi((ImageDisk(Path("/dev/shm/x.img")),))])
    run.check("inq")
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.guest_kernel import GuestKernel, default_cache_dir, prepare_kernel
from tests.e2e.initramfs import build_base, build_overlay

__all__ = [
    "QEMU",
    "Accelerator",
    "BuiltinScsi",
    "Device",
    "Guest",
    "GuestError",
    "GuestRun",
    "ImageDisk",
    "IscsiLun",
    "IscsiScsi",
    "StepResult",
    "VhostUserScsi",
    "choose_accelerator",
    "parse_console",
    "qemu_version",
]

QEMU = "qemu-system-x86_64"
_KERNEL_CMDLINE = "console=ttyS0 panic=-1 rdinit=/init loglevel=4 mitigations=off"
_MARKER = re.compile(r"@@(BEGIN|STEP|EXIT|READY)(?: (?!rc=)(\S+))?(?: rc=(-?\d+))?")


class GuestError(RuntimeError):
    """QEMU could not be started."""


@dataclass(frozen=True)
class ImageDisk:
    """One image file as a scsi-hd LUN of QEMU's built-in virtio-scsi controller."""

    path: Path
    lun: int = 0
    read_only: bool = False
    block_size: int = 512
    solid_state: bool = False
    serial: str | None = None
    write_cache: bool = True


@dataclass(frozen=True)
class BuiltinScsi:
    """QEMU's own virtio-scsi-pci controller with scsi-hd disks: the reference device."""

    disks: tuple[ImageDisk, ...]
    num_queues: int = 1


@dataclass(frozen=True)
class VhostUserScsi:
    """A vhost-user-scsi-pci controller whose back-end listens on ``socket_path``."""

    socket_path: Path
    num_queues: int = 1
    #: Let QEMU reconnect when the back-end restarts (QEMU 8.2+ for vhost-user-scsi).
    reconnect: bool = False


@dataclass(frozen=True)
class IscsiLun:
    """One LU of an iSCSI target as a LUN of a virtio-scsi controller, through QEMU's own
    iSCSI initiator (libiscsi; Debian's qemu-block-extra).

    ``url`` is ``iscsi://HOST:PORT/IQN/LUN``. With ``passthrough`` (scsi-block) QEMU hands the
    guest's CDBs to the target unchanged (only READ/WRITE go through its block layer, still as
    SCSI commands); without it (scsi-hd) QEMU emulates SCSI and sends only I/O commands.
    """

    url: str
    lun: int = 0
    read_only: bool = False
    passthrough: bool = True


@dataclass(frozen=True)
class IscsiScsi:
    """QEMU's virtio-scsi-pci controller whose LUNs are iSCSI LUs (see `IscsiLun`)."""

    luns: tuple[IscsiLun, ...]
    num_queues: int = 1


Device = BuiltinScsi | VhostUserScsi | IscsiScsi


@dataclass(frozen=True)
class Accelerator:
    """The QEMU accelerator arguments and why they were chosen."""

    args: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class StepResult:
    """One ``step NAME CMD`` of the guest script: its exit status and its output."""

    name: str
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.rc == 0


@dataclass(frozen=True)
class GuestRun:
    """The outcome of one guest boot."""

    console: str
    steps: tuple[StepResult, ...]
    #: Exit status of the guest script, or None if it never finished.
    exit_code: int | None
    booted: bool
    timed_out: bool
    seconds: float
    qemu_returncode: int | None
    argv: tuple[str, ...] = field(repr=False)

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``; AssertionError (with the console) if absent."""
        for result in self.steps:
            if result.name == name:
                return result
        raise AssertionError(f"guest step {name!r} did not run\n{self.report()}")

    def check(self, *names: str) -> None:
        """Assert that each named step ran and exited 0, showing its output if not."""
        for name in names:
            result = self.step(name)
            if not result.ok:
                raise AssertionError(
                    f"guest step {name!r} failed with rc={result.rc}:\n{result.output}\n"
                    f"{self.report(tail=40)}"
                )

    def report(self, tail: int = 80) -> str:
        """A summary for failure messages: how QEMU ended, the steps, the console's tail."""
        lines = self.console.splitlines()
        status = (
            "timed out"
            if self.timed_out
            else f"qemu exit {self.qemu_returncode}, script exit {self.exit_code}"
        )
        steps = ", ".join(f"{s.name}={s.rc}" for s in self.steps) or "none"
        shown = "\n".join(lines[-tail:])
        return (
            f"--- guest: {status}, booted={self.booted}, {self.seconds:.1f}s; steps: {steps}\n"
            f"--- last {min(tail, len(lines))} console lines:\n{shown}"
        )


def parse_console(console: str) -> tuple[tuple[StepResult, ...], int | None, bool]:
    """Steps, script exit status and whether init reached the script, from console text.

    Kernel messages may interleave with the script's output, so markers are searched for
    anywhere in a line.
    """
    steps: list[StepResult] = []
    exit_code: int | None = None
    booted = False
    current: str | None = None
    collected: list[str] = []
    for line in console.splitlines():
        match = _MARKER.search(line)
        if match is None:
            if current is not None:
                collected.append(line)
            continue
        kind, name, rc = match.groups()
        if kind == "READY":
            booted = True
        elif kind == "BEGIN" and name:
            current, collected = name, []
        elif kind == "STEP" and name and rc is not None:
            output = "\n".join(collected) if current == name else ""
            steps.append(StepResult(name, int(rc), output))
            current, collected = None, []
        elif kind == "EXIT" and rc is not None:
            exit_code = int(rc)
    return tuple(steps), exit_code, booted


def qemu_version(qemu: str = QEMU) -> tuple[int, int]:
    """QEMU's (major, minor) version, from ``--version``; (0, 0) if it cannot tell."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    match = re.search(r"version (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def choose_accelerator() -> Accelerator:
    """TCG, unless ``E2E_KVM=1`` and the host can really run a stock kernel under KVM.

    The hosts this project runs on expose /dev/kvm through ``kvm_pvm``, which only runs
    specially built guests (``-cpu host`` aborts, other models hang), so KVM needs VMX/SVM in
    the CPU flags and no kvm_pvm module.
    """
    tcg = ("-accel", "tcg", "-cpu", "max")
    if os.environ.get("E2E_KVM") != "1":
        return Accelerator(tcg, "tcg (set E2E_KVM=1 to try KVM)")
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = set(re.findall(r"\b(vmx|svm)\b", cpuinfo))
    if not flags:
        return Accelerator(tcg, "tcg: E2E_KVM=1 ignored, no vmx/svm in the CPU flags")
    if Path("/sys/module/kvm_pvm").exists():
        return Accelerator(tcg, "tcg: E2E_KVM=1 ignored, kvm_pvm is loaded")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accelerator(tcg, "tcg: E2E_KVM=1 ignored, /dev/kvm not usable")
    return Accelerator(("-accel", "kvm", "-cpu", "host"), "kvm")


class Guest:
    """A bootable guest: kernel, base initramfs and machine size; :meth:`run` boots it."""

    def __init__(
        self,
        kernel: GuestKernel,
        base_initramfs: Path,
        *,
        memory_mb: int = 512,
        cpus: int = 2,
        accelerator: Accelerator | None = None,
        qemu: str = QEMU,
    ) -> None:
        self.kernel = kernel
        self.base_initramfs = base_initramfs
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.accelerator = accelerator or choose_accelerator()
        self.qemu = qemu

    @classmethod
    def prepare(cls, cache_dir: Path | None = None, **kwargs: object) -> Guest:
        """Unpack the cached kernel and build (or reuse) the base initramfs."""
        cache_dir = cache_dir or default_cache_dir()
        kernel = prepare_kernel(cache_dir)
        base = build_base(kernel, cache_dir)
        return cls(kernel, base, **kwargs)  # type: ignore[arg-type]

    def qemu_command(self, initrd: Path, devices: Sequence[Device]) -> list[str]:
        """The full QEMU argv for one boot."""
        size = f"{self.memory_mb}M"
        argv = [
            self.qemu,
            *self.accelerator.args,
            "-smp", str(self.cpus),
            "-m", size,
            # vhost-user back-ends map guest RAM, so it must be a shareable memfd.
            "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(initrd),
            "-append", _KERNEL_CMDLINE,
            "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
        ]  # fmt: skip
        for index, device in enumerate(devices):
            argv += _device_args(index, device)
        return argv

    def run(
        self,
        script: str,
        devices: Sequence[Device] = (),
        *,
        files: Mapping[str, bytes] | None = None,
        timeout: float = 300.0,
        workdir: Path | None = None,
    ) -> GuestRun:
        """Boot with ``devices``, run ``script`` (bash, after guest_files/lib.sh), power off.

        ``files`` (guest path -> content) are added next to the script. The console is kept
        in ``workdir/console.log`` when a workdir is given. QEMU is killed (by its own PID)
        after ``timeout`` seconds.
        """
        with tempfile.TemporaryDirectory(prefix="e2e-guest-") as tmp:
            work = workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            initrd = work / "initrd.cpio"
            shutil.copyfile(self.base_initramfs, initrd)
            overlay = build_overlay({"/e2e/test.sh": script.encode(), **(files or {})})
            with initrd.open("ab") as out:
                out.write(overlay)
            argv = self.qemu_command(initrd, devices)
            log = work / "console.log"
            start = time.monotonic()
            timed_out = False
            with log.open("wb") as out:
                try:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                    )
                except OSError as exc:
                    raise GuestError(f"cannot start {argv[0]}: {exc}") from exc
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            seconds = time.monotonic() - start
            console = log.read_bytes().decode(errors="replace").replace("\r", "")
            initrd.unlink()
        steps, exit_code, booted = parse_console(console)
        return GuestRun(
            console=console,
            steps=steps,
            exit_code=exit_code,
            booted=booted,
            timed_out=timed_out,
            seconds=seconds,
            qemu_returncode=None if timed_out else proc.returncode,
            argv=tuple(argv),
        )


def _device_args(index: int, device: Device) -> list[str]:
    if isinstance(device, VhostUserScsi):
        chardev = f"vhost{index}"
        reconnect = ",reconnect=1" if device.reconnect else ""
        return [
            "-chardev", f"socket,id={chardev},path={device.socket_path}{reconnect}",
            "-device",
            f"vhost-user-scsi-pci,chardev={chardev},num_queues={device.num_queues}",
        ]  # fmt: skip
    bus = f"scsi{index}"
    argv = ["-device", f"virtio-scsi-pci,id={bus},num_queues={device.num_queues}"]
    if isinstance(device, IscsiScsi):
        return argv + _iscsi_args(bus, device)
    for disk in device.disks:
        drive = f"{bus}d{disk.lun}"
        readonly = ",readonly=on" if disk.read_only else ""
        argv += [
            "-drive",
            f"if=none,id={drive},file={disk.path},format=raw,discard=unmap{readonly}",
        ]
        hd = (
            f"scsi-hd,drive={drive},bus={bus}.0,channel=0,scsi-id=0,lun={disk.lun}"
            f",logical_block_size={disk.block_size},physical_block_size={disk.block_size}"
        )
        hd += f",write-cache={'on' if disk.write_cache else 'off'}"
        if disk.solid_state:
            hd += ",rotation_rate=1"
        if disk.serial:
            hd += f",serial={disk.serial}"
        argv += ["-device", hd]
    return argv


def _iscsi_args(bus: str, device: IscsiScsi) -> list[str]:
    argv: list[str] = []
    for unit in device.luns:
        drive = f"{bus}d{unit.lun}"
        readonly = ",readonly=on" if unit.read_only else ""
        # cache=none: no host page cache between the guest and the target.
        argv += ["-drive", f"if=none,id={drive},file={unit.url},format=raw,cache=none{readonly}"]
        kind = "scsi-block" if unit.passthrough else "scsi-hd"
        argv += ["-device", f"{kind},drive={drive},bus={bus}.0,channel=0,scsi-id=0,lun={unit.lun}"]
    return argv
