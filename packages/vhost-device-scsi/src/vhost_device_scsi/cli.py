"""The `vhost-device-scsi` command line: parse and check options, then run the daemon.

Holds the argument grammar, the checks that turn every operator mistake (missing or unreadable
image, socket path in use, bad option) into one line on stderr and a non-zero exit, and the
handling of the listening socket (stale socket files are removed, `--socket-fd` is validated).
Knows nothing about virtio or SCSI beyond the option values it passes on to `daemon`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from scsi_core.lun import assign_luns

__all__ = ["CliError", "DaemonOptions", "ImageSpec", "main", "parse_args", "prepare_listener"]

PROG = "vhost-device-scsi"
MAX_REQUEST_QUEUES = 128
BLOCK_SIZES = (512, 4096)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Busy polling's cap (vhost_user.BusyPoll). Remote storage answers in ~25 us (NBD on the
#: same host) to ~150 us (Ceph): the window grows only as far as the waits it would have
#: caught, and shrinks to nothing when they are longer than this. Measured in
#: benchmarks/host_backends_bench.py; see the README's Speed section.
DEFAULT_POLL_MAX_US = 256


class CliError(Exception):
    """An operator mistake; the message is the whole stderr line (without the prefix)."""


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One positional image: `[LUN=]PATH`."""

    lun: int
    path: str


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """Everything the daemon needs, validated."""

    images: tuple[ImageSpec, ...]
    socket_path: str | None = None
    socket_fd: int | None = None
    control_socket: str | None = None
    read_only: bool = False
    solid_state: bool = False
    num_queues: int = 1
    block_size: int = 512
    write_cache: bool = True
    queue_size: int = 1024
    #: Longest busy poll before the loop sleeps, in microseconds (0: never poll).
    poll_max_us: int = DEFAULT_POLL_MAX_US
    log_level: str = "info"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


