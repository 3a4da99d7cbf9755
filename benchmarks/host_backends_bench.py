"""Host-driven benchmark on remote storage: our daemon vs qemu-storage-daemon, same back-end.

The instrument is ../shared/tools/vu-bench.c (see host_vu_bench.py): it keeps --qd 4 KiB
requests in flight on one request queue. Both daemons serve the same storage, one after the
other inside one run: an NBD export (nbdkit's memory plugin; our ``nbd://`` LU against
``--blockdev driver=nbd``) and, where Ceph and librbd are installed, an RBD
image on a single-node memstore cluster started here (our ``rbd:`` LU against
``--blockdev driver=rbd``). IOPS and the daemon's CPU time per request at queue depth 1 and
32, reads and writes, medians of --rounds interleaved rounds. Figures are printed, never
asserted; every piece whose tool is missing is skipped with a message.

memstore measures the clients, not Ceph: compare the two columns, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path: pathlib.Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sibling(name: str) -> ModuleType:
    """A module next to this script (``benchmarks/`` is not a package)."""
    return _load(pathlib.Path(__file__).with_name(name + ".py"))


_host_vu_bench = _sibling("host_vu_bench")
#: The single-node Ceph recipe the backends tests use (one copy of it).
_ceph = _load(ROOT / "tests" / "backends" / "ceph.py")
build_vu_bench: Callable[[], pathlib.Path | None] = _host_vu_bench.build_vu_bench
stop: Callable[[subprocess.Popen[bytes]], None] = _host_vu_bench.stop
own_rss_kib: Callable[[int], int] = _host_vu_bench.own_rss_kib
wait_socket: Callable[..., None] = _host_vu_bench.wait_socket
more_completions_than_wakeups: Callable[[dict[str, str], int, int], bool] = (
    _host_vu_bench.more_completions_than_wakeups
)
MiB = 1 << 20
SPAN_MB = 256
IMAGE_MB = 512
CONFIGS = [(1, False), (1, True), (32, False), (32, True)]  # (queue depth, write)
#: How often a failed or discarded reference (qemu-storage-daemon) run is repeated.
STALL_RETRIES = _host_vu_bench.RETRIES


@dataclass
class Storage:
    """One back-end both daemons can open: our LU location and QEMU's --blockdev options."""

    name: str
    uri: str
    blockdev: str
    #: The interpreter our daemon runs under (the Ceph bindings import only under Debian's).
    python: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on port {port}")


