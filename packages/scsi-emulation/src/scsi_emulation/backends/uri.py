"""Where a logical unit's data lives, as an operator writes it, and opening it.

Holds `parse_location` (text -> `FileLocation` | `NbdLocation` | `RbdLocation`), the
dataclasses it returns, and `open_backend`, which opens the matching back-end. Accepted forms:

- ``IMG`` or ``file:IMG`` (``file:///abs/path`` too): a raw image file, or a block device when
  the path names one; ``file:IMG?direct=on`` opens it with ``O_DIRECT``;
- ``nbd://HOST[:PORT]/EXPORT`` (default port 10809, IPv6 hosts in brackets) and
  ``nbd+unix:///EXPORT?socket=PATH``, after the NBD URI specification (NetworkBlockDevice
  doc/uri.md); ``nbds`` (TLS) is refused;
- ``rbd:POOL/IMAGE[?conf=PATH&id=USER&timeout=SECONDS&cache=on|off]``; ``timeout`` bounds
  each monitor and OSD operation (default `RBD_DEFAULT_TIMEOUT`): past it a request fails
  instead of waiting for a cluster that stopped answering; ``cache`` turns librbd's own cache
  on or off (default: on when the logical unit has a write cache, as QEMU's ``cache=`` does).

A text without one of these scheme prefixes is a path, so ``disk:1.img`` stays a file name.
Syntax errors are `LocationError`; a back-end that cannot be opened (missing image,
unreachable server) raises `scsi_emulation.backend.BackendError` with a message for the
operator. Knows nothing about SCSI.
"""

from __future__ import annotations

import errno
import os
import urllib.parse
from dataclasses import dataclass

from scsi_emulation.backend import BackendError, FileBackend, StorageBackend

__all__ = [
    "NBD_DEFAULT_PORT",
    "RBD_DEFAULT_TIMEOUT",
    "RBD_MAX_TIMEOUT",
    "FileLocation",
    "LocationError",
    "NbdLocation",
    "RbdLocation",
    "StorageLocation",
    "open_backend",
    "parse_location",
]

NBD_DEFAULT_PORT = 10809
#: Seconds an RBD request waits for the cluster before it fails (``timeout=`` overrides it).
RBD_DEFAULT_TIMEOUT = 30
#: The largest ``timeout=`` accepted (a day): more is waiting for good in all but name.
RBD_MAX_TIMEOUT = 86400

_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")


