"""A single-node Ceph cluster for tests and benchmarks: one mon and one memstore OSD on 127.0.0.1.

The recipe of ../shared/backends.md (no mgr, no cephadm, loopback only, about 10 s to start).
Plain functions, no pytest: tests/backends/conftest.py wraps them in a fixture and
benchmarks/host_backends_bench.py uses them directly.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import uuid

__all__ = ["CEPH_TOOLS", "CephStartError", "ceph_down", "start_ceph"]

#: The command-line tools the recipe runs.
CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd", "rados")


class CephStartError(RuntimeError):
    """A step of the bring-up failed; the message names the command and its stderr."""


CEPH_CONF = """\
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
memstore device bytes = {memstore_bytes}
osd memory target = 939524096
osd max object name len = 256
osd max object namespace len = 64
"""


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now (all held at once while they are picked, so two
    picks cannot return the same port)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def ceph_down(root: pathlib.Path) -> None:
    """Stop every daemon whose pid file is under ``root/run`` (SIGTERM, then SIGKILL after 10 s)."""
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


def start_ceph(root: pathlib.Path, *, memstore_bytes: int = 1 << 30) -> pathlib.Path:
    """Bring a cluster up in the empty directory ``root`` with pool ``rbd``; returns ceph.conf.

    Raises CephStartError (after stopping whatever started) if a step fails. The caller stops
    the cluster with ``ceph_down(root)``. A monitor port taken between picking it and binding
    it (the machine is busy with other tests' connections) is retried with new ports, twice.
    """
    for attempt in range(3):
        try:
            return _start_once(root, memstore_bytes)
        except CephStartError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
        for child in root.iterdir():  # start again from an empty directory
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
    raise AssertionError("unreachable")


def _start_once(root: pathlib.Path, memstore_bytes: int) -> pathlib.Path:
    for sub in ("mon.a", "osd.0", "run", "log", "crash"):
        (root / sub).mkdir()
    conf = root / "ceph.conf"
    fsid = str(uuid.uuid4())
    v2, v1 = _free_ports(2)
    conf.write_text(
        CEPH_CONF.format(fsid=fsid, v2=v2, v1=v1, dir=root, memstore_bytes=memstore_bytes)
    )
    env = {**os.environ, "CEPH_CONF": str(conf)}

    def run(*argv: str) -> str:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise CephStartError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    try:
        keyring = str(root / "keyring")
        run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
            "--cap", "mon", "allow *")  # fmt: skip
        run(
            "ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
            "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *",
        )  # fmt: skip
        monmap = str(root / "monmap")
        addr = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", addr, monmap)
        run("ceph-mon", "--id", "a", "--mkfs", "--monmap", monmap, "--keyring", keyring)
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
    except (CephStartError, subprocess.TimeoutExpired) as exc:
        ceph_down(root)
        raise CephStartError(str(exc)) from None
    return conf
