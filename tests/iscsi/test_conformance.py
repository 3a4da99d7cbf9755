"""libiscsi's iscsi-test-cu against iscsi-target: no failure beyond the expected ones, and at
least as many passes as measured when the threshold was set. The session prints the per-suite
table and the totals, and writes JUnit XML (real skips, one testcase per iscsi-test-cu test) to
`conformance-junit.xml` at the repository root, or where $ISCSI_CONFORMANCE_JUNIT says."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.iscsi.harness import (
        check_outcomes,
        junit_xml,
        load_expected_failures,
        run_suite,
        summary_table,
        tool_path,
        totals_line,
    )
else:
    from harness import (
        check_outcomes,
        junit_xml,
        load_expected_failures,
        run_suite,
        summary_table,
        tool_path,
        totals_line,
    )

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JUNIT_PATH = os.environ.get("ISCSI_CONFORMANCE_JUNIT") or os.path.join(
    _ROOT, "conformance-junit.xml"
)

# Measured on this machine (see README "Conformance"); raise it when more tests pass.
MIN_PASSED = 222


@pytest.mark.iscsi
@pytest.mark.skipif(tool_path() is None, reason="iscsi-test-cu not installed (libiscsi-bin)")
def test_iscsi_test_cu_conformance(capsys: pytest.CaptureFixture[str]) -> None:
    merged, _ = run_suite()
    expected = load_expected_failures()
    with open(JUNIT_PATH, "w", encoding="utf-8") as junit:
        junit.write(junit_xml(merged, expected))
    with capsys.disabled():  # shown in the session output even when it passes
        print(f"\n{summary_table(merged)}\n{totals_line(merged)}\nJUnit XML: {JUNIT_PATH}")
    check_outcomes(merged, expected, min_parsed=230, min_passed=MIN_PASSED)
