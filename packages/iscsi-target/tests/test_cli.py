"""The command line: LU storage locations (files, block devices, nbd://, rbd:) as for the vhost
daemon, per-LU options after the location, and one clear stderr line for every mistake."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from iscsi_target import cli
from iscsi_target.cli import CliError, LunSpec, build_target, main, parse_args
from scsi_core.status import Status
from scsi_core.target import Target
from scsi_emulation.backend import FileBackend, StorageBackend
from scsi_emulation.testing import run_command

READ_CAPACITY_16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
INQUIRY_VPD_SERIAL = bytes([0x12, 0x01, 0x80, 0x00, 0xFF, 0x00])


def _read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def _write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def _image(path: Path, size: int = 1 << 20, fill: bytes = b"") -> Path:
    with path.open("wb") as file:
        file.truncate(size)
        file.write(fill)
    return path


def _clear_power_on_attention(target: Target, lun: int) -> None:
    # The first command of a nexus meets POWER ON OCCURRED (SPC-5 5.14); then TUR is GOOD.
    for _ in range(2):
        result = run_command(target, bytes(6), lun=lun)
        if result.status == Status.GOOD:
            return
    raise AssertionError(f"LUN {lun} is not ready: {result}")


def _capacity(target: Target, lun: int) -> tuple[int, int]:
    _clear_power_on_attention(target, lun)
    result = run_command(target, READ_CAPACITY_16, data_in=32, lun=lun)
    assert result.status == Status.GOOD, result
    last_lba, block = struct.unpack_from(">QI", result.data)
    return last_lba + 1, block


def _serial(target: Target, lun: int) -> str:
    result = run_command(target, INQUIRY_VPD_SERIAL, data_in=255, lun=lun)
    assert result.status == Status.GOOD, result
    return result.data[4 : 4 + result.data[3]].decode().strip()


def _one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("iscsi-target: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- parsing (nothing opened)


def test_locations_and_options_become_lu_specs() -> None:
    options = parse_args(
        [
            "nbd://127.0.0.1:10809/disk,ro",
            "3=nbd+unix:///e?socket=/run/n.sock,thin=on",
            "rbd:rbd/vm?conf=/etc/ceph/ceph.conf&id=admin,bs=4096,ssd",
            "file:/x.img?direct=on",
            "/dev/sdz,wce=off",
        ]
    )
    assert options.luns == (
        LunSpec(0, "nbd://127.0.0.1:10809/disk", read_only=True),
        LunSpec(3, "nbd+unix:///e?socket=/run/n.sock", thin_provisioning=True),
        LunSpec(
            4,
            "rbd:rbd/vm?conf=/etc/ceph/ceph.conf&id=admin",
            block_size=4096,
            solid_state=True,
        ),
        LunSpec(5, "file:/x.img?direct=on"),
        LunSpec(6, "/dev/sdz", write_cache=False),
    )


@pytest.mark.parametrize(
    ("location", "needle"),
    [
        ("nbd://h:70000/x", "Port out of range"),
        ("nbd://", "no server host"),
        ("nbd+unix:///x", "needs ?socket=PATH"),
        ("nbds://h/x", "nbds"),
        ("rbd:pool", "expected rbd:POOL/IMAGE"),
        ("file:x?direct=sometimes", "not on/off"),
        ("2=file:", "no path"),
    ],
)
def test_bad_location_is_caught_while_parsing(location: str, needle: str) -> None:
    with pytest.raises(CliError, match="bad storage location") as info:
        parse_args([location])
    assert needle in str(info.value)


def test_bad_location_is_one_line_before_anything_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _image(tmp_path / "good.img")
    assert main(["--listen", "127.0.0.1:0", str(good), "rbd:only-a-pool"]) == 1
    _one_error_line(capsys.readouterr().err, "bad storage location", "rbd:only-a-pool")


# ------------------------------------------------------------ opening (the LUs really work)


def test_plain_path_and_file_uris_open_the_same_image(tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img", 2 << 20)
    locations = [str(image), f"file:{image}", f"file://{image}?direct=on,bs=4096"]
    target = build_target(parse_args(locations).luns)
    try:
        assert target.luns() == [0, 1, 2]
        assert _capacity(target, 0) == (4096, 512)
        assert _capacity(target, 1) == (4096, 512)
        assert _capacity(target, 2) == (512, 4096)
        # The serial follows the storage, not the spelling of its location.
        assert _serial(target, 0) == _serial(target, 1) == _serial(target, 2)
        payload = os.urandom(4096)
        written = run_command(target, _write10(1, 1), data_out=payload, lun=2)
        assert written.status == Status.GOOD, written
        assert run_command(target, _read10(8, 8), data_in=4096, lun=0).data == payload
    finally:
        target.close()
    assert image.read_bytes()[4096:8192] == payload


def test_unopenable_storage_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.img"
    assert main(["--listen", "127.0.0.1:0", f"file:{missing}"]) == 1
    _one_error_line(capsys.readouterr().err, "cannot open image", str(missing), "No such file")
    assert main(["--listen", "127.0.0.1:0", str(tmp_path)]) == 1
    _one_error_line(capsys.readouterr().err, "is a directory")


def test_unreachable_nbd_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["--listen", "127.0.0.1:0", f"nbd://127.0.0.1:{port}/disk"]) == 1
    _one_error_line(capsys.readouterr().err, "NBD server", f"127.0.0.1:{port}", "refused")


class _NoDiscard(FileBackend):
    @property
    def supports_discard(self) -> bool:
        return False


def test_thin_provisioning_needs_storage_that_deallocates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _image(tmp_path / "disk.img")

    def open_backend(
        location: object, *, read_only: bool = False, write_cache: bool = True
    ) -> StorageBackend:
        return _NoDiscard(str(image), read_only=read_only)

    monkeypatch.setattr(cli, "open_backend", open_backend)
    assert main(["--listen", "127.0.0.1:0", f"{image},thin=on"]) == 1
    _one_error_line(capsys.readouterr().err, "cannot deallocate", "thin=on")
    # Without thin provisioning the same storage is fine.
    target = build_target(parse_args([str(image)]).luns)
    target.close()


def test_image_smaller_than_a_block_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = _image(tmp_path / "tiny.img", 1024)
    assert main(["--listen", "127.0.0.1:0", f"{tiny},bs=4096"]) == 1
    _one_error_line(capsys.readouterr().err, "smaller than one 4096-byte block")


# ------------------------------------------------------------------- a real NBD server


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """qemu-nbd exporting a 1 MiB image as "exp" on a unix socket: (URI, image path)."""
    tool = shutil.which("qemu-nbd")
    if tool is None:
        pytest.skip("qemu-nbd not installed (Debian qemu-utils)")
    pattern = bytes(range(256)) * 16
    image = _image(tmp_path / "nbd.img", 1 << 20, pattern)
    sock = tmp_path / "nbd.sock"
    argv = [tool, "--socket", str(sock), "--format", "raw", "--export-name", "exp"]
    process = subprocess.Popen([*argv, "--persistent", "--shared", "4", str(image)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert process.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not create its socket"
            time.sleep(0.05)
        yield f"nbd+unix:///exp?socket={sock}", image
    finally:
        process.terminate()
        process.wait(10)


def test_nbd_export_is_a_working_lu(qemu_nbd: tuple[str, Path]) -> None:
    uri, image = qemu_nbd
    target = build_target(parse_args([f"5={uri},ssd"]).luns)
    try:
        assert target.luns() == [5]
        assert _capacity(target, 5) == (2048, 512)
        pattern = image.read_bytes()[:4096]
        assert run_command(target, _read10(0, 8), data_in=4096, lun=5).data == pattern
        payload = os.urandom(1024)
        written = run_command(target, _write10(100, 2), data_out=payload, lun=5)
        assert written.status == Status.GOOD, written
        sync = run_command(target, bytes([0x35]) + bytes(9), lun=5)
        assert sync.status == Status.GOOD, sync
    finally:
        target.close()
    assert image.read_bytes()[100 * 512 : 102 * 512] == payload
