"""Fixtures of the virtio-queue tests; makes vq_guest importable under --import-mode=importlib."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from vq_guest import Guest, make_guest  # noqa: E402


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = make_guest()
    yield g
    g.memory.close()
