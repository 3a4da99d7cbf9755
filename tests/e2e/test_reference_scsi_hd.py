"""The scenario on QEMU's built-in virtio-scsi-pci + scsi-hd: proves the harness and the
scenario's own checks (and is the baseline the daemon is compared with)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.guest import Guest
from tests.e2e.scenario_checks import ScenarioChecks, ScenarioResult
from tests.e2e.scsi_scenario import Scenario

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scenario_result(
    guest: Guest, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ScenarioResult:
    scenario = Scenario(shm_dir / "images")
    scenario.prepare_images()
    run = guest.run(
        scenario.script(),
        scenario.builtin_devices(),
        files=scenario.files(),
        workdir=tmp_path_factory.mktemp("reference-guest"),
        timeout=180.0,
    )
    return ScenarioResult(scenario, run)


class TestReferenceScsiHd(ScenarioChecks):
    def test_report_supported_opcodes(self, scenario_result: ScenarioResult) -> None:
        # QEMU's scsi-hd answers REPORT SUPPORTED OPERATION CODES with INVALID OPCODE.
        output = scenario_result.run.step("probe_opcodes").output
        assert "Invalid opcode" in output, output
