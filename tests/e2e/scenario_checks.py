"""The assertions on one :class:`~tests.e2e.scsi_scenario.Scenario` guest run.

Holds :class:`ScenarioChecks`, a base class of test methods that read a module-scoped
``scenario_result`` fixture (one guest boot, many checks). Each test module subclasses it
and provides the fixture for its device (QEMU's built-in scsi-hd, our daemon); a check that
does not apply to one device is overridden there with the reason. Knows nothing about how the
device is started.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from tests.e2e.guest import GuestRun
from tests.e2e.scsi_scenario import (
    PROBE_PATTERN_OFFSET,
    VPD_PAGES,
    MiB,
    Scenario,
    flat_lun_hex,
)

__all__ = ["ScenarioChecks", "ScenarioResult"]

#: sg_vpd's names of the pages in VPD_PAGES, as page 0x00 lists them.
_VPD_PAGE_NAMES = (
    "Unit serial number",
    "Device identification",
    "Block limits",
    "Block device characteristics",
    "Logical block provisioning",
)


@dataclass
class ScenarioResult:
    """A finished scenario run, plus anything the device side logged (for failures)."""

    scenario: Scenario
    run: GuestRun
    device_logs: dict[str, str] = field(default_factory=dict)

    def context(self) -> str:
        """Text for assertion messages: the guest report and the device logs' tails."""
        parts = [self.run.report(tail=30)]
        for name, log in self.device_logs.items():
            tail = "\n".join(log.splitlines()[-30:])
            parts.append(f"--- {name} log (tail):\n{tail}")
        return "\n".join(parts)

    def check(self, *steps: str) -> None:
        """Assert the guest steps ran and exited 0 (with the device logs on failure)."""
        try:
            self.run.check(*steps)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.context()}") from None


class ScenarioChecks:
    """Checks shared by every device the scenario runs against."""

    def test_guest_ran_to_the_end(self, scenario_result: ScenarioResult) -> None:
        run = scenario_result.run
        assert run.booted, scenario_result.context()
        assert not run.timed_out, scenario_result.context()
        assert run.exit_code == 0, scenario_result.context()

    def test_disks_appear_as_configured(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        for _, lun in scenario.luns():
            scenario_result.check(f"{lun.role}_info")
            info = scenario.info(scenario_result.run, lun.role)
            expected = scenario.expected_info(lun.role)
            got = {key: info.get(key) for key in expected}
            assert got == expected, f"{lun.role}: {info}\n{scenario_result.context()}"

    def test_inquiry(self, scenario_result: ScenarioResult) -> None:
        for role in ("probe", "ro"):
            scenario_result.check(f"{role}_inq")
            output = scenario_result.run.step(f"{role}_inq").output
            assert "Peripheral device type: disk" in output, output

    def test_read_capacity(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        for role in ("probe", "ro"):
            scenario_result.check(f"{role}_readcap")
            output = scenario_result.run.step(f"{role}_readcap").output
            block = int(scenario.expected_info(role)["logical_block_size"])
            blocks = scenario.lun(role).size // block
            assert f"Logical block length={block} bytes" in output, output
            assert f"Number of logical blocks={blocks}" in output, output

    def test_vpd_pages(self, scenario_result: ScenarioResult) -> None:
        run = scenario_result.run
        for role in ("probe", "ro"):
            scenario_result.check(*(f"{role}_vpd_{page}" for page in VPD_PAGES))
            listed = run.step(f"{role}_vpd_0x00").output
            for name in _VPD_PAGE_NAMES:
                assert name in listed, f"page 0x00 of {role} lacks {name!r}:\n{listed}"
        assert "Non-rotating medium" in run.step("ro_vpd_0xb1").output
        assert "Non-rotating medium" not in run.step("probe_vpd_0xb1").output
        assert "Unmap command supported (LBPU): 1" in run.step("probe_vpd_0xb2").output

    def test_report_luns(self, scenario_result: ScenarioResult) -> None:
        run = scenario_result.run
        for controller in scenario_result.scenario.controllers:
            role = "probe" if controller.index == 0 else "ro"
            scenario_result.check(f"{role}_luns")
            output = run.step(f"{role}_luns").output
            listed = set(re.findall(r"^\s+([0-9a-f]{16})\s*$", output, re.MULTILINE))
            assert listed == {flat_lun_hex(lun.lun) for lun in controller.luns}, output

    def test_mode_sense(self, scenario_result: ScenarioResult) -> None:
        scenario_result.check("probe_modes", "ro_modes")
        assert "WP=0" in scenario_result.run.step("probe_modes").output
        assert "WP=1" in scenario_result.run.step("ro_modes").output

    def test_report_supported_opcodes(self, scenario_result: ScenarioResult) -> None:
        scenario_result.check("probe_opcodes", "ro_opcodes")

    def test_odirect_data_reaches_the_image(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        scenario_result.check("probe_odirect")
        on_host = scenario.read_image("probe", PROBE_PATTERN_OFFSET, len(scenario.pattern))
        assert on_host == scenario.pattern, "pattern written by the guest is not in the image"

    def test_ext4_and_fsck(self, scenario_result: ScenarioResult) -> None:
        scenario_result.check("ext4")
        fsck = scenario_result.scenario.host_fsck()
        assert fsck.returncode == 0, f"host e2fsck:\n{fsck.stdout}{fsck.stderr}"

    def test_discard_punches_holes(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        scenario_result.check("discard", "discard_zeroes")
        size = scenario.lun("discard").size
        allocated = scenario.allocated_bytes("discard")
        # The host image was fully written before the boot; a whole-disk discard must free
        # nearly all of it (a little may stay where unmap granularity does not line up).
        assert allocated <= size // 8, f"{allocated} of {size} bytes still allocated"

    def test_read_only_lun_refuses_writes(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        run = scenario_result.run
        scenario_result.check("ro_read")
        assert run.step("ro_dd_write").rc != 0, run.step("ro_dd_write").output
        sg_write = run.step("ro_sg_write")
        assert sg_write.rc != 0, sg_write.output
        assert "Data Protect" in sg_write.output, sg_write.output
        assert scenario.read_image("ro", 0, MiB) == scenario.pattern

    def test_fio_verify_on_several_queues(self, scenario_result: ScenarioResult) -> None:
        scenario_result.check("fio")
        output = scenario_result.run.step("fio").output
        assert "err= 0" in output, output
        assert "READ:" in output and "WRITE:" in output, output
        assert scenario_result.scenario.info(scenario_result.run, "fio")["hw_queues"] == "2"

    def test_lun_above_255(self, scenario_result: ScenarioResult) -> None:
        scenario = scenario_result.scenario
        if not any(lun.role == "high" for _, lun in scenario.luns()):
            pytest.skip("this run has no LUN above 255")
        scenario_result.check("high_info", "high_odirect")
        assert scenario.read_image("high", 0, len(scenario.pattern)) == scenario.pattern
