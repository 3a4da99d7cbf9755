"""The scenario on our daemon: a Linux guest attached with vhost-user-scsi-pci.

Two daemons serve the guest at once: a read-write one with several LUNs (one above 255, flat
space addressing) and two request queues, and a read-only, solid-state, 4 KiB-block one. One
guest boot runs every check (see scsi_scenario.py); the same checks pass on QEMU's built-in
scsi-hd in test_reference_scsi_hd.py, so a failure here is the daemon's.

The restart test needs a QEMU that reconnects vhost-user-scsi devices (upstream 8.2+); it is
skipped, with the reason, on older ones such as Debian 12's 7.2.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.daemon import DaemonConfig, RunningDaemon
from tests.e2e.guest import Guest, GuestRun, VhostUserScsi, qemu_version
from tests.e2e.scenario_checks import ScenarioChecks, ScenarioResult
from tests.e2e.scsi_scenario import Controller, Scenario

pytestmark = pytest.mark.e2e

#: A healthy run takes 10-30 s under TCG; a hang should not eat the CI budget.
SCENARIO_TIMEOUT = 180.0


def daemon_config(controller: Controller) -> DaemonConfig:
    """The daemon options that give ``controller``'s configuration."""
    return DaemonConfig(
        images=tuple(lun.image for lun in controller.luns),
        luns=tuple(lun.lun for lun in controller.luns),
        num_queues=controller.num_queues,
        read_only=controller.read_only,
        solid_state=controller.solid_state,
        block_size=controller.block_size,
        write_cache=controller.write_cache,
    )


@pytest.fixture(scope="module")
def scenario_result(
    guest: Guest, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ScenarioResult:
    scenario = Scenario(shm_dir / "images")
    scenario.prepare_images()
    logs = tmp_path_factory.mktemp("daemon-guest")
    daemons = [
        RunningDaemon.from_config(
            daemon_config(controller),
            shm_dir / f"vds{controller.index}.sock",
            logs / f"daemon{controller.index}.log",
        )
        for controller in scenario.controllers
    ]
    with contextlib.ExitStack() as stack:
        for daemon in daemons:
            stack.enter_context(daemon)
        devices = [
            VhostUserScsi(daemon.socket_path, num_queues=controller.num_queues)
            for daemon, controller in zip(daemons, scenario.controllers, strict=True)
        ]
        run = guest.run(
            scenario.script(),
            devices,
            files=scenario.files(),
            workdir=logs,
            timeout=SCENARIO_TIMEOUT,
        )
    return ScenarioResult(
        scenario,
        run,
        device_logs={f"daemon {i}": daemon.log() for i, daemon in enumerate(daemons)},
    )


class TestDaemonGuest(ScenarioChecks):
    def test_daemons_logged_no_traceback(self, scenario_result: ScenarioResult) -> None:
        for name, log in scenario_result.device_logs.items():
            assert "Traceback" not in log, f"{name}:\n{log}"


#: First QEMU whose vhost-user-scsi-pci reconnects to a restarted back-end.
RECONNECT_QEMU = (8, 2)
_RESTART_SCRIPT = """\
wait_disks 1 90
DISK=$(disk_for 0 0)
step restart_fio fio --name=restart --filename="$DISK" --ioengine=libaio --direct=1 \\
    --rw=randwrite --bs=4k --iodepth=32 --size=48M --verify=crc32c --do_verify=1 \\
    --verify_fatal=1
"""


def test_daemon_restart_mid_io_loses_nothing(
    guest: Guest, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """kill -9 the daemon while the guest has writes in flight, start it again: QEMU
    reconnects, replays memory, vrings and the inflight region, and fio verifies every block."""
    version = qemu_version(guest.qemu)
    if version < RECONNECT_QEMU:
        reason = (
            f"QEMU {version[0]}.{version[1]} cannot reconnect a vhost-user-scsi device"
            f" (needs {RECONNECT_QEMU[0]}.{RECONNECT_QEMU[1]}+); the daemon's side is covered"
            " by the host-driven front-end test"
        )
        print(f"\nSKIP: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("daemon-restart")
    image = shm_dir / "restart.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    config = DaemonConfig(images=(image,))
    socket = shm_dir / "restart.sock"
    daemon = RunningDaemon.from_config(config, socket, work / "daemon.log")
    runs: list[GuestRun] = []
    device = VhostUserScsi(socket, num_queues=1, reconnect=True)
    with daemon:
        thread = threading.Thread(
            target=lambda: runs.append(guest.run(_RESTART_SCRIPT, [device], workdir=work))
        )
        thread.start()
        console = work / "console.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and thread.is_alive():
            if console.exists() and "@@BEGIN restart_fio" in console.read_text(errors="replace"):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # let fio get writes in flight
        assert daemon.process is not None
        daemon.process.kill()
        daemon.process.wait()
        restarted = RunningDaemon.from_config(config, socket, work / "daemon-restarted.log")
        with restarted:
            thread.join(timeout=300)
    assert runs, "guest run did not finish"
    run = runs[0]
    run.check("restart_fio")
    assert "err= 0" in run.step("restart_fio").output
