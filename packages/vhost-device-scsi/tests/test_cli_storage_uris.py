"""Storage URIs on the command line: parsed into LUNs, and one clear error line at start-up
for a bad URI, an unreachable NBD server or missing Ceph bindings / image."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from vhost_device_scsi.cli import CliError, ImageSpec, parse_args


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_device_scsi", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vhost-device-scsi: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_uris_become_luns() -> None:
    opts = parse_args(
        [
            "--socket-path",
            "s",
            "nbd://127.0.0.1:10809/disk",
            "3=nbd+unix:///e?socket=/run/n.sock",
            "rbd:rbd/vm?conf=/etc/ceph/ceph.conf&id=admin",
            "file:/x.img?direct=on",
        ]
    )
    assert opts.images == (
        ImageSpec(0, "nbd://127.0.0.1:10809/disk"),
        ImageSpec(3, "nbd+unix:///e?socket=/run/n.sock"),
        ImageSpec(4, "rbd:rbd/vm?conf=/etc/ceph/ceph.conf&id=admin"),
        ImageSpec(5, "file:/x.img?direct=on"),
    )


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("nbd://h:70000/x", "Port out of range"),
        ("nbd+unix:///x", "needs ?socket=PATH"),
        ("rbd:pool", "expected rbd:POOL/IMAGE"),
        ("file:x?direct=sometimes", "not on/off"),
    ],
)
def test_bad_uri_is_caught_while_parsing(uri: str, needle: str) -> None:
    with pytest.raises(CliError, match="bad storage location") as info:
        parse_args(["--socket-path", "s", uri])
    assert needle in str(info.value)


def test_bad_uri_one_line(tmp_path: Path) -> None:
    proc = run_cli("--socket-path", str(tmp_path / "s"), "nbds://h/x")
    one_error_line(proc, "bad storage location", "nbds")
    assert not (tmp_path / "s").exists()


def test_unreachable_nbd_server_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("--socket-path", str(tmp_path / "s"), f"nbd://127.0.0.1:{port}/disk")
    one_error_line(proc, "cannot reach NBD server", f"127.0.0.1:{port}", "refused")
    assert not (tmp_path / "s").exists()


def test_rbd_without_cluster_one_line(tmp_path: Path) -> None:
    """Without librbd (Debian librbd1) or without a reachable cluster: one line either way."""
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\n")
    proc = run_cli("--socket-path", str(tmp_path / "s"), f"rbd:rbd/img?conf={conf}")
    line = one_error_line(proc, "librbd1" if "librbd1" in proc.stderr else "rbd:rbd/img")
    assert "Traceback" not in line
