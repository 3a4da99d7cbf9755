"""Storage locations: parsing what an operator writes, and opening files through it."""

from __future__ import annotations

import errno
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_emulation.backend import BackendError, FileBackend, StorageBackend
from scsi_emulation.backends.uri import (
    RBD_DEFAULT_TIMEOUT,
    FileLocation,
    LocationError,
    NbdLocation,
    RbdLocation,
    open_backend,
    parse_location,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("disk.img", FileLocation("disk.img")),
        ("disk:1.img", FileLocation("disk:1.img")),
        ("/dev/loop0", FileLocation("/dev/loop0")),
        ("file:disk.img", FileLocation("disk.img")),
        ("file:/abs/d.img?direct=on", FileLocation("/abs/d.img", True)),
        ("file:///abs/d%20x.img", FileLocation("/abs/d x.img")),
        ("nbd://server/disk", NbdLocation("disk", host="server", port=10809)),
        ("nbd://127.0.0.1:10810/", NbdLocation("", host="127.0.0.1", port=10810)),
        ("nbd://127.0.0.1", NbdLocation("", host="127.0.0.1", port=10809)),
        ("nbd://[::1]:99/a%2Fb", NbdLocation("a/b", host="::1", port=99)),
        ("nbd+unix:///e?socket=/run/n.sock", NbdLocation("e", socket_path="/run/n.sock")),
        ("nbd+unix:///?socket=/s", NbdLocation("", socket_path="/s")),
        ("rbd:rbd/vm1", RbdLocation("rbd", "vm1")),
        ("rbd:p/i?conf=/etc/c.conf&id=admin", RbdLocation("p", "i", "/etc/c.conf", "admin")),
        ("rbd:p/i?timeout=5", RbdLocation("p", "i", timeout=5)),
        ("rbd:p/i?id=u&timeout=86400&conf=/c", RbdLocation("p", "i", "/c", "u", 86400)),
        ("rbd:p/i?timeout=007", RbdLocation("p", "i", timeout=7)),
        ("rbd:p/i?cache=off", RbdLocation("p", "i", cache=False)),
        ("rbd:p/i?conf=/c&cache=on", RbdLocation("p", "i", "/c", cache=True)),
    ],
)
def test_parse(text: str, expected: object) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("file:", "no path"),
        ("file:x?direct=maybe", "not on/off"),
        ("file:x?cache=none", "unknown parameter 'cache'"),
        ("file://otherhost/x", "another host"),
        ("nbd://", "no server host"),
        ("nbd://h:99999/x", "out of range"),
        ("nbd://h/x?socket=/s", "unknown parameter"),
        ("nbds://h/x", "not supported"),
        ("nbd+unix:///x", r"needs \?socket"),
        ("nbd+unix://host/x?socket=/s", "no host"),
        ("nbd+tcp://h/x", "unknown scheme"),
        ("nbd://u@h/x", "user names"),
        ("rbd:pool", "expected rbd:POOL/IMAGE"),
        ("rbd:/img", "expected rbd:POOL/IMAGE"),
        ("rbd:p/i/j", "expected rbd:POOL/IMAGE"),
        ("rbd:p/i?conf=", "empty conf"),
        ("rbd:p/i?conf=a&conf=b", "twice"),
        ("rbd:p/i?cache=maybe", "cache='maybe' is not on/off"),
        ("rbd:p/i?cache=", "cache='' is not on/off"),
        ("rbd:p/i?timeout=", "timeout='' is not a whole number of seconds from 1 to 86400"),
        ("rbd:p/i?timeout=0", "timeout='0' is not a whole number"),
        ("rbd:p/i?timeout=-5", "timeout='-5' is not"),
        ("rbd:p/i?timeout=%2B5", r"timeout='\+5' is not"),
        ("rbd:p/i?timeout=1.5", "timeout='1.5' is not"),
        ("rbd:p/i?timeout=5s", "timeout='5s' is not"),
        ("rbd:p/i?timeout=%205", "timeout=' 5' is not"),
        ("rbd:p/i?timeout=5_0", "timeout='5_0' is not"),
        ("rbd:p/i?timeout=%D9%A5", "is not a whole number"),  # ARABIC-INDIC DIGIT FIVE
        ("rbd:p/i?timeout=86401", "timeout='86401' is not"),
        ("rbd:p/i?timeout=" + "9" * 5000, "is not a whole number"),  # int() would refuse it
        ("rbd:p/i?timeout=5&timeout=6", "parameter 'timeout' given twice"),
        ("rbd:p/i?timeot=5", "unknown parameter 'timeot' .expected: conf, id, timeout"),
    ],
)
def test_parse_errors(text: str, needle: str) -> None:
    with pytest.raises(LocationError, match=needle):
        parse_location(text)


