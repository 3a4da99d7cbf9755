"""The harness's JUnit XML and totals line (fast; no iscsi-test-cu needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.iscsi.cu_log import Outcome
    from tests.iscsi.harness import junit_xml, load_expected_failures, totals_line
else:
    from cu_log import Outcome
    from harness import junit_xml, load_expected_failures, totals_line

OUTCOMES = {
    "ALL.Read10.Simple": Outcome.PASSED,
    "ALL.Sanitize.CryptoErase": Outcome.SKIPPED,
    "ALL.Sanitize.Reset": Outcome.FAILED,
    "ALL.Write10.Simple": Outcome.FAILED,
    'ALL.Odd."Name"<&>': Outcome.PASSED,
}


def test_totals_line() -> None:
    assert totals_line(OUTCOMES) == "iscsi-test-cu: 2 passed, 2 failed, 1 skipped of 5"
    assert totals_line({}) == "iscsi-test-cu: 0 passed, 0 failed, 0 skipped of 0"


def test_junit_xml_counts_and_cases() -> None:
    root = ET.fromstring(junit_xml(OUTCOMES, {"ALL.Sanitize.Reset": "needs a slow LU"}))
    assert root.tag == "testsuite"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "1")
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {
        ("ALL.Read10", "Simple"),
        ("ALL.Sanitize", "CryptoErase"),
        ("ALL.Sanitize", "Reset"),
        ("ALL.Write10", "Simple"),
        ("ALL.Odd", '"Name"<&>'),
    }
    assert cases[("ALL.Sanitize", "CryptoErase")].find("skipped") is not None
    assert len(cases[("ALL.Read10", "Simple")]) == 0
    expected = cases[("ALL.Sanitize", "Reset")].find("failure")
    assert expected is not None
    assert expected.get("message") == "expected failure: needs a slow LU"
    unexpected = cases[("ALL.Write10", "Simple")].find("failure")
    assert unexpected is not None and unexpected.get("message") is None


def test_expected_failures_file_parses() -> None:
    expected = load_expected_failures()
    assert all(name.startswith("ALL.") and reason for name, reason in expected.items())
