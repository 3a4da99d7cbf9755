"""Parsing iscsi-test-cu's verbose log into one outcome per test, and merging runs.

CUnit counts a skipped test as passed; libiscsi marks a skip only with a "[SKIPPED]" log line
(and some only at -V). So the log, not CUnit's summary, tells passed from skipped. Knows
nothing about how the tool was run.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping

__all__ = ["Outcome", "merge", "parse_log", "suite_of"]


class Outcome(enum.Enum):
    """A test's result; the order is the merge priority (a failure anywhere wins)."""

    SKIPPED = 0
    PASSED = 1
    FAILED = 2


# "Suite: Name" starts a line; "  Test: Name ..." starts a line and the test's own output (and
# then "passed"/"FAILED") may follow on the same line.
_TOKENS = re.compile(
    r"^Suite: (?P<suite>\S+)"
    r"|^  Test: (?P<test>\S+) \.\.\."
    r"|(?:^|(?<=\.\.\.))(?P<result>passed|FAILED)(?=\s|$)"
    r"|(?P<skip>\[SKIPPED\])",
    re.MULTILINE,
)


def parse_log(text: str, family: str = "ALL") -> dict[str, Outcome]:
    """Outcomes by "FAMILY.Suite.Test" from one iscsi-test-cu -V log.

    A test whose result line never came (the tool crashed or timed out) counts as failed.
    """
    outcomes: dict[str, Outcome] = {}
    suite = ""
    test: str | None = None
    skipped = False
    for match in _TOKENS.finditer(text):
        if match["suite"]:
            suite = match["suite"]
        elif match["test"]:
            if test is not None:
                outcomes[test] = Outcome.FAILED
            test, skipped = f"{family}.{suite}.{match['test']}", False
        elif match["skip"]:
            skipped = skipped or test is not None
        elif match["result"] and test is not None:
            if match["result"] == "FAILED":
                outcomes[test] = Outcome.FAILED
            else:
                outcomes[test] = Outcome.SKIPPED if skipped else Outcome.PASSED
            test = None
    if test is not None:
        outcomes[test] = Outcome.FAILED
    return outcomes


def merge(runs: Iterable[Mapping[str, Outcome]]) -> dict[str, Outcome]:
    """One outcome per test over several runs (LUN profiles): failed > passed > skipped."""
    merged: dict[str, Outcome] = {}
    for run in runs:
        for name, outcome in run.items():
            previous = merged.get(name)
            if previous is None or outcome.value > previous.value:
                merged[name] = outcome
    return merged


def suite_of(name: str) -> str:
    """ "ALL.Read10.Simple" -> "ALL.Read10"."""
    return name.rsplit(".", 1)[0]
