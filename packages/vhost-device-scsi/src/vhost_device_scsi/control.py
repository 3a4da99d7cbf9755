"""The daemon's control socket: one-line commands to hot-plug, unplug and resize LUNs.

Holds the command grammar (a sans-IO parser turning a line into a command dataclass), a trio
server that reads lines from a unix socket and answers each with one line, and a blocking client
for scripts and tests. It knows nothing about virtio, SCSI or images: the daemon passes in the
function that carries a command out.

Protocol: the client sends one command per line (UTF-8, shell-style quoting for paths with
spaces); the daemon answers each with exactly one line starting `ok` or `error:`.

    add-lun N IMAGE [--read-only] [--solid-state] [--block-size B] [--write-cache on|off]
    remove-lun N
    resize N          re-read the image size of LUN N and announce the new capacity
    list              one line: `ok N:IMAGE[:ro] ...`
"""

from __future__ import annotations

import argparse
import logging
import shlex
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# trio 0.22 ships no type information; newer trio does.
import trio
from scsi_core.lun import MAX_LUN

__all__ = [
    "MAX_LINE",
    "AddLun",
    "Command",
    "ControlError",
    "ListLuns",
    "RemoveLun",
    "ResizeLun",
    "parse_command",
    "send_command",
    "serve_control",
]

logger = logging.getLogger(__name__)

#: Longest command line accepted; a longer one is answered with an error and the connection closed.
MAX_LINE = 4096


class ControlError(Exception):
    """A control command is malformed or cannot be carried out; the message is for the client."""


@dataclass(frozen=True, slots=True)
class AddLun:
    """`add-lun`: attach IMAGE as LUN `lun`."""

    lun: int
    image: str
    read_only: bool = False
    solid_state: bool = False
    block_size: int | None = None
    write_cache: bool | None = None


@dataclass(frozen=True, slots=True)
class RemoveLun:
    """`remove-lun`: detach LUN `lun`."""

    lun: int


@dataclass(frozen=True, slots=True)
class ResizeLun:
    """`resize`: re-read LUN `lun`'s image size and announce a capacity change."""

    lun: int


@dataclass(frozen=True, slots=True)
class ListLuns:
    """`list`: report the attached LUNs."""


Command = AddLun | RemoveLun | ResizeLun | ListLuns


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ControlError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise ControlError(message or "bad command")


def _on_off(text: str) -> bool:
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


_ADD = _Parser(prog="add-lun", add_help=False, exit_on_error=False)
_ADD.add_argument("lun")
_ADD.add_argument("image")
_ADD.add_argument("--read-only", action="store_true")
_ADD.add_argument("--solid-state", action="store_true")
_ADD.add_argument("--block-size", type=int)
_ADD.add_argument("--write-cache", type=_on_off)


def _lun_number(text: str) -> int:
    try:
        lun = int(text, 10)
    except ValueError:
        raise ControlError(f"LUN must be a number, not {text!r}") from None
    if not 0 <= lun <= MAX_LUN:
        raise ControlError(f"LUN {lun} is outside 0..{MAX_LUN}")
    return lun


def parse_command(line: str) -> Command:
    """Parse one command line; raises ControlError with a message fit for the client."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ControlError(f"cannot split command: {exc}") from None
    if not words:
        raise ControlError("empty command")
    verb, args = words[0], words[1:]
    if verb == "add-lun":
        try:
            ns = _ADD.parse_args(args)
        except argparse.ArgumentError as exc:
            raise ControlError(str(exc)) from None
        return AddLun(
            lun=_lun_number(ns.lun),
            image=ns.image,
            read_only=ns.read_only,
            solid_state=ns.solid_state,
            block_size=ns.block_size,
            write_cache=ns.write_cache,
        )
    if verb in ("remove-lun", "resize"):
        if len(args) != 1:
            raise ControlError(f"usage: {verb} LUN")
        lun = _lun_number(args[0])
        return RemoveLun(lun) if verb == "remove-lun" else ResizeLun(lun)
    if verb == "list":
        if args:
            raise ControlError("usage: list")
        return ListLuns()
    raise ControlError(f"unknown command {verb!r} (add-lun, remove-lun, resize, list)")


Handler = Callable[[Command], Awaitable[str]]


async def _answer(handler: Handler, line: bytes) -> str:
    try:
        command = parse_command(line.decode("utf-8", errors="replace"))
        detail = await handler(command)
    except ControlError as exc:
        return f"error: {exc}"
    except Exception as exc:  # never let a command kill the daemon
        logger.exception("control command %r failed", line)
        return f"error: {exc}"
    return f"ok {detail}".rstrip()


async def _serve_client(stream: trio.SocketStream, handler: Handler) -> None:
    buffer = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(MAX_LINE)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    answer = await _answer(handler, line)
                    try:
                        await stream.send_all(answer.encode() + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
            if len(buffer) > MAX_LINE:
                with trio.move_on_after(1):
                    await stream.send_all(b"error: command line too long\n")
                return


async def serve_control(
    listener: socket.socket,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve control connections on a bound, listening unix socket until cancelled.

    Each line is parsed and passed to `handler`, whose string becomes the `ok` answer; a
    ControlError (or any other exception) becomes an `error:` answer.
    """
    tlistener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await tlistener.accept()
            nursery.start_soon(_serve_client, stream, handler)


def send_command(path: str, line: str, timeout: float = 10.0) -> str:
    """Send one command to the control socket at `path` and return the answer line (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.rstrip("\n").encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", errors="replace").rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m vhost_device_scsi.control SOCKET COMMAND...`: send one command, print the answer.

    Exit status 0 for an `ok` answer, 1 for `error:` or when the socket cannot be reached.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.stderr.write("usage: python -m vhost_device_scsi.control SOCKET COMMAND [ARGS...]\n")
        return 2
    try:
        answer = send_command(args[0], shlex.join(args[1:]))
    except OSError as exc:
        sys.stderr.write(f"error: cannot reach control socket {args[0]}: {exc.strerror or exc}\n")
        return 1
    print(answer)
    return 0 if answer.startswith("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
