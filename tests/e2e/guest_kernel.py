"""The guest kernel: Debian's linux-image package unpacked into the e2e cache.

Holds finding the downloaded ``linux-image-*-amd64`` package (scripts/install-deps fetches
it), unpacking the kernel image and the few modules a virtio-scsi guest needs, and ordering
those modules so that plain ``insmod`` loads them (dependencies first). Knows nothing about the
initramfs layout or QEMU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GUEST_MODULES",
    "GuestKernel",
    "GuestKernelError",
    "default_cache_dir",
    "find_kernel_package",
    "prepare_kernel",
]

#: Top-level modules the guest loads, each pulled in with its dependencies. The crc64
#: rocksoft algorithm must be present before t10-pi (sd_mod) asks the crypto API for it,
#: because the initramfs has no modprobe to satisfy the kernel's request_module().
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_scsi",
    "crc64_rocksoft_generic",
    "sd_mod",
    "sg",
    "crc32c_generic",
    "ext4",
)

_PACKAGE_GLOB = "linux-image-*-amd64_*.deb"
_INSMOD_LINE = re.compile(r"^insmod (\S+)")


class GuestKernelError(RuntimeError):
    """The guest kernel is missing from the cache or cannot be unpacked."""


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel: its image and its modules in load order."""

    version: str
    vmlinuz: Path
    #: Absolute host paths of the module files, dependencies first.
    modules: tuple[Path, ...]


def default_cache_dir() -> Path:
    """``$VDS_GUEST_CACHE``, else ``<repo>/.cache/guest`` (where scripts/install-deps puts it)."""
    env = os.environ.get("VDS_GUEST_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "guest"


def find_kernel_package(cache_dir: Path) -> Path | None:
    """The newest downloaded kernel package in ``cache_dir``, or None."""
    candidates = sorted(cache_dir.glob(_PACKAGE_GLOB))
    return candidates[-1] if candidates else None


def prepare_kernel(cache_dir: Path | None = None) -> GuestKernel:
    """Unpack (once) the cached kernel package and return the kernel and its module list.

    The unpacked tree lives in ``<cache>/kernel-<version>/``; only the kernel image and the
    modules in :data:`GUEST_MODULES` (with dependencies) are kept, so it stays small.
    """
    cache_dir = cache_dir or default_cache_dir()
    package = find_kernel_package(cache_dir)
    if package is None:
        raise GuestKernelError(
            f"no {_PACKAGE_GLOB} in {cache_dir}: run scripts/install-deps to download it"
        )
    # linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb -> 6.1.0-56-amd64
    version = package.name.split("_", 1)[0].removeprefix("linux-image-")
    target = cache_dir / f"kernel-{version}"
    order_file = target / "modules.order"
    if not order_file.exists():
        _unpack(package, version, target)
    names = order_file.read_text().split()
    return GuestKernel(
        version=version,
        vmlinuz=target / "vmlinuz",
        modules=tuple(target / "modules" / name for name in names),
    )


def _unpack(package: Path, version: str, target: Path) -> None:
    for tool in ("dpkg", "depmod", "modprobe"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise GuestKernelError(f"{tool} not found: run scripts/install-deps")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "root"
        _run(["dpkg", "-x", str(package), str(root)])
        _run([_sbin("depmod"), "-b", str(root), version])
        ordered = _module_order(root, version)
        staged = tmp / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copyfile(root / "boot" / f"vmlinuz-{version}", staged / "vmlinuz")
        names: list[str] = []
        for module in ordered:
            # Names are unique across the tree ("crc64.ko", "virtio.ko"...): flatten it.
            shutil.copyfile(module, staged / "modules" / module.name)
            names.append(module.name)
        (staged / "modules.order").write_text("\n".join(names) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


def _module_order(root: Path, version: str) -> list[Path]:
    """Modules of :data:`GUEST_MODULES` with their dependencies, each once, dependencies first.

    ``modprobe --show-depends`` prints the ``insmod`` lines it would run (soft dependencies
    included); it reads one module per invocation.
    """
    ordered: list[Path] = []
    seen: set[Path] = set()
    for name in GUEST_MODULES:
        out = _run([_sbin("modprobe"), "-d", str(root), "-S", version, "--show-depends", name])
        for line in out.splitlines():
            match = _INSMOD_LINE.match(line.strip())
            if match is None:
                continue  # "builtin NAME": nothing to load
            path = Path(match.group(1))
            if path not in seen:
                seen.add(path)
                ordered.append(path)
    if not ordered:
        raise GuestKernelError(f"modprobe found none of {GUEST_MODULES} in {root}")
    return ordered


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GuestKernelError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout
