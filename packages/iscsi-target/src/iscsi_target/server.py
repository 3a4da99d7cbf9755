"""The trio TCP server: a listener, one task per connection, a cap on connections.

Moves bytes between sockets and the sans-IO `Connection`s and turns completions of pending
SCSI commands (possibly from other threads) into work on the trio thread. It holds no protocol
logic of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from scsi_core.target import Target

from iscsi_target.config import TargetConfig
from iscsi_target.connection import Connection, ConnectionState
from iscsi_target.registry import SessionRegistry

__all__ = ["DEFAULT_PORT", "IscsiServer", "serve"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 3260
RECEIVE_SIZE = 1 << 18
LOGIN_TIMEOUT = 30.0


class IscsiServer:
    """Serves one target on TCP listeners; `run` accepts until cancelled."""

    def __init__(
        self,
        target: Target,
        config: TargetConfig,
        *,
        max_connections: int = 64,
        login_timeout: float = LOGIN_TIMEOUT,
    ) -> None:
        self.registry = SessionRegistry(target, config)
        self.max_connections = max_connections
        self.login_timeout = login_timeout
        self.active = 0

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on `listeners` until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning.
                    logger.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                peer = _peer_name(stream)
                if self.active >= self.max_connections:
                    logger.warning("%s: refused, %d connections open", peer, self.active)
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(self._serve_connection, stream, peer)

    async def _serve_connection(self, stream: trio.SocketStream, peer: str) -> None:
        self.active += 1
        token = trio.lowlevel.current_trio_token()
        connection = Connection(self.registry, marshal=token.run_sync_soon, peer=peer)
        send_lock = trio.Lock()
        logger.debug("%s: connected", peer)

        async def flush() -> None:
            async with send_lock:
                while parts := connection.data_to_send():
                    await stream.send_all(b"".join(parts))

        try:
            async with trio.open_nursery() as nursery:
                connection.on_close_request = nursery.cancel_scope.cancel
                connection.on_output = _spawner(nursery, flush)
                nursery.start_soon(self._login_watchdog, connection, nursery.cancel_scope)
                while True:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    connection.receive_data(data)
                    await flush()
                    if connection.wants_close:
                        break
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.info("%s: connection lost: %s", peer, exc)
        finally:
            connection.connection_lost()
            self.active -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            logger.debug("%s: closed", peer)

    async def _login_watchdog(self, connection: Connection, scope: trio.CancelScope) -> None:
        await trio.sleep(self.login_timeout)
        if connection.state is ConnectionState.LOGIN:
            logger.warning("%s: no login within %.0f s", connection.peer, self.login_timeout)
            scope.cancel()


def _spawner(nursery: trio.Nursery, flush: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    def spawn() -> None:
        nursery.start_soon(flush)

    return spawn


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


async def serve(
    target: Target,
    config: TargetConfig,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_connections: int = 64,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port and serve `target` until cancelled.

    `task_status.started` receives the listeners (so a caller that asked for port 0 can learn
    the port).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = IscsiServer(target, config, max_connections=max_connections)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, listeners)
        task_status.started(listeners)
