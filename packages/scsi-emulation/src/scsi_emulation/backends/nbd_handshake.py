"""The client side of NBD's fixed-newstyle negotiation, sans-IO (proto.md "Handshake").

Holds `ClientHandshake`: feed it the server's bytes (`receive_data`), send what it produces
(`data_to_send`), until `done`; then `export` says what was negotiated. It asks for structured
replies, the ``base:allocation`` metadata context, and the export with OPT_GO (falling back to
OPT_EXPORT_NAME on servers without OPT_GO). Knows nothing about sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence

from scsi_emulation.backends import nbd_protocol as p
from scsi_emulation.backends.nbd_protocol import ExportInfo, NbdHandshakeError

__all__ = ["ClientHandshake"]

logger = logging.getLogger(__name__)

#: The largest option reply accepted (a server sending more is broken or hostile).
MAX_OPTION_REPLY = 1 << 20

_Steps = Generator[int, bytes, None]


class ClientHandshake:
    """Negotiate ``export`` with a fixed-newstyle server.

    ``structured_replies`` asks for NBD_OPT_STRUCTURED_REPLY; ``meta_contexts`` (needs
    structured replies) are requested with NBD_OPT_SET_META_CONTEXT. Errors from the server,
    or bytes that break the protocol, raise `NbdHandshakeError` from `receive_data`.
    """

    def __init__(
        self,
        export: str,
        *,
        structured_replies: bool = True,
        meta_contexts: Sequence[str] = (p.BASE_ALLOCATION,),
    ) -> None:
        self._name = export.encode("utf-8")
        if len(self._name) > 4096:
            raise NbdHandshakeError("export name longer than 4096 bytes")
        self._want_structured = structured_replies
        self._contexts = tuple(meta_contexts) if structured_replies else ()
        self._out = bytearray()
        self._in = bytearray()
        self._export: ExportInfo | None = None
        self._steps = self._negotiate()
        self._wanted = next(self._steps)

    @property
    def done(self) -> bool:
        """Negotiation finished: the transmission phase starts with the next byte."""
        return self._export is not None

    @property
    def export(self) -> ExportInfo:
        """The negotiated export (only once `done`)."""
        if self._export is None:
            raise RuntimeError("the handshake has not finished")
        return self._export

    def bytes_wanted(self) -> int:
        """How many more bytes the next step needs (0 when done): a socket reader can ask for
        exactly this many, so no byte of the transmission phase is read early."""
        return 0 if self.done else self._wanted - len(self._in)

    def data_to_send(self) -> bytes:
        """Bytes to write to the server now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the server."""
        if self.done:
            if data:
                raise NbdHandshakeError("server sent data after the negotiation")
            return
        self._in += data
        while not self.done and len(self._in) >= self._wanted:
            chunk = bytes(self._in[: self._wanted])
            del self._in[: self._wanted]
            try:
                self._wanted = self._steps.send(chunk)
            except StopIteration:
                break
        if self.done and self._in:
            raise NbdHandshakeError("server sent data after the negotiation")

    # -- the steps ---------------------------------------------------------------------------

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out += p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data

    def _reply(self, option: int) -> Generator[int, bytes, tuple[int, bytes]]:
        """Read one option reply to ``option``: (reply type, data)."""
        head = yield p.OPTION_REPLY_HEADER.size
        magic, echoed, kind, length = p.OPTION_REPLY_HEADER.unpack(head)
        if magic != p.OPTION_REPLY_MAGIC:
            raise NbdHandshakeError(f"bad option reply magic {magic:#x}")
        if echoed != option:
            raise NbdHandshakeError(f"reply to option {echoed}, expected {option}")
        if length > MAX_OPTION_REPLY:
            raise NbdHandshakeError(f"option reply of {length} bytes is too long")
        data = (yield length) if length else b""
        return kind, data

    @staticmethod
    def _error_text(kind: int, data: bytes) -> str:
        name = p.REP_ERR_NAMES.get(kind, f"error {kind & ~p.REP_FLAG_ERROR}")
        text = data.decode("utf-8", "replace").strip()
        return f"{name}: {text}" if text else name

    def _negotiate(self) -> _Steps:
        greeting = yield p.SERVER_GREETING.size
        magic, second, hflags = p.SERVER_GREETING.unpack(greeting)
        if magic != p.NBDMAGIC:
            raise NbdHandshakeError("not an NBD server (bad greeting magic)")
        if second == p.OLDSTYLE_MAGIC:
            raise NbdHandshakeError("server speaks the oldstyle protocol, which is unsupported")
        if second != p.IHAVEOPT:
            raise NbdHandshakeError(f"bad newstyle magic {second:#x}")
        if not hflags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdHandshakeError("server does not support fixed newstyle negotiation")
        no_zeroes = bool(hflags & p.FLAG_NO_ZEROES)
        cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
        self._out += p.CLIENT_FLAGS.pack(cflags)

        structured = False
        if self._want_structured:
            self._send_option(p.OPT_STRUCTURED_REPLY)
            kind, data = yield from self._reply(p.OPT_STRUCTURED_REPLY)
            structured = kind == p.REP_ACK
            if not structured and not kind & p.REP_FLAG_ERROR:
                raise NbdHandshakeError(f"unexpected reply {kind} to OPT_STRUCTURED_REPLY")

        allocation: int | None = None
        if structured and self._contexts:
            allocation = yield from self._set_meta_contexts()

        self._send_option(p.OPT_GO, self._go_request())
        size = flags = -1
        minimum, preferred, maximum = 1, 4096, p.DEFAULT_MAX_PAYLOAD
        while True:
            kind, data = yield from self._reply(p.OPT_GO)
            if kind == p.REP_ACK:
                break
            if kind == p.REP_INFO:
                if len(data) < 2:
                    raise NbdHandshakeError("short NBD_REP_INFO")
                info = p.U16.unpack_from(data)[0]
                if info == p.INFO_EXPORT and len(data) >= p.INFO_EXPORT_BODY.size:
                    _, size, flags = p.INFO_EXPORT_BODY.unpack_from(data)
                elif info == p.INFO_BLOCK_SIZE and len(data) >= p.INFO_BLOCK_SIZE_BODY.size:
                    _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE_BODY.unpack_from(data)
                continue  # other information (name, description) is not needed
            if kind == p.REP_ERR_UNSUP:
                # A server from before OPT_GO: the old way, which has no error replies.
                size, flags = yield from self._export_name(no_zeroes)
                break
            if kind & p.REP_FLAG_ERROR:
                export = self._name.decode("utf-8", "replace")
                raise NbdHandshakeError(f"export {export!r}: {self._error_text(kind, data)}")
            logger.debug("ignoring option reply %d to OPT_GO", kind)
        if size < 0:
            raise NbdHandshakeError("server ended OPT_GO without describing the export")
        if not 1 <= minimum <= preferred or minimum & (minimum - 1) or maximum < minimum:
            raise NbdHandshakeError(
                f"inconsistent block sizes {minimum}/{preferred}/{maximum} from server"
            )
        self._export = ExportInfo(
            name=self._name.decode("utf-8", "replace"),
            size=size,
            flags=flags,
            minimum_block=minimum,
            preferred_block=preferred,
            maximum_block=min(maximum, p.DEFAULT_MAX_PAYLOAD) if maximum else p.DEFAULT_MAX_PAYLOAD,
            structured_replies=structured,
            allocation_context=allocation,
        )

    def _go_request(self) -> bytes:
        # export name, then the information requested (NBD_INFO_EXPORT is always sent).
        return (
            p.U32.pack(len(self._name)) + self._name + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)
        )

    def _set_meta_contexts(self) -> Generator[int, bytes, int | None]:
        body = bytearray(p.U32.pack(len(self._name)) + self._name)
        body += p.U32.pack(len(self._contexts))
        for name in self._contexts:
            raw = name.encode("utf-8")
            body += p.U32.pack(len(raw)) + raw
        self._send_option(p.OPT_SET_META_CONTEXT, bytes(body))
        allocation: int | None = None
        while True:
            kind, data = yield from self._reply(p.OPT_SET_META_CONTEXT)
            if kind == p.REP_ACK:
                return allocation
            if kind == p.REP_META_CONTEXT and len(data) >= 4:
                context_id = p.U32.unpack_from(data)[0]
                if data[4:].decode("utf-8", "replace") == p.BASE_ALLOCATION:
                    allocation = context_id
                continue
            if kind & p.REP_FLAG_ERROR:
                logger.info("server refused metadata contexts: %s", self._error_text(kind, data))
                return None
            raise NbdHandshakeError(f"unexpected reply {kind} to OPT_SET_META_CONTEXT")

    def _export_name(self, no_zeroes: bool) -> Generator[int, bytes, tuple[int, int]]:
        self._send_option(p.OPT_EXPORT_NAME, self._name)
        data = yield p.EXPORT_NAME_REPLY.size + (0 if no_zeroes else 124)
        size, flags = p.EXPORT_NAME_REPLY.unpack_from(data)
        return size, flags