_positive = _at_least(1)
_non_negative = _at_least(0)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text == "on"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for --help text and tests)."""
    p = _Parser(
        prog=PROG,
        description=(
            "A vhost-user virtio-scsi device: serves image files as SCSI disks (LUNs of "
            "target 0) to a QEMU guest attached with -device vhost-user-scsi-pci."
        ),
        epilog=(
            "Images are raw files or block devices (PATH, file:PATH, file:PATH?direct=on for "
            "O_DIRECT), NBD exports (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH) "
            "or Ceph RBD images (rbd:POOL/IMAGE[?conf=PATH&id=USER]), one LUN each, numbered "
            "0, 1, ... in order; write N=IMAGE to choose LUN N (0..16383). The control socket "
            "takes line commands (add-lun, remove-lun, resize, list): see the README."
        ),
    )
    p.add_argument(
        "images", nargs="*", metavar="[LUN=]IMAGE", help="image file, device or URI per LUN"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", metavar="PATH", help="unix socket to listen on")
    where.add_argument(
        "--socket-fd", type=int, metavar="FD", help="an already listening unix socket (activation)"
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes on every LUN")
    p.add_argument("--solid-state", action="store_true", help="report non-rotational media")
    p.add_argument(
        "--num-queues",
        type=_positive,
        default=1,
        metavar="N",
        help=f"request queues (1..{MAX_REQUEST_QUEUES}, default 1)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=512,
        choices=BLOCK_SIZES,
        metavar="BYTES",
        help="logical block size: 512 (default) or 4096",
    )
    p.add_argument(
        "--write-cache",
        type=_on_off,
        default=True,
        metavar="on|off",
        help="volatile write cache (on: writes complete before fdatasync; off: every write "
        "is durable). Default on",
    )
    p.add_argument(
        "--queue-size",
        type=_positive,
        default=1024,
        metavar="N",
        help="largest virtqueue accepted (power of two, default 1024)",
    )
    p.add_argument(
        "--poll-max-us",
        type=_non_negative,
        default=DEFAULT_POLL_MAX_US,
        metavar="US",
        help="poll for up to US microseconds before sleeping while few requests are in "
        "flight (adaptive, like QEMU's poll-max-ns; trades CPU for latency); 0 disables "
        "spinning. "
        f"Default {DEFAULT_POLL_MAX_US}",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control socket for hot-plug commands (default: SOCKET-PATH.ctl; 'none' to disable)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    return p


def _check_location(item: str, path: str) -> None:
    """A URI that does not parse is an operator mistake caught before anything is opened."""
    from scsi_emulation.backends.uri import LocationError, parse_location

    try:
        parse_location(path)
    except LocationError as exc:
        raise CliError(f"bad storage location {exc}") from None


def _image_specs(items: Sequence[str]) -> tuple[ImageSpec, ...]:
    try:
        assigned = assign_luns(items)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    specs: list[ImageSpec] = []
    for (lun, path), item in zip(assigned, items, strict=True):
        if not path:
            raise CliError(f"no image path in {item!r}")
        _check_location(item, path)
        specs.append(ImageSpec(lun, path))
    return tuple(specs)


def parse_args(argv: Sequence[str] | None = None) -> DaemonOptions:
    """Parse and validate; raises CliError (or SystemExit from argparse for syntax errors)."""
    ns = build_parser().parse_args(argv)
    if ns.num_queues > MAX_REQUEST_QUEUES:
        raise CliError(f"--num-queues {ns.num_queues} is more than {MAX_REQUEST_QUEUES}")
    if ns.queue_size & (ns.queue_size - 1) or ns.queue_size > 32768:
        raise CliError(f"--queue-size {ns.queue_size} is not a power of two up to 32768")
    control = ns.control_socket
    if control is None and ns.socket_path is not None:
        control = ns.socket_path + ".ctl"
    if control == "none":
        control = None
    images = _image_specs(ns.images)
    if not images and control is None:
        raise CliError("no images given (and no control socket to add them later)")
    return DaemonOptions(
        images=images,
        socket_path=ns.socket_path,
        socket_fd=ns.socket_fd,
        control_socket=control,
        read_only=ns.read_only,
        solid_state=ns.solid_state,
        num_queues=ns.num_queues,
        block_size=ns.block_size,
        write_cache=ns.write_cache,
        queue_size=ns.queue_size,
        poll_max_us=ns.poll_max_us,
        log_level=ns.log_level,
    )


# -- sockets ------------------------------------------------------------------------------------


def _claim_path(path: str, what: str) -> None:
    """Make `path` free for bind(): refuse a live listener or a non-socket, remove a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CliError(f"{what} {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise CliError(f"{what} {path}: {exc.strerror}") from None
        # Nobody listens: a stale file from a daemon that died. Safe to replace.
        os.unlink(path)
        return
    finally:
        probe.close()
    raise CliError(f"{what} {path} is in use by a running process")


def bind_unix(path: str, what: str) -> socket.socket:
    """A listening unix socket at `path` (after `_claim_path`); CliError when impossible."""
    _claim_path(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {what} {path}: {exc.strerror}") from None
    return sock


def prepare_listener(options: DaemonOptions) -> socket.socket:
    """The vhost-user listening socket: bound at --socket-path, or the inherited --socket-fd."""
    if options.socket_path is not None:
        return bind_unix(options.socket_path, "socket path")
    fd = options.socket_fd
    assert fd is not None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise CliError(f"--socket-fd {fd}: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise CliError(f"--socket-fd {fd} is not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise CliError(f"--socket-fd {fd} is not listening")
    return sock


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(1)


class _Stop(Exception):
    """SIGTERM/SIGINT before the event loop took signals over."""


def _early_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse, open the images and sockets, serve until SIGINT/SIGTERM."""
    # Imported here so that `--help` and option errors stay fast.
    from .daemon import Daemon, DaemonError

    try:
        options = parse_args(argv)
    except CliError as exc:
        _fail(str(exc))
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A signal that arrives while starting up must still end in a clean exit (trio installs
    # its own handlers once the daemon runs, and puts these back afterwards).
    signal.signal(signal.SIGTERM, _early_stop)
    signal.signal(signal.SIGINT, _early_stop)
    daemon = None
    try:
        daemon = Daemon.open(options)
        daemon.run()
    except (CliError, DaemonError) as exc:
        _fail(str(exc))
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        if daemon is not None:
            daemon.close()
