"""The scenario through a real iSCSI initiator: QEMU's own (libiscsi) talking to iscsi-target.

One `iscsi-target` process serves every LU of the scenario (see scsi_scenario.py); the guest
sees them through two virtio-scsi-pci controllers whose LUNs are ``scsi-block`` devices over
``iscsi://`` drives, so QEMU hands the guest's CDBs (INQUIRY, VPD, MODE SENSE, REPORT SUPPORTED
OPERATION CODES, READ/WRITE, UNMAP, SYNCHRONIZE CACHE ...) to our target unchanged. Only REPORT
LUNS is answered by QEMU's SCSI bus, from its own LUN numbers, which the scenario chooses. The
checks are those of the vhost-user daemon and QEMU's scsi-hd (scenario_checks.py), from one
guest boot; a failure here and not there points at the iSCSI target.

Needs QEMU's iscsi block driver (Debian's qemu-block-extra); skipped with the reason without it.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scsi_emulation.identity import DeviceIdentity

from tests.e2e.guest import QEMU, Guest, IscsiLun, IscsiScsi
from tests.e2e.scenario_checks import ScenarioChecks, ScenarioResult
from tests.e2e.scsi_scenario import Controller, Lun, MiB, Scenario, linux_lun

pytestmark = pytest.mark.e2e

IQN = "iqn.2024-01.org.example:e2e-initiator"
#: A healthy run takes 30-60 s under TCG (every command crosses TCP twice); a hang should
#: not eat the CI budget.
SCENARIO_TIMEOUT = 240.0
_SERVING = re.compile(r"serving \S+ \(\d+ LUs\) on [^\s:]+:(\d+)")


def target_lun(controller: Controller, lun: Lun) -> int:
    """The LU number on the iSCSI target: the guest-side LUN on controller 0, 1000 + that on
    controller 1 (distinct, and both above 255 use the flat addressing method on the wire)."""
    return lun.lun + 1000 * controller.index


def lu_argument(controller: Controller, lun: Lun) -> str:
    """`iscsi-target`'s ``LUN=IMAGE,OPTIONS`` for one scenario LUN. Every read-write LU is
    thin-provisioned: the scenario discards and expects LBPU in the provisioning VPD page."""
    options = [
        "ro" if controller.read_only else "rw",
        "ssd" if controller.solid_state else "hdd",
        f"bs={controller.block_size}",
        f"wce={'on' if controller.write_cache else 'off'}",
        f"thin={'off' if controller.read_only else 'on'}",
    ]
    return f"{target_lun(controller, lun)}={lun.image}," + ",".join(options)


class RunningTarget:
    """`iscsi-target` in a child process listening on an ephemeral port; its log in a file."""

    def __init__(self, arguments: list[str], log_path: Path) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "iscsi_target.cli", "--listen", "127.0.0.1:0"]
        command += ["--iqn", IQN, "--log-level", "info", *arguments]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.port = self._wait_serving()

    def _wait_serving(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"iscsi-target did not start:\n{self.log()}")

    def url(self, lun: int) -> str:
        """The libiscsi URL of LU ``lun``.

        libiscsi copies the URL's LUN as a 16-bit number into the first two bytes of the LUN
        field (lib/pdu.c iscsi_pdu_set_lun), so a LUN above 255 must be written with the
        flat-space addressing method bits (SAM-5 4.7.7: 0x4000 | LUN), as Linux shows it;
        a plain 300 would be 01 2Ch, peripheral addressing on bus 1, which is not LU 300.
        """
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/{linux_lun(lun)}"

    def log(self) -> str:
        """Everything the target printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not go within 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def iscsi_driver_missing() -> str | None:
    """Why QEMU cannot open iSCSI drives (no iscsi block module), or None when it can.

    Opens an iSCSI drive at a port nobody listens on, in a machine that never runs: with the
    driver that is a quick connection failure, without it "Unknown protocol 'iscsi'".
    """
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
    argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S", "-monitor"]
    argv += ["none", "-drive", f"if=none,id=probe,format=raw,file={url}"]
    try:
        probe = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot probe {QEMU} for the iscsi block driver: {exc}"
    output = (probe.stdout + probe.stderr).strip()
    if "Unknown protocol" in output or "Unknown driver" in output:
        return f"{QEMU} has no iscsi block driver ({output}): apt-get install qemu-block-extra"
    return None


