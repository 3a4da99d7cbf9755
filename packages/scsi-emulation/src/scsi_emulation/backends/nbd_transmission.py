"""The client side of NBD's transmission phase, sans-IO (proto.md "Transmission phase").

Holds `Command` (one request and what its replies said) and `TransmissionClient`, which turns
a command into its request header (assigning the cookie that matches replies to requests,
so any number may be in flight) and decodes the server's byte stream: simple replies and
structured reply chunks (OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE).
Read data lands straight in the command's buffers; while a data payload is being received,
`payload_buffers` names the rest of its destination so an I/O layer can ``recv_into`` there
with no intermediate copy. Knows nothing about sockets or threads.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd_protocol import NbdProtocolError

__all__ = ["Command", "TransmissionClient"]

#: The largest non-data chunk payload accepted (extent lists, error messages).
MAX_CHUNK = 1 << 20

_ZEROS = memoryview(bytes(1 << 16))

_SIMPLE_SIZE = p.SIMPLE_REPLY.size
_STRUCTURED_SIZE = p.STRUCTURED_REPLY.size
_U32_FROM = p.U32.unpack_from
_SIMPLE_FROM = p.SIMPLE_REPLY.unpack_from
_STRUCTURED_FROM = p.STRUCTURED_REPLY.unpack_from
_U64_FROM = p.U64.unpack_from
#: A whole-read reply chunk: header, then the 8-byte offset, then the data.
_DATA_START = _STRUCTURED_SIZE + 8

# Decoder states
_HEADER = 0  # collecting a reply header (simple: 16 bytes, structured chunk: 20)
_SMALL = 1  # collecting a small chunk payload (hole, extents, error, data offset)
_DATA = 2  # moving read data into the command's buffers


@dataclass(slots=True, eq=False)
class Command:
    """One NBD request. ``buffers``: a READ's destination or a WRITE's source, together
    ``length`` bytes. ``on_done(command)`` is for the I/O layer (this module never calls it).
    After completion ``error`` is 0 or an errno, ``message`` the server's text, and
    ``extents`` the (length, flags) list of a BLOCK_STATUS."""

    kind: int
    offset: int
    length: int
    flags: int = 0
    buffers: Sequence[memoryview] = ()
    on_done: Callable[[Command], None] | None = None
    cookie: int = 0
    error: int = 0
    message: str = ""
    extents: list[tuple[int, int]] = field(default_factory=list)
    #: Read bytes accounted for so far (data and holes).
    received: int = 0
    #: How often the command has been sent (it is resent after a reconnection).
    attempts: int = 0

    def reset(self) -> None:
        """Forget the outcome of a previous attempt (before resending it)."""
        self.error = 0
        self.message = ""
        self.extents.clear()
        self.received = 0


def _slices(buffers: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """``length`` bytes of ``buffers`` from byte ``start``, as slices."""
    out: list[memoryview] = []
    for view in buffers:
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(view[start : start + take] if start or take != n else view)
        length -= take
        start = 0
        if not length:
            break
    return out


class TransmissionClient:
    """Requests out, replies in, for one connection after negotiation.

    ``structured``: structured replies were negotiated. ``allocation_context``: the
    ``base:allocation`` context id (BLOCK_STATUS extents of other contexts are ignored).

    Thread use: `request` (sender side, serialized by the caller) may run concurrently with
    `receive_data` / `payload_received` (the one reader): they share only the ``pending`` dict,
    whose single insertions and removals are atomic.
    """

    def __init__(self, *, structured: bool, allocation_context: int | None = None) -> None:
        self.structured = structured
        self.allocation_context = allocation_context
        self.pending: dict[int, Command] = {}
        self._next_cookie = 1
        self._state = _HEADER
        self._head = bytearray(p.STRUCTURED_REPLY.size)
        self._have = 0
        self._need = 4  # the magic first: it says which header follows
        self._small = bytearray()
        self._cmd: Command | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._dest: list[memoryview] = []
        self._dest_left = 0

    # -- requests ----------------------------------------------------------------------------

    def request(self, command: Command) -> bytes:
        """Register ``command`` as in flight and return its 28-byte request header (a WRITE's
        data follows it on the wire: send ``command.buffers`` next)."""
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < 0xFFFFFFFFFFFFFFFF else 1
        command.cookie = cookie
        command.attempts += 1
        self.pending[cookie] = command
        return p.REQUEST.pack(
            p.REQUEST_MAGIC, command.flags, command.kind, cookie, command.offset, command.length
        )

    @staticmethod
    def disconnect_request() -> bytes:
        """NBD_CMD_DISC: the polite goodbye (no reply comes)."""
        return p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0)

    def take_pending(self) -> list[Command]:
        """Every command still in flight, in the order sent, reset for resending; the decoder
        forgets them (the connection is gone)."""
        commands = sorted(self.pending.values(), key=lambda c: c.cookie)
        self.pending.clear()
        self._state = _HEADER
        self._have = 0
        self._need = 4
        self._cmd = None
        for c in commands:
            c.reset()
        return commands

    # -- replies -----------------------------------------------------------------------------

    def payload_buffers(self) -> list[memoryview] | None:
        """While read data is due: the rest of its destination (receive into it directly,
        then call `payload_received`). None otherwise."""
        return self._dest if self._state == _DATA else None

    def payload_received(self, n: int) -> list[Command]:
        """``n`` bytes were received straight into `payload_buffers`; completed commands."""
        if self._state != _DATA or n > self._dest_left:
            raise NbdProtocolError("payload bookkeeping out of step")
        self._consume_dest(n)
        done: list[Command] = []
        if not self._dest_left:
            self._data_done(done)
        return done

    def receive_data(self, data: memoryview) -> list[Command]:
        """Decode every byte of ``data``; return the commands that completed (in order)."""
        done: list[Command] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                n = min(self._dest_left, end - pos)
                src = data[pos : pos + n]
                off = 0
                for view in self._dest:
                    k = min(len(view), n - off)
                    view[:k] = src[off : off + k]
                    off += k
                    if off == n:
                        break
                self._consume_dest(n)
                pos += n
                if not self._dest_left:
                    self._data_done(done)
            elif state == _HEADER:
                # Fast path: a whole header in ``data`` is decoded where it lies (at queue
                # depth 32 one receive holds many replies); a split one is collected first.
                if not self._have and end - pos >= _SIMPLE_SIZE:
                    magic = _U32_FROM(data, pos)[0]
                    if magic == p.STRUCTURED_REPLY_MAGIC:
                        if self.structured and end - pos >= _STRUCTURED_SIZE:
                            _, flags, kind, cookie, length = _STRUCTURED_FROM(data, pos)
                            if (
                                kind == p.REPLY_TYPE_OFFSET_DATA
                                and flags & p.REPLY_FLAG_DONE
                                and end - pos >= _STRUCTURED_SIZE + length
                                and self._whole_read(data, pos, cookie, length, done)
                            ):
                                pos += _STRUCTURED_SIZE + length
                                continue
                            pos += _STRUCTURED_SIZE
                            self._chunk_header(flags, kind, cookie, length, done)
                            continue
                    elif magic == p.SIMPLE_REPLY_MAGIC:
                        _, error, cookie = _SIMPLE_FROM(data, pos)
                        pos += _SIMPLE_SIZE
                        self._simple_reply(error, cookie, done)
                        continue
                n = min(self._need - self._have, end - pos)
                self._head[self._have : self._have + n] = data[pos : pos + n]
                self._have += n
                pos += n
                if self._have == self._need:
                    self._header_step(done)
            else:  # _SMALL
                need = self._need
                small = self._small
                if not small and end - pos >= need:  # all of it here: no copy
                    pos += need
                    self._small_done(data[pos - need : pos], done)
                    continue
                n = min(need - len(small), end - pos)
                small += data[pos : pos + n]
                pos += n
                if len(small) == need:
                    self._small_done(small, done)
        return done

    def _whole_read(
        self, data: memoryview, pos: int, cookie: int, length: int, done: list[Command]
    ) -> bool:
        """The common case at any queue depth: one OFFSET_DATA chunk with the DONE flag holds
        all of a READ's data and lies wholly in ``data``: copy it into the command's buffers
        and complete it (skipping the chunk state machine). False: not that case (nothing
        consumed; the general path decides, errors included)."""
        cmd = self.pending.get(cookie)
        if (
            cmd is None
            or cmd.kind != p.CMD_READ
            or cmd.received
            or length - 8 != cmd.length
            or _U64_FROM(data, pos + _STRUCTURED_SIZE)[0] != cmd.offset
        ):
            return False
        start = pos + _DATA_START
        buffers = cmd.buffers
        if len(buffers) == 1 and len(buffers[0]) == cmd.length:
            buffers[0][:] = data[start : start + cmd.length]
        else:
            for view in _slices(buffers, 0, cmd.length):
                n = len(view)
                view[:] = data[start : start + n]
                start += n
        cmd.received = cmd.length
        del self.pending[cookie]
        done.append(cmd)
        return True

    def _consume_dest(self, n: int) -> None:
        self._dest_left -= n
        dest = self._dest
        while n:
            first = dest[0]
            if n >= len(first):
                n -= len(first)
                dest.pop(0)
            else:
                dest[0] = first[n:]
                n = 0

    def _header_step(self, done: list[Command]) -> None:
        if self._need == 4:
            magic = p.U32.unpack_from(self._head)[0]
            if magic == p.SIMPLE_REPLY_MAGIC:
                self._need = p.SIMPLE_REPLY.size
            elif magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
                self._need = p.STRUCTURED_REPLY.size
            else:
                raise NbdProtocolError(f"bad reply magic {magic:#x}")
            return
        self._have = 0
        self._need = 4
        head = self._head
        if p.U32.unpack_from(head)[0] == p.SIMPLE_REPLY_MAGIC:
            _, error, cookie = p.SIMPLE_REPLY.unpack_from(head)
            self._simple_reply(error, cookie, done)
        else:
            _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack_from(head)
            self._chunk_header(flags, kind, cookie, length, done)

    def _lookup(self, cookie: int) -> Command:
        cmd = self.pending.get(cookie)
        if cmd is None:
            raise NbdProtocolError(f"reply for unknown cookie {cookie}")
        return cmd

    def _finish(self, cmd: Command, done: list[Command]) -> None:
        del self.pending[cmd.cookie]
        done.append(cmd)

    def _simple_reply(self, error: int, cookie: int, done: list[Command]) -> None:
        cmd = self._lookup(cookie)
        if error:
            cmd.error = p.errno_from_nbd(error)
            self._finish(cmd, done)
        elif cmd.kind == p.CMD_READ and cmd.length:
            if self.structured:
                raise NbdProtocolError("simple reply with data to a structured READ")
            self._cmd = cmd
            self._start_data(cmd, 0, cmd.length)
        else:
            self._finish(cmd, done)

    def _chunk_header(
        self, flags: int, kind: int, cookie: int, length: int, done: list[Command]
    ) -> None:
        cmd = self._lookup(cookie)
        self._cmd = cmd
        self._chunk_flags = flags
        self._chunk_type = kind
        self._chunk_length = length
        if kind == p.REPLY_TYPE_NONE:
            if length:
                raise NbdProtocolError("NBD_REPLY_TYPE_NONE with a payload")
            self._chunk_end(done)
            return
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            if cmd.kind != p.CMD_READ or length <= 8:
                raise NbdProtocolError("OFFSET_DATA chunk that is not read data")
            self._collect(8)
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            if cmd.kind != p.CMD_READ or length != p.OFFSET_HOLE_BODY.size:
                raise NbdProtocolError("malformed OFFSET_HOLE chunk")
            self._collect(length)
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            if cmd.kind != p.CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8:
                raise NbdProtocolError("malformed BLOCK_STATUS chunk")
            self._collect(length)
        elif kind & p.REPLY_TYPE_ERROR_BIT:
            if length < p.ERROR_BODY.size:
                raise NbdProtocolError("error chunk too short")
            self._collect(length)
        else:
            raise NbdProtocolError(f"unknown reply chunk type {kind}")
        if self._need > MAX_CHUNK:
            raise NbdProtocolError(f"reply chunk of {length} bytes is too long")

    def _collect(self, n: int) -> None:
        self._small.clear()
        self._need = n
        self._state = _SMALL

    def _start_data(self, cmd: Command, start: int, length: int) -> None:
        if start < 0 or start + length > cmd.length:
            raise NbdProtocolError("read data outside the requested range")
        self._dest = _slices(cmd.buffers, start, length)
        self._dest_left = length
        cmd.received += length
        self._state = _DATA

    def _small_done(self, data: bytearray | memoryview, done: list[Command]) -> None:
        """A small chunk payload is complete in ``data`` (which is not kept)."""
        cmd = self._cmd
        assert cmd is not None
        kind = self._chunk_type
        self._state = _HEADER
        self._need = 4
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            offset = p.U64.unpack_from(data)[0]
            self._start_data(cmd, offset - cmd.offset, self._chunk_length - 8)
            return
        if kind == p.REPLY_TYPE_OFFSET_HOLE:
            offset, size = p.OFFSET_HOLE_BODY.unpack_from(data)
            start = offset - cmd.offset
            if start < 0 or size == 0 or start + size > cmd.length:
                raise NbdProtocolError("hole outside the requested range")
            for view in _slices(cmd.buffers, start, size):
                for i in range(0, len(view), len(_ZEROS)):
                    k = min(len(_ZEROS), len(view) - i)
                    view[i : i + k] = _ZEROS[:k]
            cmd.received += size
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            context = p.U32.unpack_from(data)[0]
            if context == self.allocation_context:
                cmd.extents.extend(p.EXTENT.iter_unpack(memoryview(data)[4:]))
        else:
            error, mlen = p.ERROR_BODY.unpack_from(data)
            if p.ERROR_BODY.size + mlen > len(data):
                raise NbdProtocolError("error chunk message overruns the chunk")
            if not cmd.error:  # the first error is the one reported
                cmd.error = p.errno_from_nbd(error) if error else errno.EIO
                cmd.message = bytes(data[6 : 6 + mlen]).decode("utf-8", "replace")
        self._chunk_end(done)

    def _data_done(self, done: list[Command]) -> None:
        self._state = _HEADER
        self._need = 4
        self._dest = []
        cmd = self._cmd
        assert cmd is not None
        if self.structured:
            self._chunk_end(done)
        else:
            self._finish(cmd, done)

    def _chunk_end(self, done: list[Command]) -> None:
        cmd = self._cmd
        assert cmd is not None
        self._cmd = None
        if not self._chunk_flags & p.REPLY_FLAG_DONE:
            return
        if cmd.kind == p.CMD_READ and not cmd.error and cmd.received < cmd.length:
            cmd.error = errno.EIO
            cmd.message = f"server sent {cmd.received} of {cmd.length} bytes"
        if cmd.kind == p.CMD_BLOCK_STATUS and not cmd.error and not cmd.extents:
            cmd.error = errno.EIO
            cmd.message = "server sent no base:allocation extents"
        self._finish(cmd, done)
