"""The typed errors of vhost_user.

Two kinds, because the spec allows two answers to a bad request ("Communication"): a
``RequestError`` is answered (an error ack when REPLY_ACK asked for one) and the connection goes
on; a ``ProtocolError`` means going on would be unsafe (lost framing, a request that needs a
reply we cannot give, incompatible features), so the connection is closed. Nothing here knows
about sockets.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "RequestError", "VhostUserError"]


class VhostUserError(Exception):
    """Base class of every error raised by vhost_user."""


class RequestError(VhostUserError):
    """One request was refused; the connection can carry on."""


class ProtocolError(VhostUserError):
    """The connection must be closed.

    ``reply`` holds an error reply to send first when the front-end asked for one (REPLY_ACK),
    so it learns why before the socket goes away.
    """

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply
