"""Runs libiscsi's iscsi-test-cu against iscsi-target and reports per test and per suite.

Starts `iscsi-target` (this interpreter, `-m iscsi_target.cli`) with four LUs, one per LUN
profile the suite needs (plain, thin-provisioned, read-only, removable), runs
`iscsi-test-cu -t ALL -d -S -V` against each (only ALL.ReadOnly on the read-only LU; a second
URL to the same LU on the plain one turns on the MultipathIO tests), parses the verbose logs,
merges the profiles and prints a table next to tgt's figures. Usage:

    python3 tests/iscsi/harness.py [--junit FILE] [--logs DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import quoteattr

# Run as a script or under pytest, this directory is on sys.path; mypy sees the repository
# layout instead.
if TYPE_CHECKING:
    from tests.iscsi.cu_log import Outcome, merge, parse_log, suite_of
    from tests.iscsi.tgt_reference import TGT
else:
    from cu_log import Outcome, merge, parse_log, suite_of
    from tgt_reference import TGT

__all__ = [
    "PROFILES",
    "Profile",
    "check_outcomes",
    "junit_xml",
    "load_expected_failures",
    "run_suite",
    "summary_table",
    "tool_path",
    "totals_line",
]

IQN = "iqn.2024-01.org.example:conformance"
IMAGE_SIZE = 64 << 20
MAX_LOG_BYTES = 64 << 20
TOOL = "iscsi-test-cu"
EXPECTED_FAILURES = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "expected-failures.txt"
)


@dataclass(frozen=True)
class Profile:
    """One LUN profile: its LU options and which tests run on it."""

    name: str
    lun_options: str
    tests: str = "ALL"
    multipath: bool = False


PROFILES = (
    Profile("plain", "", multipath=True),
    Profile("thin", ",thin=on"),
    # Thin as well, so UNMAP and WRITE SAME with UNMAP exist and ReadOnlySBC can check that
    # they, too, end DATA PROTECT (on a fully provisioned LU it logs UNMAP as not implemented,
    # which counts as a skip).
    Profile("readonly", ",ro,thin=on", tests="ALL.ReadOnly"),
    Profile("removable", ",removable"),
)


def tool_path() -> str | None:
    """Where iscsi-test-cu is, or None."""
    return shutil.which(TOOL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"iscsi-target exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"iscsi-target did not listen on port {port} within {timeout} s")


def run_suite(
    logs_dir: str | None = None,
    timeout: float = 600.0,
    *,
    profiles: Sequence[Profile] = PROFILES,
    location: Callable[[Profile], str] | None = None,
) -> tuple[dict[str, Outcome], dict[str, dict[str, Outcome]]]:
    """Run ``profiles``; return the merged outcomes and the outcomes per profile.

    Each profile's LU is a fresh sparse image file, or what ``location(profile)`` names (any
    storage location the target accepts: ``nbd://...``, ``rbd:...``)."""
    tool = tool_path()
    if tool is None:
        raise FileNotFoundError(f"{TOOL} not found (apt-get install libiscsi-bin)")
    with tempfile.TemporaryDirectory(prefix="iscsi-conformance-") as work:
        logs = logs_dir or work
        os.makedirs(logs, exist_ok=True)
        images = []
        for lun, profile in enumerate(profiles):
            if location is not None:
                path = location(profile)
            else:
                path = os.path.join(work, f"{profile.name}.img")
                with open(path, "wb") as image:
                    image.truncate(IMAGE_SIZE)
            images.append(f"{lun}={path}{profile.lun_options}")
        port = _free_port()
        command = [sys.executable, "-m", "iscsi_target.cli", "--listen", f"127.0.0.1:{port}"]
        command += ["--iqn", IQN, "--log-level", "warning", *images]
        with open(os.path.join(logs, "target.log"), "wb") as target_log:
            target = subprocess.Popen(command, stdout=target_log, stderr=subprocess.STDOUT)
            try:
                _wait_listening(port, target)
                per_profile = {
                    profile.name: _run_profile(tool, port, lun, profile, logs, timeout)
                    for lun, profile in enumerate(profiles)
                }
            finally:
                target.terminate()
                try:
                    target.wait(10)
                except subprocess.TimeoutExpired:
                    target.kill()
                    target.wait()
    return merge(per_profile.values()), per_profile


def _run_profile(
    tool: str, port: int, lun: int, profile: Profile, logs: str, timeout: float
) -> dict[str, Outcome]:
    url = f"iscsi://127.0.0.1:{port}/{IQN}/{lun}"
    command = [tool, "-t", profile.tests, "-d", "-S", "-V", url]
    if profile.multipath:
        command.append(url)
    log_path = os.path.join(logs, f"{profile.name}.log")
    with open(log_path, "wb") as log:
        tool_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # Some tests loop until the target answers as they expect (PreventAllow.WarmReset
        # polls TEST UNIT READY forever): stop a run whose log runs away or that hangs.
        while tool_process.poll() is None:
            if time.monotonic() > deadline or os.fstat(log.fileno()).st_size > MAX_LOG_BYTES:
                tool_process.kill()
                tool_process.wait()
                log.write(f"\n{TOOL} stopped by the harness (time or log size limit)\n".encode())
                break
            time.sleep(0.2)
    with open(log_path, encoding="utf-8", errors="replace") as log_text:
        outcomes: dict[str, Outcome] = parse_log(log_text.read())
    return outcomes