@contextlib.contextmanager
def nbd_storage() -> Iterator[Storage | None]:
    """nbdkit's memory plugin on 127.0.0.1 (enough threads for 32 requests in flight)."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        print("NBD skipped: nbdkit not installed (scripts/install-deps)")
        yield None
        return
    port = free_port()
    argv = [nbdkit, "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port)]
    argv += ["--threads", "64", "memory", f"{IMAGE_MB}M"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "nbdkit")
        yield Storage(
            "nbd",
            f"nbd://127.0.0.1:{port}/",
            f"driver=nbd,node-name=b,server.type=inet,server.host=127.0.0.1,server.port={port}",
            sys.executable,
        )
    finally:
        stop(proc)


def _python_with_rbd() -> str | None:
    """An interpreter that runs our daemon and loads librbd (ctypes), or None."""
    candidates = [sys.executable, str(ROOT / ".nox" / "backends" / "bin" / "python")]
    check = "import vhost_device_scsi; from scsi_emulation.backends import librbd; librbd.load()"
    for python in candidates:
        if (
            os.path.exists(python)
            and not subprocess.run(
                [python, "-c", check], capture_output=True, check=False
            ).returncode
        ):
            return python
    return None


@contextlib.contextmanager
def rbd_storage() -> Iterator[Storage | None]:
    """A single-node memstore cluster (one mon, one OSD; the recipe of
    ../shared/backends.md) with one image, torn down afterwards."""
    missing = [t for t in _ceph.CEPH_TOOLS if shutil.which(t) is None]
    python = _python_with_rbd()
    if missing:
        print(f"RBD skipped: {', '.join(missing)} not installed (scripts/install-deps)")
        yield None
        return
    if python is None:
        print(
            "RBD skipped: librbd (Debian librbd1) does not load, or the daemon is not "
            "installed (scripts/install-deps)"
        )
        yield None
        return
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-ceph-"))
    try:
        conf = _ceph.start_ceph(root, memstore_bytes=2 << 30)
        env = {**os.environ, "CEPH_CONF": str(conf)}
        for argv in (
            # Without exclusive-lock: a daemon that dies holding the lock (qemu-storage-daemon
            # 7.2 can abort on SIGTERM, "vhost_user_server_ref: Assertion !server->wait_idle")
            # would stall the next daemon's writes until Ceph expires its watch (30 s).
            ["rbd", "create", "--size", str(IMAGE_MB), "--image-feature", "layering",
             "rbd/bench"],
            # Write the span once, so reads hit objects that exist (as on a used disk).
            ["rbd", "bench", "--io-type", "write", "--io-size", "4M", "--io-total",
             f"{SPAN_MB}M", "--io-pattern", "seq", "rbd/bench"],
        ):  # fmt: skip
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            if out.returncode:
                raise _ceph.CephStartError(f"{' '.join(argv)}: {out.stderr.strip()[-300:]}")
    except (_ceph.CephStartError, subprocess.TimeoutExpired) as exc:
        print(f"RBD skipped: the cluster did not come up: {exc}")
        _ceph.ceph_down(root)
        shutil.rmtree(root, ignore_errors=True)
        yield None
        return
    try:
        yield Storage(
            "rbd",
            f"rbd:rbd/bench?conf={conf}",
            f"driver=rbd,node-name=b,pool=rbd,image=bench,conf={conf},user=admin",
            python,
        )
    finally:
        _ceph.ceph_down(root)
        shutil.rmtree(root, ignore_errors=True)


def drive(
    vu_bench: pathlib.Path,
    cmd: list[str],
    env: dict[str, str] | None,
    sock: pathlib.Path,
    btype: str,
    qd: int,
    write: bool,
    seconds: int,
) -> dict[str, float]:
    """Start one back-end daemon, drive it once with vu-bench, stop it."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_socket(sock, proc, timeout=60)
        args = [str(vu_bench), "--socket", str(sock), "--type", btype, "--pid", str(proc.pid)]
        args += ["--qd", str(qd), "--seconds", str(seconds), "--span-mb", str(SPAN_MB)]
        if write:
            args.append("--write")
        bench_proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # The daemon's own memory (RssAnon + RssFile: not the shared guest RAM), sampled
        # while it works: it must stay small and flat under load.
        samples: list[int] = []
        deadline = time.monotonic() + seconds + 60
        while bench_proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                samples.append(own_rss_kib(proc.pid))
            time.sleep(0.5)
        try:
            stdout, stderr = bench_proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            bench_proc.kill()
            raise
        out = subprocess.CompletedProcess(args, bench_proc.returncode, stdout, stderr)
        line = out.stdout.strip() or out.stderr.strip()
        figures = dict(re.findall(r"(\w+)=([\d.]+)", line))
        errors = int(figures.get("errors", "0"))
        # A fresh SCSI target answers its first command with the power-on UNIT ATTENTION.
        if out.returncode not in (0, 3) or "iops" not in figures or errors > 1:
            print(f"  vu-bench failed (rc={out.returncode}): {line}")
            return {}
        if more_completions_than_wakeups(figures, qd, seconds):
            print(f"  more completions than wake-ups at depth 1, run discarded: {line}")
            return {}
        result = {"iops": float(figures["iops"]), "us": float(figures["backend_us_per_req"])}
        if samples:
            result["rss_min"] = min(samples) / 1024
            result["rss_max"] = max(samples) / 1024
        return result
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"  {cmd[0]}: {exc}")
        return {}
    finally:
        stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            # Its figures stand (taken before the stop), but say so: a crash can leave the
            # back-end in a state that slows the next run.
            print(f"  {cmd[0]} exited with status {proc.returncode} when stopped")


def baseline_env(baseline: pathlib.Path) -> dict[str, str]:
    """The environment that makes our daemon import the packages copied under ``baseline``
    (``baseline/<dist>/<import_name>``, e.g. a copy of every ``packages/<dist>/src``) instead
    of the working tree: PYTHONPATH comes before the editable installs on sys.path."""
    paths = sorted(str(d) for d in baseline.iterdir() if d.is_dir())
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


