"""Helpers and records of the back-end test fixtures: free ports, waiting for a server to
listen, the running NBD server, loop device and Ceph cluster the fixtures hand out."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(address: tuple[str, int] | str, proc: subprocess.Popen[bytes], what: str) -> None:
    """Until ``address`` accepts a connection (or ``proc`` died: fail with its stderr)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"{what} exited with {proc.returncode}: {err.strip()}")
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family) as s, contextlib.suppress(OSError):
            s.connect(address)
            return
        time.sleep(0.01)
    pytest.fail(f"{what} did not start listening")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (run scripts/install-deps)")
    return path


@dataclass
class NbdServer:
    """A running NBD server: ``uri`` to connect to, ``argv`` to start it again."""

    uri: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    address: tuple[str, int] | str
    image: pathlib.Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE)
        wait_for(self.address, self.proc, self.argv[0])


def start_nbd(argv: list[str], uri: str, address: tuple[str, int] | str) -> NbdServer:
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    wait_for(address, proc, argv[0])
    return NbdServer(uri, argv, proc, address)


def nbdkit_argv(port: int, *plugin: str, filters: tuple[str, ...] = ()) -> list[str]:
    argv = [require("nbdkit"), "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port)]
    for f in filters:
        argv += ["--filter", f]
    return argv + list(plugin)


@dataclass
class LoopDevice:
    path: str
    backing: pathlib.Path


@dataclass
class CephCluster:
    conf: pathlib.Path
    dir: pathlib.Path


@contextlib.contextmanager
def ceph_cluster_in(root: pathlib.Path) -> Iterator[CephCluster]:
    """One mon + one memstore OSD on 127.0.0.1 with pool ``rbd`` in the empty ``root`` (about
    10 s to start), stopped afterwards; skips without the Ceph tools or librbd (the RBD
    back-end needs librbd itself, through ctypes, not Ceph's Python bindings)."""
    from scsi_emulation.backend import BackendError
    from scsi_emulation.backends import librbd

    from tests.backends.ceph import CEPH_TOOLS, CephStartError, ceph_down, start_ceph

    for tool in CEPH_TOOLS:
        require(tool)
    try:
        librbd.load()
    except BackendError as exc:
        pytest.skip(str(exc))
    try:
        conf = start_ceph(root)
    except CephStartError as exc:
        pytest.fail(str(exc))
    try:
        yield CephCluster(conf, root)
    finally:
        ceph_down(root)
