"""Back-ends in their own processes: the rng example, SIGTERM, and kill -9 with I/O in flight."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import trio
from vhost_user import SharedMemory, VhostUserFrontend, serve

PACKAGE = Path(__file__).resolve().parent.parent
RNG = PACKAGE / "examples" / "vhost_user_rng.py"
HOLDING = Path(__file__).resolve().parent / "holding_backend.py"


def load_rng_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vhost_user_rng_example", RNG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def wait_for_socket(path: str, process: subprocess.Popen[bytes]) -> None:
    with trio.fail_after(10):
        while not os.path.exists(path):
            assert process.poll() is None, process.communicate()
            await trio.sleep(0.02)


async def test_rng_example_in_process(tmp_path: Path) -> None:
    rng = load_rng_example()
    path = str(tmp_path / "rng.sock")
    memory = SharedMemory(1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(rng.RngBackend, socket_path=path, task_status=task_status)
        )
        frontend = await VhostUserFrontend.connect(path)
        try:
            await frontend.negotiate()
            queue = frontend.add_queue(0, memory, 0x1000, 8)
            await frontend.start([memory])
            with trio.fail_after(5):
                queue.driver.add_chain([(0x10000, 256, True), (0x20000, 256, True)])
                queue.driver.add_chain([(0x30000, 64, False)])  # nothing writable: 0 bytes
                queue.submit()
                used = await queue.wait_used(2)
            assert [u.len for u in used] == [512, 0]
            a = bytes(memory.memory.slice(0x10000, 256))
            b = bytes(memory.memory.slice(0x20000, 256))
            assert a != bytes(256) and b != bytes(256) and a != b
        finally:
            await frontend.aclose()
            frontend.close_resources()
            memory.close()
            nursery.cancel_scope.cancel()


async def test_rng_example_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "rng.sock")
    process = subprocess.Popen(
        [sys.executable, str(RNG), "--socket-path", path], stderr=subprocess.PIPE
    )
    try:
        await wait_for_socket(path, process)
        frontend = await VhostUserFrontend.connect(path)
        assert await frontend.get_features()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        await frontend.aclose()
        assert not os.path.exists(path)
        assert b"SIGTERM received" in process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_inflight_requests_complete_after_backend_is_killed(tmp_path: Path) -> None:
    """vhost-user.rst "Inflight I/O tracking", end to end.

    The first back-end pops 12 requests, completes 6 and holds 6; it is killed with SIGKILL.
    A new back-end process starts on the same socket, the front-end reconnects and replays
    the inflight area; the 6 held requests are resubmitted and completed, none twice.
    """
    path = str(tmp_path / "hold.sock")
    memory = SharedMemory(1 << 20)
    first = subprocess.Popen(
        [sys.executable, str(HOLDING), "--socket-path", path, "--hold"], stderr=subprocess.PIPE
    )
    second: subprocess.Popen[bytes] | None = None
    frontend: VhostUserFrontend | None = None
    try:
        await wait_for_socket(path, first)
        frontend = await VhostUserFrontend.connect(path)
        await frontend.negotiate()
        await frontend.setup_inflight(1, 16)
        queue = frontend.add_queue(0, memory, 0x1000, 16)
        await frontend.start([memory])
        buffers = {
            queue.driver.add_chain([(0x10000 + i * 0x100, 0x100, True)]): i for i in range(12)
        }
        queue.submit()
        with trio.fail_after(10):
            done = await queue.wait_used(6)
        assert len(done) == 6

        first.kill()
        first.wait(timeout=10)
        os.unlink(path)  # a SIGKILLed back-end cannot clean up its socket
        second = subprocess.Popen(
            [sys.executable, str(HOLDING), "--socket-path", path], stderr=subprocess.PIPE
        )
        await wait_for_socket(path, second)
        await frontend.reconnect()
        with trio.fail_after(10):
            rest = await queue.wait_used(6)
        completed = [u.id for u in done + rest]
        assert sorted(completed) == sorted(buffers)  # each exactly once
        for head, i in buffers.items():
            assert (
                bytes(memory.memory.slice(0x10000 + i * 0x100, 0x100)) == bytes([head + 1]) * 0x100
            )
        # Nothing more arrives: no request was completed twice.
        with trio.move_on_after(0.2):
            extra = await queue.wait_used(1)
            raise AssertionError(f"unexpected completion {extra}")
        second.send_signal(signal.SIGTERM)
        _out, err = second.communicate(timeout=10)
        assert b"vring 0: resubmitting 6 in-flight chains" in err
    finally:
        if frontend is not None:
            await frontend.aclose()
            frontend.close_resources()
        memory.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