def bench(
    vu_bench: pathlib.Path,
    storage: Storage,
    rounds: int,
    seconds: int,
    baseline: pathlib.Path | None = None,
) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-backends-"))
    sock = work / "vu.sock"
    ours = [
        storage.python, "-m", "vhost_device_scsi", "--socket-path", str(sock),
        "--log-level", "warning", "--control-socket", "none", storage.uri,
    ]  # fmt: skip
    qsd = [
        "qemu-storage-daemon", "--blockdev", storage.blockdev, "--export",
        f"type=vhost-user-blk,id=e,node-name=b,addr.type=unix,addr.path={sock},writable=on",
    ]  # fmt: skip
    daemons: list[tuple[str, list[str], dict[str, str] | None, str]] = [
        ("ours", ours, None, "scsi"),
        # What busy polling (on by default) buys, and what it costs in CPU per request.
        ("nopoll", [*ours, "--poll-max-us", "0"], None, "scsi"),
    ]
    if baseline is not None:
        base_env = baseline_env(baseline)
        daemons[0:0] = [
            ("base", ours, base_env, "scsi"),
            ("bnopoll", [*ours, "--poll-max-us", "0"], base_env, "scsi"),
        ]
    if shutil.which("qemu-storage-daemon") is not None:
        daemons.insert(0, ("qsd", qsd, None, "blk"))
    else:
        print("qemu-storage-daemon not found: only our daemon is measured")
    results: dict[tuple[str, int, bool], list[dict[str, float]]] = {}
    try:
        for rnd in range(rounds):
            print(f"{storage.name}: round {rnd + 1}/{rounds}", flush=True)
            for qd, write in CONFIGS:
                for name, cmd, env, btype in daemons:
                    r = drive(vu_bench, cmd, env, sock, btype, qd, write, seconds)
                    for _ in range(STALL_RETRIES if name == "qsd" else 0):
                        if r:
                            break
                        # qemu-storage-daemon 7.2 completes some chains twice under
                        # vu-bench and then panics ("vu_panic: Virtqueue size exceeded"; 3
                        # of 6 runs of 2 s on 2026-12-07, file, nbdkit and qemu-nbd alike):
                        # a reference run that failed or was discarded is run again.
                        print(f"  {name}: run failed, running it again", flush=True)
                        r = drive(vu_bench, cmd, env, sock, btype, qd, write, seconds)
                    if r:
                        results.setdefault((name, qd, write), []).append(r)
                        rss = (
                            f"  RSS {r['rss_min']:.1f}-{r['rss_max']:.1f} MB"
                            if "rss_max" in r
                            else ""
                        )
                        print(
                            f"  {name:<7} {'write' if write else 'read':<5} qd={qd:<3}"
                            f" {r['iops']:>9,.0f} IOPS {r['us']:7.2f} us/req{rss}",
                            flush=True,
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, qd: int, write: bool, key: str) -> float | None:
        values = [r[key] for r in results.get((name, qd, write), [])]
        return statistics.median(values) if values else None

    def fmt(v: float | None, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    print(f"\n{storage.name}: 4 KiB random I/O, one queue, medians of {rounds} round(s)")
    names = [name for name, *_ in daemons]
    print(f"{'workload':<14}", end="")
    for name in names:
        print(f"{name + ' IOPS':>13}{name + ' us/req':>15}", end="")
    print(f"{'ours/qsd':>10}")
    for qd, write in CONFIGS:
        print(f"{('write' if write else 'read') + f' qd={qd}':<14}", end="")
        for name in names:
            iops, us = med(name, qd, write, "iops"), med(name, qd, write, "us")
            print(f"{fmt(iops, ',.0f'):>13}{fmt(us, '.2f'):>15}", end="")
        q, o = med("qsd", qd, write, "iops"), med("ours", qd, write, "iops")
        print(f"{fmt(o / q if o and q else None, '.2f'):>10}")
    ours_rss = [r[k] for (n, *_), rs in results.items() if n == "ours" for r in rs
                for k in ("rss_min", "rss_max") if k in r]  # fmt: skip
    if ours_rss:
        print(f"our daemon's RSS without guest RAM: {min(ours_rss):.1f}-{max(ours_rss):.1f} MB")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--only", choices=("nbd", "rbd"), help="one back-end only")
    parser.add_argument(
        "--baseline",
        type=pathlib.Path,
        metavar="DIR",
        help="also run our daemon from a copy of the packages' sources (DIR/<dist>/<module>, "
        "e.g. copies of packages/*/src), interleaved, as columns 'base' and 'bnopoll' "
        "(--poll-max-us 0)",
    )
    opts, _ = parser.parse_known_args()
    vu_bench = build_vu_bench()
    if vu_bench is None:
        return 0
    makers = {"nbd": nbd_storage, "rbd": rbd_storage}
    for name, make in makers.items():
        if opts.only and name != opts.only:
            continue
        with make() as storage:
            if storage is not None:
                bench(vu_bench, storage, opts.rounds, opts.seconds, opts.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