@pytest.fixture(scope="module")
def scenario_result(
    guest: Guest, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScenarioResult]:
    reason = iscsi_driver_missing()
    if reason is not None:
        print(f"\nSKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    scenario = Scenario(shm_dir / "images")
    scenario.prepare_images()
    logs = tmp_path_factory.mktemp("iscsi-initiator-guest")
    target = RunningTarget(
        [lu_argument(controller, lun) for controller, lun in scenario.luns()],
        logs / "iscsi-target.log",
    )
    try:
        devices = [
            IscsiScsi(
                tuple(
                    IscsiLun(
                        target.url(target_lun(controller, lun)),
                        lun=lun.lun,
                        # QEMU's iscsi driver refuses to open a write-protected LU read-write.
                        read_only=controller.read_only,
                    )
                    for lun in controller.luns
                ),
                num_queues=controller.num_queues,
            )
            for controller in scenario.controllers
        ]
        run = guest.run(
            scenario.script(),
            devices,
            files=scenario.files(),
            workdir=logs,
            timeout=SCENARIO_TIMEOUT,
        )
    finally:
        target.stop()
    yield ScenarioResult(scenario, run, device_logs={"iscsi-target": target.log()})


class TestQemuIscsiInitiator(ScenarioChecks):
    def test_commands_reach_the_target(self, scenario_result: ScenarioResult) -> None:
        # scsi-block passes INQUIRY through: the guest sees our emulation's vendor, not
        # QEMU's, so every check above judged the target and not QEMU's scsi-hd.
        run = scenario_result.run
        for _, lun in scenario_result.scenario.luns():
            vendor = scenario_result.scenario.info(run, lun.role).get("vendor")
            assert vendor == DeviceIdentity().vendor, f"{lun.role}: vendor {vendor!r}"
        assert scenario_result.device_logs["iscsi-target"].count("Normal session") >= len(
            scenario_result.scenario.luns()
        )

    def test_target_logged_no_traceback_or_error(self, scenario_result: ScenarioResult) -> None:
        log = scenario_result.device_logs["iscsi-target"]
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log

    def test_target_shut_down_cleanly(self, scenario_result: ScenarioResult) -> None:
        assert "SIGTERM: shutting down" in scenario_result.device_logs["iscsi-target"]


def test_qemu_img_sees_unmapped_and_zeroed_ranges(tmp_path: Path) -> None:
    """QEMU's block layer over the same initiator, no guest: UNMAP (discard), WRITE SAME(16)
    with and without UNMAP (write-zeroes) and GET LBA STATUS (qemu-img map) on a thin LU."""
    qemu_io, qemu_img = shutil.which("qemu-io"), shutil.which("qemu-img")
    if qemu_io is None or qemu_img is None:
        pytest.skip("qemu-io / qemu-img not installed (Debian qemu-utils)")
    reason = iscsi_driver_missing()
    if reason is not None:
        pytest.skip(reason)
    image = tmp_path / "thin.img"
    with image.open("wb") as f:
        f.write(b"\x5a" * (8 * MiB))
    target = RunningTarget([f"{image},thin=on"], tmp_path / "iscsi-target.log")
    try:
        url = target.url(0)
        commands = [
            "discard 0 1M",  # UNMAP
            "write -z -u 2M 1M",  # WRITE SAME(16) with UNMAP
            "write -z 4M 1M",  # WRITE SAME(16), no UNMAP: zeroes stay allocated
            "read -P 0 0 1M",
            "read -P 0x5a 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0 4M 1M",
            "read -P 0x5a 5M 3M",
        ]
        io = subprocess.run(
            [qemu_io, "-f", "raw", *(a for c in commands for a in ("-c", c)), url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert io.returncode == 0 and "fail" not in io.stdout.lower(), io.stdout + io.stderr
        mapped = subprocess.run(
            [qemu_img, "map", "--output=json", "-f", "raw", url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert mapped.returncode == 0, mapped.stderr
        extents = [(e["start"], e["length"], e["data"]) for e in json.loads(mapped.stdout)]
    finally:
        target.stop()
    assert "Traceback" not in target.log(), target.log()
    # GET LBA STATUS: deallocated where UNMAP went, mapped elsewhere (zeroes written without
    # UNMAP stay mapped).
    assert extents == [
        (0, MiB, False),
        (MiB, MiB, True),
        (2 * MiB, MiB, False),
        (3 * MiB, 5 * MiB, True),
    ], extents
    assert image.read_bytes()[: 6 * MiB].count(0) == 3 * MiB
