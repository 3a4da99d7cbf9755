"""The guest's initramfs: a cached busybox base archive plus a small per-run overlay.

Holds choosing what goes into the base (busybox, the guest kernel's modules, host tools such as
sg3_utils, fio and e2fsprogs with the shared libraries ``ldd`` lists, and the guest-side shell
files in ``guest_files/``), caching the built archive under a key of its inputs, and writing
the overlay (the test script and extra files) that the kernel unpacks on top. Knows nothing
about QEMU or about what a test checks.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.e2e.cpio_newc import NewcWriter
from tests.e2e.guest_kernel import GuestKernel

__all__ = [
    "GUEST_FILES_DIR",
    "HOST_TOOLS",
    "InitramfsError",
    "build_base",
    "build_overlay",
]

#: Host programs copied into the guest's /usr/bin (by name, found on the host's sbin/bin
#: path), with the libraries they link. Busybox supplies everything else; its shell prefers
#: its own applets, which is why the guest scripts run under bash.
HOST_TOOLS: tuple[str, ...] = (
    "bash",
    "dd",
    "cmp",
    "sg_*",
    "fio",
    "mke2fs",
    "e2fsck",
    "blkdiscard",
    "blockdev",
)

#: Guest paths -> link targets added after the tools.
_SYMLINKS: Mapping[str, str] = {
    "/bin/bash": "/usr/bin/bash",
    "/usr/bin/mkfs.ext4": "mke2fs",
    "/usr/bin/fsck.ext4": "e2fsck",
    "/etc/mtab": "/proc/self/mounts",
}

#: Host configuration files copied as they are, when present.
_HOST_FILES: tuple[str, ...] = ("/etc/mke2fs.conf",)

GUEST_FILES_DIR = Path(__file__).resolve().parent / "guest_files"
_SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")
_LDD_PATH = re.compile(r"(/\S+)")
#: Bump to rebuild every cached archive when the layout changes.
_LAYOUT_VERSION = "1"


class InitramfsError(RuntimeError):
    """A tool the guest needs is missing on the host, or the archive cannot be built."""


def build_base(kernel: GuestKernel, cache_dir: Path) -> Path:
    """Return the cached base initramfs for ``kernel``, building it if its inputs changed."""
    busybox = _find_busybox()
    tools = _find_tools()
    key = _cache_key(kernel, busybox, tools)
    target = cache_dir / f"initramfs-{key}.cpio"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    try:
        with partial.open("wb") as out:
            _write_base(NewcWriter(out), kernel, busybox, tools)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    for stale in cache_dir.glob("initramfs-*.cpio"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def build_overlay(files: Mapping[str, bytes]) -> bytes:
    """A second archive holding ``files`` (guest path -> content), unpacked over the base.

    Directories the base lacks are created; ``.sh`` files are made executable.
    """
    buffer = io.BytesIO()
    writer = NewcWriter(buffer)
    made: set[str] = set()
    for path in sorted(files):
        for parent in _parents(path):
            if parent not in made:
                writer.directory(parent)
                made.add(parent)
        mode = 0o755 if path.endswith(".sh") else 0o644
        writer.file(path, files[path], mode)
    writer.close()
    return buffer.getvalue()


def _find_busybox() -> Path:
    for candidate in _BUSYBOX_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise InitramfsError("busybox not found: run scripts/install-deps (busybox-static)")


def _find_tools() -> list[Path]:
    tools: list[Path] = []
    for name in HOST_TOOLS:
        if "*" in name:
            by_name: dict[str, Path] = {}
            for directory in _SEARCH_PATH.split(":"):
                for match in sorted(glob.glob(f"{directory}/{name}")):
                    by_name.setdefault(Path(match).name, Path(match))
            if not by_name:
                raise InitramfsError(f"no {name} on the host: run scripts/install-deps")
            tools.extend(by_name[n] for n in sorted(by_name))
            continue
        found = shutil.which(name, path=_SEARCH_PATH)
        if found is None:
            raise InitramfsError(f"{name} not found on the host: run scripts/install-deps")
        tools.append(Path(found))
    return tools


def _cache_key(kernel: GuestKernel, busybox: Path, tools: Iterable[Path]) -> str:
    """Digest of everything the archive is built from.

    Libraries are covered by dpkg's status file, which changes whenever a package is
    installed or upgraded, so ``ldd`` need not run just to check the cache.
    """
    digest = hashlib.sha256(_LAYOUT_VERSION.encode())
    digest.update(kernel.version.encode())
    inputs = [busybox, *tools, *kernel.modules, Path("/var/lib/dpkg/status")]
    for path in inputs:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for guest_file in sorted(GUEST_FILES_DIR.iterdir()):
        digest.update(guest_file.name.encode() + b"\0" + guest_file.read_bytes())
    return digest.hexdigest()[:16]


def _libraries(binaries: Iterable[Path]) -> list[str]:
    """Every shared library (and the dynamic loader) the binaries load, as ldd names them."""
    libs: set[str] = set()
    for binary in binaries:
        result = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            continue  # static binary ("not a dynamic executable")
        for line in result.stdout.splitlines():
            match = _LDD_PATH.search(line.split("=>")[-1])
            if match:
                libs.add(match.group(1))
    return sorted(libs)


def _write_base(writer: NewcWriter, kernel: GuestKernel, busybox: Path, tools: list[Path]) -> None:
    files: dict[str, Path] = {"/bin/busybox": busybox}
    for tool in tools:
        files[f"/usr/bin/{tool.name}"] = tool
    for lib in _libraries(tools):
        files[lib] = Path(lib)
    for module in kernel.modules:
        files[f"/lib/modules/e2e/{module.name}"] = module
    for host_file in _HOST_FILES:
        if Path(host_file).is_file():
            files[host_file] = Path(host_file)
    guest_files = {
        "/init": GUEST_FILES_DIR / "init",
        "/e2e/run.sh": GUEST_FILES_DIR / "run.sh",
        "/e2e/lib.sh": GUEST_FILES_DIR / "lib.sh",
    }
    files.update(guest_files)

    directories = {"/dev", "/proc", "/sys", "/tmp", "/mnt", "/run", "/etc", "/e2e"}
    for path in [*files, *_SYMLINKS]:
        directories.update(_parents(path))
    for directory in sorted(directories):
        writer.directory(directory, 0o1777 if directory == "/tmp" else 0o755)
    # The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    writer.char_device("/dev/console", 5, 1)
    for guest_path in sorted(files):
        host_path = files[guest_path]
        executable = guest_path in guest_files or os.access(host_path, os.X_OK)
        # read_bytes follows symlinks: libraries are stored under the name ldd printed.
        writer.file(guest_path, host_path.read_bytes(), 0o755 if executable else 0o644)
    order = "".join(f"{module.name}\n" for module in kernel.modules)
    writer.file("/lib/modules/e2e/modules.order", order.encode())
    for link, target in _SYMLINKS.items():
        writer.symlink(link, target)
    writer.close()


def _parents(path: str) -> list[str]:
    """The ancestors of an absolute guest path, outermost first, without "/"."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
