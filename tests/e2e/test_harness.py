"""Fast tests of the e2e harness itself (no guest boots): the cpio writer, console parsing,
the daemon command line and the scenario's LUN arithmetic."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.e2e.cpio_newc import NewcWriter
from tests.e2e.daemon import DaemonConfig
from tests.e2e.guest import choose_accelerator, parse_console
from tests.e2e.scsi_scenario import flat_lun_hex, linux_lun, parse_info


def _read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, content) of each entry of a newc archive, checking its alignment."""
    entries: list[tuple[str, int, bytes]] = []
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(name_start + namesize) % 4)
        if name == "TRAILER!!!":
            end = body
            assert len(data) % 512 == 0 and not data[end:].strip(b"\0")
            return entries
        entries.append((name, mode, data[body : body + filesize]))
        offset = body + filesize + (-(body + filesize) % 4)


@given(
    st.dictionaries(
        st.text("abcdefghij_.-0123456789", min_size=1, max_size=12),
        st.binary(max_size=300),
        max_size=8,
    )
)
def test_newc_archive_holds_every_file_aligned(files: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    writer = NewcWriter(buffer)
    writer.directory("/d")
    for name, content in files.items():
        writer.file(f"/d/{name}", content)
    writer.close()
    entries = _read_newc(buffer.getvalue())
    assert entries[0][0] == "d"
    assert {name: content for name, _, content in entries[1:]} == {
        f"d/{name}": content for name, content in files.items()
    }


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_newc_archive_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as out:
        writer = NewcWriter(out)
        writer.directory("/etc")
        writer.file("/etc/motd", b"hello\n")
        writer.symlink("/etc/link", "motd")
        writer.file("/run.sh", b"#!/bin/sh\n", 0o755)
        writer.close()
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "-F", str(archive)], cwd=extract, check=True, timeout=30
    )
    assert (extract / "etc" / "motd").read_bytes() == b"hello\n"
    assert (extract / "etc" / "link").readlink() == Path("motd")
    assert (extract / "run.sh").stat().st_mode & 0o777 == 0o755


def test_console_steps_survive_interleaved_kernel_messages() -> None:
    console = "\n".join(
        [
            "SeaBIOS noise",
            "@@READY",
            "@@BEGIN first",
            "line one",
            "[    1.0] sd 0:0:0:0: kernel says hi",
            "@@STEP first rc=0",
            "@@BEGIN second",
            "[    2.0] oops @@STEP second rc=3",
            "@@EXIT rc=0",
        ]
    )
    steps, exit_code, booted = parse_console(console)
    assert booted and exit_code == 0
    assert [(s.name, s.rc) for s in steps] == [("first", 0), ("second", 3)]
    assert steps[0].output == "line one\n[    1.0] sd 0:0:0:0: kernel says hi"
    assert not steps[1].ok


def test_console_without_exit_marker_reports_none() -> None:
    steps, exit_code, booted = parse_console("Kernel panic - not syncing\n")
    assert steps == () and exit_code is None and not booted


def test_daemon_argv_numbers_luns_explicitly() -> None:
    config = DaemonConfig(
        images=(Path("/a.img"), Path("/b.img")),
        luns=(0, 300),
        num_queues=2,
        read_only=True,
        write_cache=False,
    )
    argv = config.argv(Path("/s.sock"))
    assert argv[-2:] == ["0=/a.img", "300=/b.img"]
    assert "--read-only" in argv and "--solid-state" not in argv
    assert argv[argv.index("--num-queues") + 1] == "2"
    assert argv[argv.index("--write-cache") + 1] == "off"
    assert argv[argv.index("--socket-path") + 1] == "/s.sock"


def test_daemon_argv_without_luns_keeps_image_order() -> None:
    argv = DaemonConfig(images=(Path("/a.img"), Path("/b.img"))).argv(Path("/s"))
    assert argv[-2:] == ["/a.img", "/b.img"]


def test_kvm_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("E2E_KVM", raising=False)
    assert choose_accelerator().args[:2] == ("-accel", "tcg")


def test_lun_forms() -> None:
    assert flat_lun_hex(0) == "0000000000000000"
    assert flat_lun_hex(255) == "00ff000000000000"
    assert flat_lun_hex(300) == "412c000000000000"
    assert linux_lun(3) == 3
    assert linux_lun(300) == 0x412C


def test_parse_info_ignores_noise() -> None:
    info = parse_info("address=0:0:0:1\ncat: oops\nsize_bytes=512\n[ 1.0] x=y z\n")
    assert info == {"address": "0:0:0:1", "size_bytes": "512"}