def load_expected_failures(path: str = EXPECTED_FAILURES) -> dict[str, str]:
    """Test name -> reason, from lines "NAME  reason" ('#' starts a comment)."""
    expected: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, reason = line.partition(" ")
                expected[name] = reason.strip()
    return expected


def summary_table(outcomes: Mapping[str, Outcome]) -> str:
    """Per-suite passed/failed/skipped, ours next to tgt's, with totals."""
    counts: dict[str, Counter[Outcome]] = {}
    for name, outcome in outcomes.items():
        counts.setdefault(suite_of(name), Counter())[outcome] += 1
    lines = [f"{'suite':32} {'ours p/f/s':>12} {'tgt p/f/s':>12}"]
    totals: Counter[Outcome] = Counter()
    tgt_totals = [0, 0, 0]
    for suite in sorted(set(counts) | set(TGT), key=str.lower):
        mine = counts.get(suite, Counter())
        totals.update(mine)
        tgt = TGT.get(suite, (0, 0, 0))
        for i, value in enumerate(tgt):
            tgt_totals[i] += value
        ours = f"{mine[Outcome.PASSED]}/{mine[Outcome.FAILED]}/{mine[Outcome.SKIPPED]}"
        lines.append(f"{suite:32} {ours:>12} {'/'.join(map(str, tgt)):>12}")
    ours_total = f"{totals[Outcome.PASSED]}/{totals[Outcome.FAILED]}/{totals[Outcome.SKIPPED]}"
    lines.append(f"{'total':32} {ours_total:>12} {'/'.join(map(str, tgt_totals)):>12}")
    return "\n".join(lines)


def totals_line(outcomes: Mapping[str, Outcome]) -> str:
    """ "iscsi-test-cu: P passed, F failed, S skipped of N" over the merged outcomes."""
    counts = Counter(outcomes.values())
    return (
        f"iscsi-test-cu: {counts[Outcome.PASSED]} passed, {counts[Outcome.FAILED]} failed, "
        f"{counts[Outcome.SKIPPED]} skipped of {len(outcomes)}"
    )


def check_outcomes(
    outcomes: Mapping[str, Outcome],
    expected: Mapping[str, str],
    *,
    min_parsed: int,
    min_passed: int,
    where: str = "",
) -> None:
    """The conformance verdict (pytest assertions): at least ``min_parsed`` tests parsed, no
    failure outside ``expected``, at least ``min_passed`` passed."""
    suffix = f" {where}" if where else ""
    assert len(outcomes) >= min_parsed, f"only {len(outcomes)} tests parsed"
    unexpected = sorted(n for n, o in outcomes.items() if o is Outcome.FAILED and n not in expected)
    assert not unexpected, f"unexpected failures{suffix}: {unexpected}"
    passed = sum(o is Outcome.PASSED for o in outcomes.values())
    assert passed >= min_passed, f"{passed} passed, fewer than {min_passed}"


def junit_xml(outcomes: Mapping[str, Outcome], expected: Mapping[str, str] | None = None) -> str:
    """JUnit XML with real skips (CUnit's own XML cannot tell skips from passes).

    A failure listed in ``expected`` (name -> reason) carries its reason as the message.
    """
    expected = expected or {}
    failed = sum(o is Outcome.FAILED for o in outcomes.values())
    skipped = sum(o is Outcome.SKIPPED for o in outcomes.values())
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuite name="iscsi-test-cu" tests="{len(outcomes)}" failures="{failed}" '
        f'skipped="{skipped}">',
    ]
    for name, outcome in sorted(outcomes.items()):
        suite, _, test = name.rpartition(".")
        body = {Outcome.FAILED: "<failure/>", Outcome.SKIPPED: "<skipped/>"}.get(outcome, "")
        if outcome is Outcome.FAILED and name in expected:
            body = f"<failure message={quoteattr('expected failure: ' + expected[name])}/>"
        parts.append(
            f"  <testcase classname={quoteattr(suite)} name={quoteattr(test)}>{body}</testcase>"
        )
    parts.append("</testsuite>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    parser.add_argument("--logs", metavar="DIR", help="keep the iscsi-test-cu logs here")
    args = parser.parse_args(argv)
    try:
        merged, _ = run_suite(args.logs)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"harness: {exc}", file=sys.stderr)
        return 2
    print(summary_table(merged))
    print(totals_line(merged))
    expected = load_expected_failures()
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as file:
            file.write(junit_xml(merged, expected))
    unexpected = sorted(n for n, o in merged.items() if o is Outcome.FAILED and n not in expected)
    for name in unexpected:
        print(f"UNEXPECTED FAILURE: {name}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
