"""The control-socket grammar and its trio server."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import trio
from vhost_device_scsi.control import (
    AddLun,
    Command,
    ControlError,
    ListLuns,
    RemoveLun,
    ResizeLun,
    parse_command,
    send_command,
    serve_control,
)


def test_parse_add_lun_with_options() -> None:
    cmd = parse_command(
        "add-lun 300 '/tmp/my image.raw' --read-only --block-size 4096 --write-cache off"
    )
    assert cmd == AddLun(300, "/tmp/my image.raw", True, False, 4096, False)


def test_parse_simple_commands() -> None:
    assert parse_command("remove-lun 3") == RemoveLun(3)
    assert parse_command("resize 0") == ResizeLun(0)
    assert parse_command("list") == ListLuns()


@pytest.mark.parametrize(
    "line",
    [
        "",
        "frobnicate",
        "add-lun",
        "add-lun x img",
        "add-lun 16384 img",
        "add-lun 1 img --write-cache maybe",
        "add-lun 1 img --bogus",
        "remove-lun",
        "remove-lun 1 2",
        "resize -1",
        "list extra",
        "add-lun 1 'unterminated",
    ],
)
def test_parse_errors_are_typed(line: str) -> None:
    with pytest.raises(ControlError):
        parse_command(line)


async def test_server_answers_one_line_per_command() -> None:
    seen: list[Command] = []

    async def handler(cmd: Command) -> str:
        seen.append(cmd)
        if isinstance(cmd, RemoveLun):
            raise ControlError("no LUN 9")
        if isinstance(cmd, ResizeLun):
            raise RuntimeError("boom")
        return "0:img"

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ctl")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, listener, handler)
            answers = [
                await trio.to_thread.run_sync(send_command, path, line)
                for line in ("list", "remove-lun 9", "resize 1", "nonsense")
            ]
            nursery.cancel_scope.cancel()
    assert answers[0] == "ok 0:img"
    assert answers[1] == "error: no LUN 9"
    assert answers[2] == "error: boom"
    assert answers[3].startswith("error: unknown command")
    assert seen == [ListLuns(), RemoveLun(9), ResizeLun(1)]
