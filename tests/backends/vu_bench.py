"""The host-side vhost-user front-end ../shared/tools/vu-bench.c: building it (once, into
.cache/) and one run's figures. Skips the calling test, with the reason, when the source or
a C compiler is missing."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = pathlib.Path(
    os.environ.get("VU_BENCH_SRC", ROOT.parent / "shared" / "tools" / "vu-bench.c")
)


def build() -> pathlib.Path:
    """The compiled vu-bench (rebuilt when the source is newer)."""
    if not SOURCE.exists():
        pytest.skip(f"{SOURCE} not found (set VU_BENCH_SRC)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for vu-bench")
    out = ROOT / ".cache" / "vu-bench"
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or out.stat().st_mtime < SOURCE.stat().st_mtime:
        subprocess.run([cc, "-O2", "-o", str(out), str(SOURCE)], check=True)
    return out


def run(
    binary: pathlib.Path,
    socket: pathlib.Path,
    *,
    qd: int,
    seconds: int,
    pid: int | None = None,
    write: bool = False,
    span_mb: int = 128,
    kind: str = "scsi",
) -> dict[str, float]:
    """One run; the ``key=value`` figures vu-bench printed (iops, errors, ...)."""
    argv = [str(binary), "--socket", str(socket), "--type", kind, "--qd", str(qd)]
    argv += ["--seconds", str(seconds), "--span-mb", str(span_mb)]
    if pid is not None:
        argv += ["--pid", str(pid)]
    if write:
        argv.append("--write")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    line = out.stdout.strip() or out.stderr.strip()
    figures = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
    # rc 3: some request failed (a fresh SCSI target's power-on UNIT ATTENTION is one).
    if out.returncode not in (0, 3) or "iops" not in figures:
        raise AssertionError(f"vu-bench failed (rc={out.returncode}): {line}")
    return figures
