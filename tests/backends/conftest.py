"""Fixtures that start real storage servers on 127.0.0.1 for the back-end tests.

nbdkit and qemu-nbd run in the foreground, started by the fixture that uses them (with
``--exit-with-parent`` where available) and killed by it; loop devices come from
``losetup``; a single-node Ceph cluster (one mon, one memstore OSD, no mgr) is brought up
once per session from the recipe in ../shared/backends.md. Each fixture skips with the
reason when its tools are missing (scripts/install-deps installs them) or not permitted.
Registers the ``backends`` marker.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


from tests.backends.servers import (  # noqa: E402
    CephCluster,
    LoopDevice,
    NbdServer,
    ceph_cluster_in,
    free_port,
    nbdkit_argv,
    require,
    start_nbd,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends: needs real storage servers (nbdkit, qemu-nbd, Ceph, losetup)"
    )


@pytest.fixture
def nbdkit_memory() -> Iterator[NbdServer]:
    port = free_port()
    server = start_nbd(
        nbdkit_argv(port, "memory", "64M"), f"nbd://127.0.0.1:{port}/", ("127.0.0.1", port)
    )
    yield server
    server.stop()


@pytest.fixture
def nbdkit_unix(tmp_path: pathlib.Path) -> Iterator[NbdServer]:
    sock = str(tmp_path / "nbd.sock")
    argv = [require("nbdkit"), "--exit-with-parent", "-f", "-U", sock, "memory", "64M"]
    server = start_nbd(argv, f"nbd+unix:///?socket={sock}", sock)
    yield server
    server.stop()


@pytest.fixture
def qemu_nbd(tmp_path: pathlib.Path) -> Iterator[NbdServer]:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    port = free_port()
    argv = [
        require("qemu-nbd"), "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "disk",
        "--persistent", "--shared=8", "--discard=unmap", str(image),
    ]  # fmt: skip
    server = start_nbd(argv, f"nbd://127.0.0.1:{port}/disk", ("127.0.0.1", port))
    server.image = image
    yield server
    server.stop()


@pytest.fixture(params=["nbdkit-memory", "qemu-nbd", "nbdkit-unix"])
def nbd_server(request: pytest.FixtureRequest) -> NbdServer:
    """Each kind of NBD server in turn."""
    name = {"nbdkit-memory": "nbdkit_memory", "qemu-nbd": "qemu_nbd", "nbdkit-unix": "nbdkit_unix"}
    server: NbdServer = request.getfixturevalue(name[request.param])
    return server


@pytest.fixture
def nbdkit_custom() -> Iterator[object]:
    """Start nbdkit with a given plugin and filters: ``start(*plugin, filters=())``."""
    servers: list[NbdServer] = []

    def start(*plugin: str, filters: tuple[str, ...] = ()) -> NbdServer:
        port = free_port()
        server = start_nbd(
            nbdkit_argv(port, *plugin, filters=filters),
            f"nbd://127.0.0.1:{port}/",
            ("127.0.0.1", port),
        )
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


# -- loop devices ---------------------------------------------------------------------------


@pytest.fixture
def make_loop(tmp_path: pathlib.Path) -> Iterator[object]:
    """``make(size, sector=512, read_only=False) -> LoopDevice`` (detached afterwards)."""
    losetup = require("losetup")
    made: list[str] = []

    def make(size: int = 16 << 20, sector: int = 512, read_only: bool = False) -> LoopDevice:
        backing = tmp_path / f"loop{len(made)}.img"
        with backing.open("wb") as f:
            f.truncate(size)
        argv = [losetup, "-f", "--show", "-b", str(sector)]
        if read_only:
            argv.append("-r")
        proc = subprocess.run([*argv, str(backing)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"losetup is not permitted here: {proc.stderr.strip()}")
        path = proc.stdout.strip()
        made.append(path)
        return LoopDevice(path, backing)

    yield make
    for path in made:
        subprocess.run([losetup, "-d", path], check=False)


# -- Ceph -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One mon + one memstore OSD on 127.0.0.1 with pool ``rbd`` (about 10 s to start)."""
    with ceph_cluster_in(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
