"""The vhost-user back-end protocol: a sans-IO core, a trio server and a front-end for tests.

A device type implements ``VhostUserBackend`` and is served with ``serve``; the protocol itself
lives in ``BackendConnection`` (no I/O), the rings a device sees are ``Vring`` objects. Knows
nothing about any particular device type (SCSI, block, rng...).
"""

from .backend import VhostUserBackend
from .busy_poll import BusyPoll
from .connection import (
    BASE_PROTOCOL_FEATURES,
    BackendConnection,
    Event,
    QueueStarted,
    QueueStopped,
    SendMessage,
)
from .errors import ProtocolError, RequestError, VhostUserError
from .frontend import FrontendError, FrontendQueue, SharedMemory, VhostUserFrontend
from .messages import VHOST_USER_F_PROTOCOL_FEATURES, FrontendRequest, ProtocolFeature
from .server import run_queue, serve, serve_connection
from .vring import Vring

__all__ = [
    "BASE_PROTOCOL_FEATURES",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "BackendConnection",
    "BusyPoll",
    "Event",
    "FrontendError",
    "FrontendQueue",
    "FrontendRequest",
    "ProtocolError",
    "ProtocolFeature",
    "QueueStarted",
    "QueueStopped",
    "RequestError",
    "SendMessage",
    "SharedMemory",
    "VhostUserBackend",
    "VhostUserError",
    "VhostUserFrontend",
    "Vring",
    "run_queue",
    "serve",
    "serve_connection",
]
