"""Starting and stopping our ``vhost-device-scsi`` daemon as a separate process.

Holds the daemon's command line (from a :class:`DaemonConfig`), waiting until its socket
listens (read from /proc/net/unix, so no probe connection is made that the daemon could take
for QEMU), and stopping it by its own PID. Knows nothing about guests or QEMU.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "DaemonConfig",
    "DaemonError",
    "RunningDaemon",
    "daemon_command",
]

_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags": the socket is listening


class DaemonError(RuntimeError):
    """The daemon exited or never listened; the message carries its output."""


@dataclass(frozen=True)
class DaemonConfig:
    """The options of one daemon; images become LUNs 0, 1, ... in order, or ``luns``."""

    images: tuple[Path, ...]
    num_queues: int = 1
    read_only: bool = False
    solid_state: bool = False
    block_size: int = 512
    write_cache: bool | None = None
    log_level: str = "info"
    #: Explicit LUN numbers, one per image (passed as ``LUN=PATH``).
    luns: tuple[int, ...] | None = None
    extra_args: tuple[str, ...] = ()

    def argv(self, socket_path: Path) -> list[str]:
        """The daemon's full command line."""
        argv = [
            *daemon_command(),
            "--socket-path", str(socket_path),
            "--num-queues", str(self.num_queues),
            "--block-size", str(self.block_size),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.read_only:
            argv.append("--read-only")
        if self.solid_state:
            argv.append("--solid-state")
        if self.write_cache is not None:
            argv += ["--write-cache", "on" if self.write_cache else "off"]
        argv += list(self.extra_args)
        if self.luns is None:
            argv += [str(image) for image in self.images]
        else:
            if len(self.luns) != len(self.images):
                raise ValueError("one LUN number per image")
            argv += [f"{lun}={image}" for lun, image in zip(self.luns, self.images, strict=True)]
        return argv


def daemon_command() -> list[str]:
    """How to start the daemon: its console script, else its CLI module under this Python."""
    script = shutil.which("vhost-device-scsi")
    if script is not None:
        return [script]
    return [
        sys.executable,
        "-c",
        "import sys; from vhost_device_scsi.cli import main; sys.exit(main())",
    ]


def _listening(path: Path) -> bool:
    try:
        table = Path("/proc/net/unix").read_text()
    except OSError:
        return path.exists()
    wanted = str(path)
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == wanted and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


class RunningDaemon:
    """A daemon process for the duration of a ``with`` block.

    Entering starts it and waits until its socket listens; leaving sends SIGTERM to its PID,
    then SIGKILL if it has not exited after ``stop_timeout`` seconds. Its stdout and stderr
    go to ``log_path``.
    """

    def __init__(
        self,
        argv: list[str],
        socket_path: Path,
        log_path: Path,
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.argv = argv
        self.socket_path = socket_path
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @classmethod
    def from_config(cls, config: DaemonConfig, socket_path: Path, log_path: Path) -> RunningDaemon:
        """A daemon with ``config``'s command line."""
        return cls(config.argv(socket_path), socket_path, log_path)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        if self.process is None:
            raise DaemonError("daemon not started")
        return self.process.pid

    def log(self) -> str:
        """Everything the daemon printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start the daemon and wait until it listens; DaemonError if it does not."""
        self.socket_path.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            try:
                self.process = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            except OSError as exc:
                raise DaemonError(f"cannot start {self.argv[0]}: {exc}") from exc
        deadline = time.monotonic() + self.start_timeout
        while not _listening(self.socket_path):
            if self.process.poll() is not None:
                raise DaemonError(
                    f"daemon exited with status {self.process.returncode} before listening"
                    f" on {self.socket_path}\n$ {' '.join(self.argv)}\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonError(
                    f"daemon did not listen on {self.socket_path} within"
                    f" {self.start_timeout}s\n$ {' '.join(self.argv)}\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Stop the daemon (SIGTERM, then SIGKILL) and return its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.returncode = process.returncode
        self.socket_path.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> RunningDaemon:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