def test_rbd_timeout_defaults_to_thirty_seconds() -> None:
    location = parse_location("rbd:p/i?conf=/c")
    assert isinstance(location, RbdLocation)
    assert location.timeout == RBD_DEFAULT_TIMEOUT == 30


@given(timeout=st.integers(1, 86400))
def test_rbd_timeout_accepts_every_second_of_a_day(timeout: int) -> None:
    location = parse_location(f"rbd:p/i?timeout={timeout}")
    assert isinstance(location, RbdLocation) and location.timeout == timeout


@given(
    export=st.text(max_size=30),
    host=st.sampled_from(["localhost", "10.0.0.1", "::1", "storage.example"]),
    port=st.integers(1, 65535),
)
def test_nbd_location_round_trips(export: str, host: str, port: int) -> None:
    location = NbdLocation(export, host=host, port=port)
    assert parse_location(str(location)) == location


@given(export=st.text(max_size=30), path=st.from_regex(r"/[a-z0-9/._-]{1,20}", fullmatch=True))
def test_nbd_unix_location_round_trips(export: str, path: str) -> None:
    location = NbdLocation(export, socket_path=path)
    assert parse_location(str(location)) == location


def test_open_file_and_errors(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(8192))
    backend: StorageBackend = open_backend(str(image))
    assert isinstance(backend, FileBackend) and backend.size == 8192
    assert backend.logical_block_size == 1 and not backend.asynchronous
    backend.close()
    with pytest.raises(BackendError, match=r"cannot open image .*missing\.img") as info:
        open_backend(str(tmp_path / "missing.img"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BackendError, match="is a directory"):
        open_backend(f"file:{tmp_path}")


def test_direct_file_bounces_unaligned_buffers(tmp_path: pathlib.Path) -> None:
    """O_DIRECT with buffers that are not aligned in memory still moves the right bytes."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(65536))
    try:
        backend = open_backend(f"file:{image}?direct=on")
    except BackendError as e:  # tmpfs refuses O_DIRECT
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    assert isinstance(backend, FileBackend) and backend.direct
    raw = bytearray(4096 + 1)
    src = memoryview(raw)[1:]  # odd address: O_DIRECT says EINVAL, the bounce path runs
    src[:] = b"q" * 4096
    backend.write(4096, [src[:1000], src[1000:]], 4096)
    assert backend.read_nowait(4096, [src], 4096) == 0
    out = memoryview(bytearray(4097))[1:]
    backend.read(4096, [out], 4096)
    assert bytes(out) == b"q" * 4096
    assert image.read_bytes()[4096:8192] == b"q" * 4096
    backend.close()


def test_default_async_calls_complete_inline(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    backend = FileBackend(image)
    seen: list[BackendError | None] = []
    backend.submit_write(0, [memoryview(b"ab")], 2, True, seen.append)
    out = bytearray(2)
    backend.submit_read(0, [memoryview(out)], 2, seen.append)
    backend.submit_flush(seen.append)
    assert seen == [None, None, None] and out == b"ab"
    backend.close()
    backend.submit_read(0, [memoryview(out)], 2, seen.append)
    assert isinstance(seen[-1], BackendError) and seen[-1].errno == errno.EBADF


def test_rbd_without_librbd_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without Ceph's C libraries: opening an rbd: LU says what to install."""
    from scsi_emulation.backends import librbd

    monkeypatch.setattr(librbd, "_library", None)
    monkeypatch.setattr(librbd, "LIBRBD_NAMES", ("librbd-that-is-not-there.so.1",))
    with pytest.raises(BackendError, match="librbd1") as caught:
        open_backend("rbd:rbd/none")
    assert caught.value.errno == errno.ENOSYS
