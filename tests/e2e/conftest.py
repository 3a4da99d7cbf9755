"""Fixtures for the end-to-end tests, which boot a real Linux guest under QEMU.

Provides ``guest`` (a prepared :class:`~tests.e2e.guest.Guest`, or a skip with the reason
printed when QEMU or the guest kernel cache is missing: run scripts/install-deps) and
``shm_dir`` (a scratch directory in /dev/shm for images and sockets).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness modules are imported as tests.e2e.*; make that work under plain `pytest` too.
_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.e2e.guest import QEMU, Guest, choose_accelerator  # noqa: E402
from tests.e2e.guest_kernel import default_cache_dir, find_kernel_package  # noqa: E402


def guest_unavailable_reason() -> str | None:
    """Why no guest can boot here, or None when one can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: run scripts/install-deps"
    cache = default_cache_dir()
    if find_kernel_package(cache) is None:
        return f"no guest kernel package in {cache}: run scripts/install-deps"
    return None


def pytest_report_header() -> str:
    """One header line saying how guests will run (or why they will not)."""
    reason = guest_unavailable_reason()
    if reason is not None:
        return f"e2e: guests unavailable ({reason})"
    return f"e2e: guest accelerator {choose_accelerator().reason}; cache {default_cache_dir()}"


@pytest.fixture(scope="session")
def guest() -> Guest:
    """A bootable guest (kernel unpacked and initramfs built once per cache)."""
    reason = guest_unavailable_reason()
    if reason is not None:
        print(f"\nSKIP e2e: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return Guest.prepare()


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    """A fresh directory in /dev/shm (else the temp dir), removed afterwards."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="vds-e2e-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
