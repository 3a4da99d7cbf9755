"""The command line as an operator meets it: one-line errors, stale sockets, clean signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vhost_device_scsi.cli import CliError, ImageSpec, parse_args


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_device_scsi", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


def test_image_specs_and_defaults() -> None:
    opts = parse_args(["--socket-path", "/tmp/x.sock", "a.img", "300=b.img", "c.img", "5=d"])
    assert opts.images == (
        ImageSpec(0, "a.img"),
        ImageSpec(300, "b.img"),
        ImageSpec(301, "c.img"),
        ImageSpec(5, "d"),
    )
    assert opts.control_socket == "/tmp/x.sock.ctl"
    assert (opts.num_queues, opts.block_size, opts.write_cache) == (1, 512, True)
    assert opts.poll_max_us == 256
    assert parse_args(["--socket-path", "s", "--poll-max-us", "0", "a"]).poll_max_us == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--socket-path", "s", "0=a", "0=b"],
        ["--socket-path", "s", "16384=a"],
        ["--socket-path", "s", "--num-queues", "500", "a"],
        ["--socket-path", "s", "--queue-size", "100", "a"],
        ["--socket-path", "s", "--control-socket", "none"],
    ],
)
def test_semantic_errors(argv: list[str]) -> None:
    with pytest.raises(CliError):
        parse_args(argv)


def _one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vhost-device-scsi: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_image(tmp_path: Path) -> None:
    proc = run_cli("--socket-path", str(tmp_path / "s"), str(tmp_path / "nope.img"))
    _one_error_line(proc, "cannot open image", "nope.img", "No such file")
    assert not (tmp_path / "s").exists()


def test_bad_options(tmp_path: Path, image: Path) -> None:
    _one_error_line(run_cli(str(image)), "--socket-path")
    _one_error_line(run_cli("--socket-path", "s", "--block-size", "1000", str(image)), "1000")
    _one_error_line(run_cli("--socket-path", "s", "--write-cache", "maybe", str(image)), "maybe")
    _one_error_line(run_cli("--socket-path", "s", "--frobnicate", str(image)), "frobnicate")
    _one_error_line(run_cli("--socket-path", "s", "--poll-max-us", "-5", str(image)), "-5")


def test_socket_in_use_and_not_a_socket(tmp_path: Path, image: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen()
        _one_error_line(run_cli("--socket-path", path, str(image)), "in use")
    regular = tmp_path / "file"
    regular.write_text("x")
    _one_error_line(run_cli("--socket-path", str(regular), str(image)), "not a socket")


def test_unreadable_image(tmp_path: Path, image: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can open any file")
    image.chmod(0)
    _one_error_line(run_cli("--socket-path", str(tmp_path / "s"), str(image)), "Permission")


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stale_socket_replaced_and_signal_exits_cleanly(
    tmp_path: Path, image: Path, sig: signal.Signals
) -> None:
    path = tmp_path / "v.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a dead daemon's leftover
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost_device_scsi", "--socket-path", str(path), str(image)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ctl = Path(str(path) + ".ctl")
        _wait_for(ctl, proc)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))  # really listening now
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert not path.exists() and not ctl.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
