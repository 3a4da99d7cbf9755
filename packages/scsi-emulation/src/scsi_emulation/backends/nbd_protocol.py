"""The NBD wire protocol's numbers and layouts (NetworkBlockDevice doc/proto.md).

Holds the magic numbers, option / reply / command / flag constants, the precompiled
`struct.Struct` layouts of the handshake and transmission headers, `ExportInfo` (what OPT_GO
told us about the export) and the protocol's error types. Knows nothing about sockets,
threads or SCSI; the state machines that use these live in `nbd_handshake` and
`nbd_transmission`.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

__all__ = [
    "ExportInfo",
    "NbdError",
    "NbdHandshakeError",
    "NbdProtocolError",
]

# -- magic numbers ("Protocol phases") --------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) -----------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# -- transmission flags (16 bits, from OPT_GO's NBD_INFO_EXPORT) ------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- options ----------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# -- option reply types; errors have bit 31 set -----------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_NAMES = {
    REP_FLAG_ERROR | 1: "unsupported option",
    REP_FLAG_ERROR | 2: "refused by server policy",
    REP_FLAG_ERROR | 3: "invalid request",
    REP_FLAG_ERROR | 4: "unsupported on this platform",
    REP_FLAG_ERROR | 5: "TLS required",
    REP_FLAG_ERROR | 6: "no such export",
    REP_FLAG_ERROR | 7: "server shutting down",
    REP_FLAG_ERROR | 8: "block size negotiation required",
    REP_FLAG_ERROR | 9: "request too big",
}
REP_ERR_UNSUP = REP_FLAG_ERROR | 1

# -- NBD_INFO_* (inside NBD_REP_INFO) --------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands and command flags ---------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = ("READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS")

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured reply chunks ------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

# -- base:allocation extent flags -------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- layouts (all big-endian) -----------------------------------------------------------------
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
INFO_EXPORT_BODY = struct.Struct(">HQH")  # info type, size, transmission flags
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (OPT_EXPORT_NAME)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OFFSET_HOLE_BODY = struct.Struct(">QI")  # offset, hole size
ERROR_BODY = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags

#: The largest payload a server must accept when it does not say (proto.md "Block size
#: constraints": 32 MiB).
DEFAULT_MAX_PAYLOAD = 32 << 20

# NBD error values are the Linux errno values of the same names ("Error values").
_KNOWN_ERRORS = frozenset(
    (
        errno.EPERM,
        errno.EIO,
        errno.ENOMEM,
        errno.EINVAL,
        errno.ENOSPC,
        errno.EOVERFLOW,
        errno.ENOTSUP,
        errno.ESHUTDOWN,
    )
)


def errno_from_nbd(error: int) -> int:
    """The errno for an NBD error value (unknown values are EIO, as the spec advises)."""
    return error if error in _KNOWN_ERRORS else errno.EIO


class NbdError(Exception):
    """Base of the NBD client's errors."""


class NbdHandshakeError(NbdError):
    """The server refused or garbled the negotiation; the message is for the operator."""


class NbdProtocolError(NbdError):
    """The server broke the transmission protocol (the connection must be dropped)."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What negotiation told us about the export (NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE)."""

    name: str
    size: int
    flags: int
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_block: int = DEFAULT_MAX_PAYLOAD
    #: Structured replies were negotiated (reads may come in chunks, holes not sent as data).
    structured_replies: bool = False
    #: The id of the negotiated ``base:allocation`` context, or None.
    allocation_context: int | None = None

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    def has(self, flag: int) -> bool:
        """Whether the server set transmission flag ``flag``."""
        return bool(self.flags & flag)
