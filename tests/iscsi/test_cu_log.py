"""The iscsi-test-cu log parser and merge rules (fast; no iscsi-test-cu needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.iscsi.cu_log import Outcome, merge, parse_log
else:
    from cu_log import Outcome, merge, parse_log

LOG = """\
Suite: Read10
  Test: Simple ...
    Send READ10 (Expecting SUCCESS) LBA:0 blocks:1
    [OK] READ10 returned SUCCESS
passed
  Test: Quiet ...passed
  Test: Skipper ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
passed
    Send PRIN/READ_KEYS
    [SKIPPED] PERSISTENT RESERVE IN is not implemented.
Suite: Write10
  Test: Broken ...
    [FAILED] WRITE10 command failed
FAILED
    1. test_write10.c:71  - CU_ASSERT_EQUAL(_r,0)
  Test: Unfinished ...
    Send WRITE10 (Expecting SUCCESS)
"""


def test_parse_log_tells_passes_skips_failures_and_crashes() -> None:
    assert parse_log(LOG) == {
        "ALL.Read10.Simple": Outcome.PASSED,
        "ALL.Read10.Quiet": Outcome.PASSED,
        "ALL.Read10.Skipper": Outcome.SKIPPED,
        "ALL.Write10.Broken": Outcome.FAILED,
        "ALL.Write10.Unfinished": Outcome.FAILED,
    }


def test_words_inside_log_lines_are_not_results() -> None:
    log = "Suite: S\n  Test: T ...\n    the test passed FAILED checks\npassed\n"
    assert parse_log(log) == {"ALL.S.T": Outcome.PASSED}


def test_merge_prefers_failure_then_pass() -> None:
    runs = [
        {"a": Outcome.SKIPPED, "b": Outcome.PASSED, "c": Outcome.SKIPPED},
        {"a": Outcome.PASSED, "b": Outcome.FAILED},
    ]
    assert merge(runs) == {"a": Outcome.PASSED, "b": Outcome.FAILED, "c": Outcome.SKIPPED}
