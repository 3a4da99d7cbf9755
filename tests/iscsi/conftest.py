"""Registers the `iscsi` marker and puts this directory on sys.path for the harness modules."""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "iscsi: runs libiscsi's iscsi-test-cu against iscsi-target (about 2 minutes)"
    )
