"""Cutting a byte stream (plus SCM_RIGHTS file descriptors) into vhost-user messages.

Sans-IO: the caller feeds what it received and asks how many bytes to read next, so a socket
layer can read a header, then exactly its payload. File descriptors are attached to the message
whose header is completed by the chunk they arrived with (or an earlier one): reading header and
payload separately, as ``bytes_needed`` suggests, makes this exact, because the sender attaches
its fds to the message's first bytes.

Knows nothing about what a request means, nor about sockets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import ProtocolError
from .messages import HEADER, HEADER_SIZE, MAX_PAYLOAD_SIZE, Header

__all__ = ["Message", "MessageFramer", "close_fds"]


@dataclass(slots=True)
class Message:
    """One framed message: its header, its payload bytes and the fds that came with it.

    The fds are owned by whoever holds the message: use them or close them.
    """

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class MessageFramer:
    """Accumulates bytes and fds; yields complete ``Message`` objects."""

    def __init__(self, *, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        self._buffer = bytearray()
        self._pending_fds: list[int] = []
        self._header: Header | None = None
        self._header_fds: list[int] = []
        self._max_payload = max_payload

    def bytes_needed(self) -> int:
        """Bytes to read to complete the current header or payload (never 0)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        # A header with a zero-size payload never stays pending (feed completes it at once).
        return self._header.size - len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()) -> list[Message]:
        """Take received bytes and fds; return every message they complete.

        Raises ``ProtocolError`` when a header announces an impossible payload size; the
        buffered fds are closed then, since the stream cannot be resynchronised.
        """
        self._pending_fds.extend(fds)
        self._buffer += data
        messages: list[Message] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                header = Header(*HEADER.unpack_from(self._buffer))
                del self._buffer[:HEADER_SIZE]
                if header.size > self._max_payload:
                    self.close()
                    raise ProtocolError(
                        f"request {header.request} announces a {header.size}-byte payload "
                        f"(limit {self._max_payload})"
                    )
                self._header = header
                self._header_fds, self._pending_fds = self._pending_fds, []
            if len(self._buffer) < self._header.size:
                break
            size = self._header.size
            payload = bytes(self._buffer[:size])
            del self._buffer[:size]
            messages.append(Message(self._header, payload, self._header_fds))
            self._header = None
            self._header_fds = []
        return messages

    @property
    def idle(self) -> bool:
        """True between messages (nothing partial buffered)."""
        return self._header is None and not self._buffer

    def close(self) -> None:
        """Drop buffered data and close fds that no message took."""
        close_fds(self._pending_fds)
        close_fds(self._header_fds)
        self._pending_fds = []
        self._header_fds = []
        self._buffer.clear()
        self._header = None
