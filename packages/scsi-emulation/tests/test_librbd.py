"""The librbd ctypes bindings and the RBD back-end's pieces that need no cluster: the missing
library error, the C struct layouts, errno mapping, iovec building over caller buffers (no
copy), the zero-filled tail of a short read, connection errors that librados reports before
talking to any monitor, and the back-end's completion machinery (polled and threaded) over a
fake librbd."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_emulation.backend import BackendError, Done
from scsi_emulation.backends import librbd
from scsi_emulation.backends import rbd as rbd_backend
from scsi_emulation.backends.uri import open_backend


def _library_or_skip() -> librbd.Library:
    try:
        return librbd.load()
    except BackendError as e:
        pytest.skip(str(e))


def test_missing_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(librbd, "_library", None)
    monkeypatch.setattr(librbd, "LIBRADOS_NAMES", ("librados-absent.so.99",))
    with pytest.raises(BackendError, match="librbd1") as info:
        librbd.load()
    assert info.value.errno == errno.ENOSYS
    with pytest.raises(BackendError, match="librbd1") as info:
        open_backend("rbd:rbd/image")
    assert info.value.errno == errno.ENOSYS


def test_struct_layouts_match_the_c_headers() -> None:
    # struct iovec (x86-64 / aarch64 LP64): void *, size_t.
    assert ctypes.sizeof(librbd.Iovec) == 16
    assert librbd.Iovec.iov_len.offset == 8
    # rbd_image_info_t: three uint64, int, char[24], int64 (aligned to 8), char[96].
    info = librbd.ImageInfo
    offsets = {name: getattr(info, name).offset for name, *_ in info._fields_}
    assert offsets == {
        "size": 0,
        "obj_size": 8,
        "num_objs": 16,
        "order": 24,
        "block_name_prefix": 28,
        "parent_pool": 56,
        "parent_name": 64,
    }
    assert ctypes.sizeof(info) == 160


def test_every_declared_function_is_typed() -> None:
    lib = _library_or_skip()
    for table in (librbd._RADOS_FUNCTIONS, librbd._RBD_FUNCTIONS):
        for name, (restype, argtypes) in table.items():
            func = getattr(lib, name)
            assert func.restype is restype and tuple(func.argtypes) == argtypes, name
    with pytest.raises(AttributeError, match="not declared"):
        _ = lib.rbd_aio_discard


@given(st.integers(min_value=-4095, max_value=1 << 40))
def test_check_maps_negative_returns_to_errno(rc: int) -> None:
    if rc >= 0:
        assert librbd.check(rc, "op") == rc
        return
    with pytest.raises(BackendError) as info:
        librbd.check(rc, "op")
    assert info.value.errno == -rc and str(info.value.strerror).startswith("op: ")


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=6), st.data())
def test_zero_tail_keeps_the_head_and_zeroes_the_rest(
    sizes: list[int], data: st.DataObject
) -> None:
    total = sum(sizes)
    done = data.draw(st.integers(min_value=0, max_value=total))
    backing = bytearray(b"\xaa" * total)
    view = memoryview(backing)
    buffers, pos = [], 0
    for n in sizes:
        buffers.append(view[pos : pos + n])
        pos += n
    rbd_backend._zero_tail(buffers, done)
    assert backing == b"\xaa" * done + bytes(total - done)


@given(st.lists(st.integers(min_value=0, max_value=5000), min_size=2, max_size=8))
def test_iovecs_point_into_the_callers_memory(sizes: list[int]) -> None:
    region = mmap.mmap(-1, sum(sizes) + 1)
    view = memoryview(region)
    try:
        buffers, pos = [], 0
        for n in sizes:
            buffers.append(view[pos : pos + n])
            pos += n
        base = ctypes.addressof(ctypes.c_char.from_buffer(view))
        iov, count, anchors = rbd_backend._iovecs(buffers, True)
        expected = [(base + sum(sizes[:i]), n) for i, n in enumerate(sizes) if n]
        assert count == len(expected)
        assert [(iov[i].iov_base, iov[i].iov_len) for i in range(count)] == expected
        with pytest.raises(BufferError):  # pinned while the anchors live
            region.close()
        del anchors, iov, buffers
    finally:
        view.release()
        region.close()


def test_read_only_buffers_are_copied_for_writes_and_refused_for_reads() -> None:
    data = bytes(range(256)) * 4
    views = [memoryview(data)[:100], memoryview(data)[100:]]
    iov, count, _anchors = rbd_backend._iovecs(views, False)
    assert count == 2
    assert ctypes.string_at(iov[0].iov_base, 100) == data[:100]
    assert ctypes.string_at(iov[1].iov_base, iov[1].iov_len) == data[100:]
    with pytest.raises(TypeError):
        rbd_backend._iovecs(views, True)


def test_unreadable_conf_is_reported_before_connecting() -> None:
    _library_or_skip()
    with pytest.raises(BackendError, match=r"rbd:p/i: cannot read /nonexistent/ceph\.conf") as info:
        rbd_backend.RbdBackend.open("rbd:p/i?conf=/nonexistent/ceph.conf")
    assert info.value.errno == errno.ENOENT


# -- the back-end's completion machinery over a fake librbd ----------------------------------


class FakeLibrbd:
    """Just enough of librbd for `RbdBackend`'s data path: an in-memory image, completions
    whose addresses are reused LIFO (as malloc does), finished when the test says so and then
    queued for rbd_poll_io_events with the eventfd signalled, as librbd's event socket does."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.disk = bytearray(size)
        self.event_fd = -1
        self.free_ids: list[int] = []
        self.next_id = 0x1000
        self.live: dict[int, tuple[str, int, list[tuple[int, int]]]] = {}
        self.finished: list[int] = []  # done, not yet queued
        self.queued: list[int] = []  # queued for rbd_poll_io_events
        self.results: dict[int, int] = {}
        self.fail_next: int = 0  # negative: the next finished request returns this
        self.refuse_next: int = 0  # negative: the next submission is refused with this
        self.released: list[int] = []
        self.lock = threading.Lock()

    # image
    def rbd_get_size(self, image: int, out: Any) -> int:
        out._obj.value = len(self.disk)
        return 0

    def rbd_stat(self, image: int, info: Any, size: int) -> int:
        info._obj.obj_size = 4 << 20
        return 0

    def rbd_set_image_notification(self, image: int, fd: int, kind: int) -> int:
        assert kind == librbd.EVENT_TYPE_EVENTFD
        self.event_fd = fd
        return 0

    def rbd_update_watch(self, image: int, handle: Any, callback: Any, arg: Any) -> int:
        self.watch = callback
        handle._obj.value = 7
        return 0

    def rbd_update_unwatch(self, image: int, handle: int) -> int:
        return 0

    def rbd_close(self, image: int) -> int:
        return 0

    # completions
    def rbd_aio_create_completion(self, arg: Any, callback: Any, out: Any) -> int:
        assert arg is None and callback is None
        if self.free_ids:
            out.value = self.free_ids.pop()
        else:
            out.value = self.next_id
            self.next_id += 0x10
        return 0

    def _submit(self, kind: str, iov: Any, count: int, offset: int, c: int) -> int:
        if self.refuse_next:
            rc, self.refuse_next = self.refuse_next, 0
            return rc
        iovs = [iov] if isinstance(iov, librbd.Iovec) else [iov[i] for i in range(count)]
        with self.lock:
            self.live[c] = (kind, offset, [(v.iov_base, v.iov_len) for v in iovs])
        return 0

    def rbd_aio_readv(self, image: int, iov: Any, count: int, offset: int, c: int) -> int:
        return self._submit("read", iov, count, offset, c)

    def rbd_aio_writev(self, image: int, iov: Any, count: int, offset: int, c: int) -> int:
        return self._submit("write", iov, count, offset, c)

    def rbd_aio_flush(self, image: int, c: int) -> int:
        with self.lock:
            self.live[c] = ("flush", 0, [])
        return 0

    def finish_all(self) -> None:
        """Do every live request, queue the completions and signal the eventfd."""
        with self.lock:
            live, self.live = self.live, {}
            for c, (kind, offset, iovs) in live.items():
                pos = offset
                for base, n in iovs:
                    end = min(pos + n, len(self.disk))
                    if kind == "read":
                        ctypes.memmove(base, bytes(self.disk[pos:end]), max(end - pos, 0))
                    elif kind == "write":
                        self.disk[pos:end] = ctypes.string_at(base, max(end - pos, 0))
                    pos += n
                done = min(pos, len(self.disk)) - offset if kind == "read" else 0
                if self.fail_next:
                    done, self.fail_next = self.fail_next, 0
                self.results[c] = done
                self.queued.append(c)
        os.eventfd_write(self.event_fd, 1)

    def rbd_poll_io_events(self, image: int, comps: Any, n: int) -> int:
        with self.lock:
            take, self.queued = self.queued[:n], self.queued[n:]
        for i, c in enumerate(take):
            comps[i] = c
        return len(take)

    def rbd_aio_get_return_value(self, c: int) -> int:
        return self.results[c]

    def rbd_aio_release(self, c: int) -> None:
        self.released.append(c)
        self.free_ids.append(c)  # the next completion gets this address again


