"""Fixtures that start real storage servers on 127.0.0.1 for the back-end tests.

nbdkit and qemu-nbd run in the foreground, started by the fixture that uses them (with
``--exit-with-parent`` where available) and killed by it; loop devices come from
``losetup``; a single-node Ceph cluster (one mon, one memstore OSD, no mgr) is brought up
once per session from the recipe in ../shared/backends.md. Each fixture skips with the
reason when its tools are missing (scripts/install-deps installs them) or not permitted.
Registers the ``backends`` marker.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.backends.servers import (  # noqa: E402
    CephCluster,
    LoopDevice,
    NbdServer,
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


_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public network = 127.0.0.1/32
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {dir}/keyring
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
pid file = {dir}/run/$name.pid
log file = {dir}/log/$name.log
log to stderr = false
err to stderr = true
crash dir = {dir}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
auth allow insecure global id reclaim = false
osd pool default pg autoscale mode = off
osd objectstore = memstore
[client]
admin socket = {dir}/run/$name.$pid.asok
rbd cache = false
[mon]
mon data = {dir}/mon.$id
mon cluster log file = {dir}/log/cluster.log
[osd]
osd data = {dir}/osd.$id
keyring = {dir}/$name/keyring
osd journal size = 100
memstore device bytes = 1073741824
osd memory target = 939524096
osd max object name len = 256
osd max object namespace len = 64
"""


def _ceph_down(root: pathlib.Path) -> None:
    pids = []
    for pidfile in sorted((root / "run").glob("*.pid")):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One mon + one memstore OSD on 127.0.0.1 with pool ``rbd`` (about 10 s to start)."""
    for tool in ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd"):
        require(tool)
    try:
        importlib.import_module("rados")
        importlib.import_module("rbd")
    except ImportError:
        pytest.skip(
            "the Ceph Python bindings do not import under this interpreter: run under "
            "/usr/bin/python3 with --system-site-packages (nox -s backends does)"
        )
    root = tmp_path_factory.mktemp("ceph")
    for sub in ("mon.a", "osd.0", "run", "log", "crash"):
        (root / sub).mkdir()
    conf = root / "ceph.conf"
    fsid = str(uuid.uuid4())
    v2, v1 = free_port(), free_port()
    conf.write_text(_CEPH_CONF.format(fsid=fsid, v2=v2, v1=v1, dir=root))
    env = {**os.environ, "CEPH_CONF": str(conf)}

    def run(*argv: str) -> str:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            _ceph_down(root)
            pytest.fail(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    keyring = str(root / "keyring")
    run(
        "ceph-authtool",
        "--create-keyring",
        keyring,
        "--gen-key",
        "-n",
        "mon.",
        "--cap",
        "mon",
        "allow *",
    )
    run(
        "ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
        "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *",
    )  # fmt: skip
    monmap = str(root / "monmap")
    addr = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
    run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", addr, monmap)
    run("ceph-mon", "--id", "a", "--mkfs", "--monmap", monmap, "--keyring", keyring)
    try:
        run("ceph-mon", "--id", "a")
        run("ceph", "-s", "--connect-timeout", "30")
        osd = run("ceph", "osd", "create").strip()
        run(
            "ceph", "auth", "get-or-create", f"osd.{osd}", "mon", "allow profile osd", "mgr",
            "allow profile osd", "osd", "allow *", "-o", str(root / f"osd.{osd}" / "keyring"),
        )  # fmt: skip
        run("ceph-osd", "--id", osd, "--mkfs", "--osd-uuid", str(uuid.uuid4()))
        run("ceph-osd", "--id", osd)
        for _ in range(240):
            if f"osd.{osd} up" in run("ceph", "osd", "dump"):
                break
            time.sleep(0.25)
        run("ceph", "osd", "pool", "create", "rbd", "8", "8", "replicated")
        run("ceph", "osd", "pool", "set", "rbd", "size", "1", "--yes-i-really-mean-it")
        run("rbd", "pool", "init", "rbd")
        probe = root / "probe"
        probe.write_text("probe")
        run("rados", "-p", "rbd", "put", "probe", str(probe))
        run("rados", "-p", "rbd", "rm", "probe")
        yield CephCluster(conf, root)
    finally:
        _ceph_down(root)
