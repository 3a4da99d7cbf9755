"""The running daemon: LUNs, the vhost-user listener, the control socket, signals.

Holds `Daemon`, which opens the images into a `LunTable`, owns the listening sockets, serves
front-ends one at a time with `vhost_user.serve` (each connection gets a fresh `ScsiBackend`
over the same target, so LUN state survives reconnection), carries out control-socket commands
and announces them to the connected driver as virtio-scsi events, and stops cleanly on SIGINT or
SIGTERM. Knows nothing about the wire formats: those belong to the modules it wires together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from functools import partial

# trio 0.22 ships no type information; newer trio does.
import trio
from vhost_user import BusyPoll, serve

from .cli import CliError, DaemonOptions, bind_unix, prepare_listener
from .control import AddLun, Command, ControlError, ListLuns, RemoveLun, ResizeLun, serve_control
from .device import DeviceSettings, ScsiBackend
from .luns import LunError, LunSpec, LunTable
from .polling import BackendPoller

__all__ = ["Daemon", "DaemonError"]

logger = logging.getLogger(__name__)

#: How often the storage is asked whether it was resized outside (seconds).
SIZE_CHECK_INTERVAL = 1.0


class DaemonError(Exception):
    """The daemon cannot start (an image cannot be opened...); the message is for the operator."""


#: Busy polling only while at most this many commands are in flight: deeper queues keep the
#: loop busy anyway, and spinning then takes CPU from the storage server when it shares the
#: machine (unconditional polling cost 15-25% of QD32 reads on a local Ceph OSD).
SPIN_MAX_OUTSTANDING = 4


def _finish_completions(backends: list[ScsiBackend]) -> None:
    """After a polled back-end ran completions on this thread: finish them on the rings."""
    for backend in backends:
        backend.requests.finish_all()


def _worth_spinning(backends: list[ScsiBackend], luns: LunTable) -> bool:
    # Not while I/O threads work (a read that missed the page cache): they need the GIL,
    # which spinning holds most of the time, to hand their results back.
    if luns.io_busy:
        return False
    # The peak since the last decision, not the count now: a deep queue whose replies came in
    # one burst has nothing outstanding for a moment, and spinning then would take the CPU
    # the storage server needs for the next burst.
    return all(b.requests.take_peak() <= SPIN_MAX_OUTSTANDING for b in backends)


class Daemon:
    """One daemon process: a target with its LUNs, served on one vhost-user socket."""

    def __init__(
        self,
        options: DaemonOptions,
        luns: LunTable,
        listener: socket.socket,
        control: socket.socket | None,
        poller: BackendPoller | None = None,
    ) -> None:
        self.options = options
        self.luns = luns
        self.poller = poller
        self.listener = listener
        self.control = control
        self.settings = DeviceSettings(
            num_request_queues=options.num_queues, max_queue_size=options.queue_size
        )
        #: The connected device instances (at most one: vhost_user serves one front-end).
        self.backends: list[ScsiBackend] = []

    @classmethod
    def open(cls, options: DaemonOptions) -> Daemon:
        """Open every image and socket, or raise DaemonError / CliError with one clear line.

        Remote back-ends (NBD, RBD) are polled from the daemon's trio loop (`BackendPoller`),
        so call it on the thread that will `run` the daemon."""
        backends: list[ScsiBackend] = []
        # Also with --poll-max-us 0: then it never spins, but the loop still waits in the
        # spinner's epoll, where the kicks and the remote back-ends' replies are served
        # without a trip through trio's scheduler.
        busy = BusyPoll(options.poll_max_us * 1000)
        poller = BackendPoller(partial(_finish_completions, backends), busy_poll=busy)
        luns = LunTable(watcher=poller)
        busy.worth_it = partial(_worth_spinning, backends, luns)
        try:
            for image in options.images:
                luns.add(
                    LunSpec(
                        lun=image.lun,
                        path=image.path,
                        read_only=options.read_only,
                        solid_state=options.solid_state,
                        block_size=options.block_size,
                        write_cache=options.write_cache,
                    )
                )
            listener = prepare_listener(options)
        except LunError as exc:
            luns.close()
            raise DaemonError(str(exc)) from None
        except CliError:
            luns.close()
            raise
        control = None
        if options.control_socket is not None:
            try:
                control = bind_unix(options.control_socket, "control socket")
            except CliError:
                luns.close()
                listener.close()
                raise
        daemon = cls(options, luns, listener, control, poller)
        daemon.backends = backends
        return daemon

    # -- running ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM (blocking; needs the main thread for signals)."""
        trio.run(self.serve)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or signalled; `task_status.started()` once listening."""
        async with trio.open_nursery() as nursery:
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
                await nursery.start(self._watch_signals, nursery.cancel_scope)
            # serve() owns the fd from here and closes it; our object must not close it too.
            fd = self.listener.detach()
            if self.poller is not None:
                await nursery.start(self.poller.run)
            if self.busy_poll is not None:
                await nursery.start(self.busy_poll.run)
            await nursery.start(partial(serve, self._new_backend, listen_fd=fd))
            if self.control is not None:
                await nursery.start(serve_control, self.control, self.handle_command)
            nursery.start_soon(self._watch_sizes)
            where = self.options.socket_path or f"fd {self.options.socket_fd}"
            logger.info(
                "serving %d LUN(s) on %s (%d request queue(s)%s)",
                len(self.luns),
                where,
                self.options.num_queues,
                f", control socket {self.options.control_socket}" if self.control else "",
            )
            task_status.started()

    async def _watch_signals(
        self,
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                logger.info("%s: shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _watch_sizes(self) -> None:
        """Announce resizes the storage noticed by itself (an RBD image resized by another
        client), as the control socket's `resize` does."""
        while True:
            await trio.sleep(SIZE_CHECK_INTERVAL)
            for lun in self.luns.resized_outside():
                try:
                    old, new = self.luns.resize(lun)
                except LunError as exc:  # removed meanwhile
                    logger.debug("LUN %d: %s", lun, exc)
                    continue
                if new != old:
                    for backend in self.backends:
                        backend.events.capacity_changed(lun)
                logger.info("LUN %d resized outside: %d -> %d bytes", lun, old, new)

    @property
    def busy_poll(self) -> BusyPoll | None:
        """The busy polling shared by the queues and the polled back-ends (None: off)."""
        return self.poller.busy_poll if self.poller is not None else None

    def _new_backend(self) -> ScsiBackend:
        return ScsiBackend(
            self.luns.target,
            self.settings,
            on_connect=self.backends.append,
            on_disconnect=self.backends.remove,
            busy_poll=self.busy_poll,
        )

    def close(self) -> None:
        """Release images and remove the socket files we created."""
        self.luns.close()
        busy = self.busy_poll
        if busy is not None:
            logger.info(
                "busy polling: %d spins, %d found an event, %d events handled in the spin, "
                "%d rings served without a kick; %d waits of the loop in its epoll found "
                "events, %d served there",
                busy.spins,
                busy.hits,
                busy.dispatched,
                busy.ring_serves,
                busy.sleeps,
                busy.sleep_dispatched,
            )
            busy.close()
        with contextlib.suppress(OSError):
            self.listener.close()
        for path, sock in (
            (self.options.socket_path, self.listener),
            (self.options.control_socket, self.control),
        ):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    # -- control commands -------------------------------------------------------------------

    async def handle_command(self, command: Command) -> str:
        """Carry out one control command and tell the connected driver about it."""
        try:
            if isinstance(command, AddLun):
                self.luns.add(
                    LunSpec(
                        lun=command.lun,
                        path=command.image,
                        read_only=command.read_only or self.options.read_only,
                        solid_state=command.solid_state or self.options.solid_state,
                        block_size=command.block_size or self.options.block_size,
                        write_cache=self.options.write_cache
                        if command.write_cache is None
                        else command.write_cache,
                    )
                )
                for backend in self.backends:
                    backend.events.lun_added(command.lun)
                logger.info("LUN %d added: %s", command.lun, command.image)
                return f"LUN {command.lun} added"
            if isinstance(command, RemoveLun):
                self.luns.remove(command.lun)
                for backend in self.backends:
                    backend.events.lun_removed(command.lun)
                logger.info("LUN %d removed", command.lun)
                return f"LUN {command.lun} removed"
            if isinstance(command, ResizeLun):
                old, new = self.luns.resize(command.lun)
                if new != old:
                    for backend in self.backends:
                        backend.events.capacity_changed(command.lun)
                logger.info("LUN %d resized: %d -> %d bytes", command.lun, old, new)
                return f"LUN {command.lun} size {new}"
            assert isinstance(command, ListLuns)
            return self.luns.describe()
        except LunError as exc:
            raise ControlError(str(exc)) from None