class _FakeHandle:
    def __init__(self, lib: FakeLibrbd) -> None:
        self.lib = lib
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _fake_backend(lib: FakeLibrbd, read_only: bool = False) -> rbd_backend.RbdBackend:
    from scsi_emulation.backends.uri import RbdLocation

    handle: Any = _FakeHandle(lib)
    return rbd_backend.RbdBackend(handle, handle, 1, RbdLocation("p", "i"), read_only)


def test_polled_completions_run_in_service_with_reused_addresses() -> None:
    lib = FakeLibrbd()
    lib.disk[:] = bytes(range(256)) * (len(lib.disk) // 256)
    backend = _fake_backend(lib)
    try:
        assert backend.start_polling() and backend.poll_fileno() == lib.event_fd
        me = threading.get_ident()
        seen: list[tuple[int, BackendError | None]] = []
        for round_ in range(3):  # the completion addresses repeat from round to round
            outs = [bytearray(4096) for _ in range(32)]
            seen.clear()
            for i, out in enumerate(outs):

                def done(error: BackendError | None, i: int = i) -> None:
                    assert threading.get_ident() == me
                    seen.append((i, error))

                backend.submit_read((i + round_) * 4096, [memoryview(out)], 4096, done)
            assert seen == []
            lib.finish_all()
            assert seen == []  # only service() delivers
            backend.service()
            assert sorted(seen) == [(i, None) for i in range(32)]
            for i, out in enumerate(outs):
                start = (i + round_) * 4096
                assert out == lib.disk[start : start + 4096]
        assert len(set(lib.released)) == 32 and len(lib.released) == 96
    finally:
        backend.close()


def test_durable_write_is_followed_by_a_flush_and_errors_map_to_errno() -> None:
    lib = FakeLibrbd()
    backend = _fake_backend(lib)
    try:
        assert backend.start_polling()
        seen: list[BackendError | None] = []
        data = memoryview(b"\x07" * 4096)
        backend.submit_write(8192, [data[:1000], data[1000:]], 4096, True, seen.append)
        lib.finish_all()
        backend.service()
        assert seen == [] and [k for k, _, _ in lib.live.values()] == ["flush"]
        lib.finish_all()
        backend.service()
        assert seen == [None] and lib.disk[8192 : 8192 + 4096] == b"\x07" * 4096
        lib.fail_next = -errno.EIO
        backend.submit_flush(seen.append)
        lib.finish_all()
        backend.service()
        assert isinstance(seen[1], BackendError) and seen[1].errno == errno.EIO
        lib.refuse_next = -errno.EINVAL  # refused outright: answered inline, released
        released = len(lib.released)
        backend.submit_read(0, [memoryview(bytearray(512))], 512, seen.append)
        assert isinstance(seen[2], BackendError) and seen[2].errno == errno.EINVAL
        assert len(lib.released) == released + 1 and not lib.live
    finally:
        backend.close()


def test_short_read_zeroes_the_tail_and_past_the_end_reads_zeros() -> None:
    lib = FakeLibrbd(size=8192)
    lib.disk[:] = b"\x01" * 8192
    backend = _fake_backend(lib)
    try:
        assert backend.start_polling()
        seen: list[BackendError | None] = []
        out = bytearray(b"\xff" * 8192)
        view = memoryview(out)
        backend.submit_read(4096, [view[:100], view[100:]], 8192, seen.append)
        lib.finish_all()
        backend.service()
        assert seen == [None] and out == b"\x01" * 4096 + bytes(4096)
        out[:] = b"\xff" * 8192
        backend.submit_read(8192, [view], 8192, seen.append)  # nothing sent to librbd
        assert seen == [None, None] and out == bytes(8192) and not lib.live
    finally:
        backend.close()


def test_not_polled_completions_arrive_on_the_backends_thread() -> None:
    lib = FakeLibrbd()
    backend = _fake_backend(lib)
    try:
        names: list[str] = []
        arrived = threading.Event()

        def done(error: BackendError | None) -> None:
            names.append(threading.current_thread().name)
            arrived.set()

        backend.submit_flush(done)
        assert backend.poll_fileno() is None
        lib.finish_all()
        assert arrived.wait(10)
        assert names == ["rbd-completions rbd:p/i"]
    finally:
        backend.close()
    assert not any(t.name.startswith("rbd-completions") for t in threading.enumerate())


def test_a_raising_callback_does_not_lose_the_others(caplog: pytest.LogCaptureFixture) -> None:
    lib = FakeLibrbd()
    backend = _fake_backend(lib)
    try:
        assert backend.start_polling()
        seen: list[BackendError | None] = []

        def bad(error: BackendError | None) -> None:
            raise RuntimeError("callback bug")

        backend.submit_flush(bad)
        backend.submit_flush(seen.append)
        lib.finish_all()
        backend.service()
        assert seen == [None] and "a completion callback raised" in caplog.text
    finally:
        backend.close()


def test_close_waits_for_requests_in_flight() -> None:
    lib = FakeLibrbd()
    backend = _fake_backend(lib)
    assert backend.start_polling()
    seen: list[BackendError | None] = []
    backend.submit_flush(seen.append)
    timer = threading.Timer(0.2, lib.finish_all)
    timer.start()
    backend.close()  # drains what was in flight before closing the image
    timer.join()
    assert seen == [None]
    after: list[BackendError | None] = []
    backend.submit_flush(after.append)
    assert isinstance(after[0], BackendError) and after[0].errno == errno.EBADF


def test_completion_addresses_reused_across_threads_are_not_confused() -> None:
    """Not polled: the completion thread takes completions while this thread submits, and
    librbd hands a released completion's address to the next one at once. A completion must
    leave the table before it is released, or a new request's entry is taken for it."""
    lib = FakeLibrbd()
    lib.disk[:] = os.urandom(len(lib.disk))
    release = lib.rbd_aio_release

    def slow_release(c: int) -> None:
        release(c)
        time.sleep(0.0002)  # widen the window in which the address is reused

    lib.rbd_aio_release = slow_release  # type: ignore[method-assign]
    backend = _fake_backend(lib)
    stop = threading.Event()

    def finisher() -> None:
        while not stop.is_set():
            lib.finish_all()
            time.sleep(0.0005)

    thread = threading.Thread(target=finisher)
    thread.start()
    try:
        n = 400
        outs = [bytearray(512) for _ in range(n)]
        seen: list[int] = []
        all_done = threading.Event()

        def make_done(i: int) -> Done:
            def done(error: BackendError | None) -> None:
                assert error is None
                seen.append(i)
                if len(seen) == n:
                    all_done.set()

            return done

        for i, out in enumerate(outs):
            backend.submit_read(i * 512, [memoryview(out)], 512, make_done(i))
            if i % 8 == 0:
                time.sleep(0.0001)
        assert all_done.wait(20), f"{n - len(seen)} completions lost"
        assert sorted(seen) == list(range(n))
        assert all(out == lib.disk[i * 512 : (i + 1) * 512] for i, out in enumerate(outs))
    finally:
        stop.set()
        thread.join()
        backend.close()
