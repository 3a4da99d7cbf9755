"""What a vhost-user device type implements: ``VhostUserBackend``.

The protocol layer (``connection``) negotiates, maps memory and starts rings; a device only
says what it offers and handles kicks. Everything here is synchronous except ``run``, which the
server runs beside the connection for work a device does in the background (completions coming
back from threads, timers). Knows nothing about the wire format or sockets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from .errors import RequestError
from .vring import Vring

if TYPE_CHECKING:
    from .busy_poll import BusyPoll

__all__ = ["VhostUserBackend"]


class VhostUserBackend(ABC):
    """A device type behind vhost-user (the model is rust-vmm's ``VhostUserBackend`` trait).

    Subclasses set ``num_queues`` (what GET_QUEUE_NUM reports) and may lower
    ``max_queue_size``. Methods other than ``features`` and ``handle_kick`` have harmless
    defaults. A method that raises makes the request that called it fail (an error reply);
    it never takes the connection or the daemon down.
    """

    num_queues: int
    max_queue_size: int = 1024
    #: Set to spin on the queues' kicks before the loop sleeps (`run_queue` watches each
    #: kick eventfd and reports each drained kick as activity); None: never spin.
    busy_poll: BusyPoll | None = None

    @abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered: device bits, ring bits and VIRTIO_F_VERSION_1."""

    def protocol_features(self) -> int:
        """Extra ``ProtocolFeature`` bits the device supports (only CONFIG is honoured)."""
        return 0

    def set_features(self, features: int) -> None:
        """The features the front-end acknowledged (SET_FEATURES)."""
        return None

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the config space from ``offset``; anything else is an error."""
        raise RequestError("device has no config space")

    def set_config(self, offset: int, data: bytes) -> None:
        """A write to the config space; raise ``RequestError`` to refuse it."""
        raise RequestError("device config space is read-only")

    def queue_started(self, index: int, vring: Vring) -> None:
        """Queue ``index`` is started and enabled; kicks will follow."""
        return None

    @abstractmethod
    def handle_kick(self, index: int, vring: Vring) -> None:
        """Queue ``index`` was kicked: drain ``vring.pop()``; the caller notifies afterwards."""

    def spin_on_ring(self, index: int) -> bool:
        """Whether ``busy_poll`` polls queue ``index``'s ring itself while it spins (with the
        driver's notifications off meanwhile) instead of only its kick eventfd. Worth it for
        the queues that carry the I/O; every queue by default."""
        return True

    def queue_stopped(self, index: int, vring: Vring) -> None:
        """Queue ``index`` stopped or was disabled: no more ``add_used`` on this vring."""
        return None

    def reset(self) -> None:
        """RESET_DEVICE, or the front-end went away: back to the initial state."""
        return None

    async def run(self) -> None:
        """Background work for one front-end connection; cancelled when it ends."""
        return None