class LocationError(ValueError):
    """A storage location that cannot be parsed; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class FileLocation:
    """A raw image file or a block device node."""

    path: str
    direct: bool = False

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class NbdLocation:
    """An NBD export over TCP (``host``, ``port``) or a unix socket (``socket_path``)."""

    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket_path: str | None = None

    def __str__(self) -> str:
        name = urllib.parse.quote(self.export, safe="")
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


@dataclass(frozen=True, slots=True)
class RbdLocation:
    """A Ceph RBD image: ``pool``/``image``, with an optional ceph.conf and client id, and the
    seconds a monitor or OSD operation may take before it fails (``timeout``)."""

    pool: str
    image: str
    conf: str | None = None
    user: str | None = None
    timeout: int = RBD_DEFAULT_TIMEOUT
    #: librbd's cache (``rbd_cache``) as the location asks; None: the opener decides.
    cache: bool | None = None

    def __str__(self) -> str:
        return f"rbd:{self.pool}/{self.image}"


StorageLocation = FileLocation | NbdLocation | RbdLocation


def _flag(name: str, value: str, text: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise LocationError(f"{text!r}: {name}={value!r} is not on/off")


def _query(query: str, allowed: tuple[str, ...], text: str) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise LocationError(f"{text!r}: malformed query {query!r}") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            expected = ", ".join(allowed) or "none"
            raise LocationError(f"{text!r}: unknown parameter {key!r} (expected: {expected})")
        if key in out:
            raise LocationError(f"{text!r}: parameter {key!r} given twice")
        out[key] = value
    return out


def _parse_file(text: str) -> FileLocation:
    rest = text[len("file:") :]
    if rest.startswith("//"):
        parsed = urllib.parse.urlsplit(text)
        if parsed.netloc not in ("", "localhost"):
            raise LocationError(f"{text!r}: file URIs on another host are not supported")
        path, query = urllib.parse.unquote(parsed.path), parsed.query
    else:
        path, _, query = rest.partition("?")
    params = _query(query, ("direct",), text)
    if not path:
        raise LocationError(f"{text!r}: no path")
    direct = _flag("direct", params["direct"], text) if "direct" in params else False
    return FileLocation(path, direct)


def _parse_nbd(text: str) -> NbdLocation:
    parsed = urllib.parse.urlsplit(text)
    scheme = parsed.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock", "nbd+vsock"):
        raise LocationError(f"{text!r}: {scheme} is not supported (TLS and vsock are not)")
    if scheme not in ("nbd", "nbd+unix"):
        raise LocationError(f"{text!r}: unknown scheme {scheme!r}")
    if parsed.fragment:
        raise LocationError(f"{text!r}: unexpected fragment")
    path = parsed.path
    if path and not path.startswith("/"):
        raise LocationError(f"{text!r}: the export name must follow a '/'")
    export = urllib.parse.unquote(path[1:])
    if scheme == "nbd+unix":
        params = _query(parsed.query, ("socket",), text)
        if parsed.netloc:
            raise LocationError(f"{text!r}: nbd+unix takes no host (write nbd+unix:///EXPORT)")
        sock = params.get("socket", "")
        if not sock:
            raise LocationError(f"{text!r}: nbd+unix needs ?socket=PATH")
        return NbdLocation(export, socket_path=sock)
    _query(parsed.query, (), text)
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as e:
        raise LocationError(f"{text!r}: {e}") from None
    if not host:
        raise LocationError(f"{text!r}: no server host")
    if parsed.username is not None:
        raise LocationError(f"{text!r}: user names are not supported")
    return NbdLocation(export, host=host, port=NBD_DEFAULT_PORT if port is None else port)


def _parse_rbd(text: str) -> RbdLocation:
    body, _, query = text[len("rbd:") :].partition("?")
    params = _query(query, ("conf", "id", "timeout", "cache"), text)
    pool, sep, image = body.partition("/")
    if not sep or not pool or not image or "/" in image:
        raise LocationError(f"{text!r}: expected rbd:POOL/IMAGE")
    for key in ("conf", "id"):
        if key in params and not params[key]:
            raise LocationError(f"{text!r}: empty {key}=")
    timeout = RBD_DEFAULT_TIMEOUT
    if "timeout" in params:
        value = params["timeout"]
        # ASCII digits only (int() would also take "+5", " 5", "5_0"), and few of them (int()
        # refuses thousands).
        digits = value.isascii() and value.isdigit() and len(value) <= 9
        if not (digits and 0 < int(value) <= RBD_MAX_TIMEOUT):
            raise LocationError(
                f"{text!r}: timeout={value!r} is not a whole number of seconds"
                f" from 1 to {RBD_MAX_TIMEOUT}"
            )
        timeout = int(value)
    cache = _flag("cache", params["cache"], text) if "cache" in params else None
    return RbdLocation(pool, image, params.get("conf"), params.get("id"), timeout, cache)


def parse_location(text: str) -> StorageLocation:
    """Parse what an operator wrote for one logical unit's storage (see the module doc)."""
    if not text:
        raise LocationError("empty storage location")
    lowered = text.lower()
    if lowered.startswith("file:"):
        return _parse_file(text)
    if lowered.startswith(("nbd:", "nbd+", "nbds:", "nbds+")):
        return _parse_nbd(text)
    if lowered.startswith("rbd:"):
        return _parse_rbd(text)
    return FileLocation(text)


def open_backend(
    location: str | StorageLocation, *, read_only: bool = False, write_cache: bool = True
) -> StorageBackend:
    """Open the back-end for ``location``.

    ``write_cache`` says whether the logical unit starts with a volatile write cache (WCE):
    a back-end with a cache of its own (librbd) uses it then, unless the location says.

    Raises `LocationError` for a text that does not parse and `BackendError` (an `OSError`)
    whose message names the location when the storage cannot be opened.
    """
    if isinstance(location, str):
        location = parse_location(location)
    if isinstance(location, FileLocation):
        return _open_file(location, read_only)
    if isinstance(location, NbdLocation):
        from scsi_emulation.backends.nbd import NbdBackend

        return NbdBackend.connect(location, read_only=read_only)
    from scsi_emulation.backends.rbd import RbdBackend

    return RbdBackend.open(location, read_only=read_only, cache=write_cache)


def _open_file(location: FileLocation, read_only: bool) -> StorageBackend:
    from scsi_emulation.backends.blockdev import BlockDeviceBackend, is_block_device

    path = location.path
    try:
        if is_block_device(path):
            return BlockDeviceBackend(path, read_only=read_only, direct=location.direct)
        if os.path.isdir(path):
            raise BackendError(errno.EISDIR, f"{path} is a directory")
        return FileBackend(path, read_only=read_only, direct=location.direct)
    except BackendError as e:
        raise BackendError(e.errno, f"cannot open image {path}: {e.strerror}") from None
    except OSError as e:
        raise BackendError(e.errno, f"cannot open image {path}: {e.strerror}") from None
