"""Hot-plug, hot-unplug and resize seen by a running Linux guest (one boot).

While the guest runs, the host drives the daemon's control socket: ``add-lun`` for LUN 1 and
LUN 300 (flat space), ``remove-lun`` for both, then grows LUN 0's image and sends ``resize 0``.
Linux's virtio_scsi learns of each change only from the event queue (TRANSPORT_RESET with
RESCAN / REMOVED, PARAM_CHANGE with 2Ah/09h, virtio 1.2 5.6.6.3): it does not poll the bus,
and the guest script sends no command to LUN 0 while it waits for the new capacity, so a disk
that appears, disappears or grows proves the event reached the driver.

Synchronisation: the guest prints ``@@WAIT NAME`` on the console and polls sysfs (bounded) for
the change; the host follows the console log QEMU writes, and performs the action for ``NAME``
when the marker appears. A failed control command leaves the guest's wait to time out and is
reported with the control answers.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from vhost_device_scsi.control import send_command

from tests.e2e.daemon import DaemonConfig, RunningDaemon
from tests.e2e.guest import Guest, GuestRun, VhostUserScsi
from tests.e2e.scsi_scenario import linux_lun, parse_info

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BASE_SIZE = 64 * MiB
GROWN_SIZE = 96 * MiB
HOT_LUN = 1
HOT_SIZE = 32 * MiB
HIGH_LUN = 300
HIGH_SIZE = 16 * MiB
#: Where the guest writes the pattern on the hot-plugged disks, and past LUN 0's old end.
HOT_OFFSET = 1 * MiB
GROWN_OFFSET = BASE_SIZE + 4 * MiB
PATTERN_SIZE = 64 * 1024
#: Seconds the guest waits for each change; the whole run (10-30 s under TCG when healthy).
GUEST_WAIT = 60
RUN_TIMEOUT = 240.0

_WAIT_MARKER = re.compile(r"@@WAIT (\S+)\n")

_SCRIPT = """\
# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds; fail after SECONDS.
wait_until() {{
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 5; i++)); do
        if "$@" >/dev/null 2>&1; then
            echo "after $((i / 5)).$((i % 5 * 2))s: $*"
            return 0
        fi
        sleep 0.2
    done
    echo "still not true after ${{limit}}s: $*"
    return 1
}}
has_lun() {{ disk_for 0 "$1" >/dev/null 2>&1; }}
no_lun() {{ ! has_lun "$1"; }}
# size_is DISK BYTES: the kernel's idea of DISK's size (sysfs only: no command to the disk).
size_is() {{ [ "$(( $(cat "/sys/block/${{1#/dev/}}/size") * 512 ))" = "$2" ]; }}

wait_disks 1 90
DISK0=$(disk_for 0 0)
step base_info disk_info "$DISK0"

echo "@@WAIT add"
step add_seen wait_until {wait} eval "has_lun {hot} && has_lun {high}"
HOT=$(disk_for 0 {hot})
HIGH=$(disk_for 0 {high})
step hot_info disk_info "$HOT"
step high_info disk_info "$HIGH"
step hot_roundtrip odirect_roundtrip "$HOT" /e2e/pattern {hot_offset}
step high_roundtrip odirect_roundtrip "$HIGH" /e2e/pattern {hot_offset}
step hot_inquiry sg_inq "$HOT"
sync

echo "@@WAIT remove"
step remove_seen wait_until {wait} eval "no_lun {hot} && no_lun {high}"
step remaining_disks bash -c "ls /sys/block | grep '^sd'"

echo "@@WAIT resize"
step resize_seen wait_until {wait} size_is "$DISK0" {grown}
step resized_info disk_info "$DISK0"
step resized_readcap sg_readcap -l "$DISK0"
step grown_roundtrip odirect_roundtrip "$DISK0" /e2e/pattern {grown_offset}
step kernel_log bash -c "dmesg | grep -i -E 'sd |scsi|capacity' | tail -40"
"""


def guest_script() -> str:
    """The guest side of the choreography."""
    return _SCRIPT.format(
        wait=GUEST_WAIT,
        hot=HOT_LUN,
        high=linux_lun(HIGH_LUN),
        hot_offset=HOT_OFFSET,
        grown=GROWN_SIZE,
        grown_offset=GROWN_OFFSET,
    )


@dataclass
class HotplugResult:
    """The finished run: the guest, what the control socket answered, the daemon's log."""

    run: GuestRun
    pattern: bytes
    images: dict[str, Path]
    answers: dict[str, str] = field(default_factory=dict)
    #: Host-side problems (a marker never seen, a control command that raised).
    problems: list[str] = field(default_factory=list)
    daemon_log: str = ""

    def context(self) -> str:
        """Text for assertion messages."""
        tail = "\n".join(self.daemon_log.splitlines()[-40:])
        return (
            f"control answers: {self.answers}\nhost problems: {self.problems}\n"
            f"{self.run.report(tail=40)}\n--- daemon log (tail):\n{tail}"
        )

    def check(self, *steps: str) -> None:
        """Assert the guest steps ran and exited 0 (with the host side on failure)."""
        try:
            self.run.check(*steps)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.context()}") from None


def follow_markers(
    console: Path,
    actions: dict[str, Callable[[], None]],
    still_running: Callable[[], bool],
    timeout: float,
) -> list[str]:
    """Run ``actions[NAME]`` once when ``@@WAIT NAME`` appears in ``console``.

    Returns the problems: markers never seen (the guest ended or ``timeout`` passed first) and
    actions that raised. An action that fails does not stop the others: the guest's bounded
    wait then fails its step, and the run still ends normally.
    """
    pending = dict(actions)
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        alive = still_running()
        text = console.read_text(errors="replace") if console.exists() else ""
        for name in _WAIT_MARKER.findall(text.replace("\r", "")):
            action = pending.pop(name, None)
            if action is None:
                continue
            try:
                action()
            except Exception as exc:  # reported with the results, never left to hang the run
                problems.append(f"action {name!r} raised {exc!r}")
        if not alive:
            break
        time.sleep(0.1)
    return problems + [f"marker @@WAIT {name} never seen" for name in sorted(pending)]


@pytest.fixture(scope="module")
def hotplug_result(
    guest: Guest, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> HotplugResult:
    work = tmp_path_factory.mktemp("hotplug-guest")
    images = {
        "base": shm_dir / "hp-base.img",
        "hot": shm_dir / "hp-hot.img",
        "high": shm_dir / "hp-high.img",
    }
    sizes = {"base": BASE_SIZE, "hot": HOT_SIZE, "high": HIGH_SIZE}
    for role, path in images.items():
        with path.open("wb") as f:
            f.truncate(sizes[role])
    pattern = random.Random(11).randbytes(PATTERN_SIZE)
    socket = shm_dir / "hotplug.sock"
    control = str(socket) + ".ctl"
    daemon = RunningDaemon.from_config(
        DaemonConfig(images=(images["base"],)), socket, work / "daemon.log"
    )
    runs: list[GuestRun] = []
    answers: dict[str, str] = {}
    problems: list[str] = []

    def command(line: str) -> None:
        try:
            answers[line] = send_command(control, line)
        except OSError as exc:
            problems.append(f"{line}: {exc}")

    def add() -> None:
        command(f"add-lun {HOT_LUN} {images['hot']}")
        command(f"add-lun {HIGH_LUN} {images['high']}")

    def remove() -> None:
        command(f"remove-lun {HOT_LUN}")
        command(f"remove-lun {HIGH_LUN}")

    def resize() -> None:
        with images["base"].open("r+b") as f:
            f.truncate(GROWN_SIZE)
        command("resize 0")

    with daemon:
        thread = threading.Thread(
            target=lambda: runs.append(
                guest.run(
                    guest_script(),
                    [VhostUserScsi(socket)],
                    files={"/e2e/pattern": pattern},
                    workdir=work,
                    timeout=RUN_TIMEOUT,
                )
            )
        )
        thread.start()
        problems += follow_markers(
            work / "console.log",
            {"add": add, "remove": remove, "resize": resize},
            thread.is_alive,
            RUN_TIMEOUT,
        )
        thread.join(RUN_TIMEOUT)
        command("list")
    assert runs, f"the guest run did not finish\n{daemon.log()}"
    return HotplugResult(runs[0], pattern, images, answers, problems, daemon.log())


def test_control_commands_answered_ok(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    assert not result.problems, result.context()
    expected = [
        f"add-lun {HOT_LUN} {result.images['hot']}",
        f"add-lun {HIGH_LUN} {result.images['high']}",
        f"remove-lun {HOT_LUN}",
        f"remove-lun {HIGH_LUN}",
        "resize 0",
        "list",
    ]
    assert list(result.answers) == expected, result.context()
    for line, answer in result.answers.items():
        assert answer.startswith("ok"), f"{line!r} -> {answer!r}\n{result.context()}"
    assert result.answers["resize 0"] == f"ok LUN 0 size {GROWN_SIZE}"
    assert result.answers["list"] == f"ok 0:{result.images['base']}"


def test_added_luns_appear_in_the_guest(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    result.check("add_seen", "hot_info", "high_info", "hot_inquiry")
    hot = parse_info(result.run.step("hot_info").output)
    high = parse_info(result.run.step("high_info").output)
    assert hot["address"].endswith(f":0:0:{HOT_LUN}"), hot
    assert int(hot["size_bytes"]) == HOT_SIZE, hot
    assert high["address"].endswith(f":0:0:{linux_lun(HIGH_LUN)}"), high
    assert int(high["size_bytes"]) == HIGH_SIZE, high


def test_added_luns_read_and_write(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    result.check("hot_roundtrip", "high_roundtrip")
    for role in ("hot", "high"):
        with result.images[role].open("rb") as f:
            f.seek(HOT_OFFSET)
            assert f.read(PATTERN_SIZE) == result.pattern, f"{role} image lacks the guest's data"


def test_removed_luns_disappear(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    # Only meaningful once the disks had appeared: removal of a disk never seen is vacuous.
    result.check("add_seen", "remove_seen", "remaining_disks")
    disks = result.run.step("remaining_disks").output.split()
    assert len(disks) == 1, disks


def test_resize_reaches_the_guest(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    result.check("base_info", "resize_seen", "resized_info", "resized_readcap")
    before = parse_info(result.run.step("base_info").output)
    after = parse_info(result.run.step("resized_info").output)
    assert int(before["size_bytes"]) == BASE_SIZE, before
    assert int(after["size_bytes"]) == GROWN_SIZE, after
    readcap = result.run.step("resized_readcap").output
    assert f"Last LBA={GROWN_SIZE // 512 - 1} " in readcap, readcap
    assert f"Device size: {GROWN_SIZE} bytes" in readcap, readcap


def test_grown_area_is_usable(hotplug_result: HotplugResult) -> None:
    result = hotplug_result
    result.check("grown_roundtrip")
    with result.images["base"].open("rb") as f:
        f.seek(GROWN_OFFSET)
        assert f.read(PATTERN_SIZE) == result.pattern


def test_daemon_delivered_every_event(hotplug_result: HotplugResult) -> None:
    log = hotplug_result.daemon_log
    assert "Traceback" not in log, log
    delivered = re.findall(
        r"event (0x[0-9a-f]+) LUN ([0-9a-f]+) reason (0x[0-9a-f]+) delivered", log
    )
    assert delivered == [
        ("0x1", "0100000100000000", "0x1"),  # TRANSPORT_RESET, LUN 1, RESCAN
        ("0x1", "0100412c00000000", "0x1"),  # TRANSPORT_RESET, LUN 300 (flat), RESCAN
        ("0x1", "0100000100000000", "0x2"),  # REMOVED
        ("0x1", "0100412c00000000", "0x2"),
        ("0x3", "0100000000000000", "0x92a"),  # PARAM_CHANGE, LUN 0, 2Ah/09h
    ], hotplug_result.context()
