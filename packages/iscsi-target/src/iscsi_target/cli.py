"""The `iscsi-target` command line: parse and check options, open the storage, serve.

Holds the argument grammar (`iscsi-target [--listen HOST:PORT] [--iqn IQN] [LUN=]IMAGE...` with
per-LU options, an initiator ACL and CHAP credentials), the building of the emulated target
from storage locations (image files, block devices, ``nbd://`` exports and ``rbd:`` images:
whatever `scsi_emulation.backends.uri` parses, as for the vhost daemon) and the signal handling
of the process. Every operator mistake is one line on stderr and a non-zero exit. The protocol
lives in the sans-IO modules and `server`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

import trio
from scsi_core.lun import assign_luns
from scsi_emulation.backend import StorageBackend
from scsi_emulation.backends.uri import (
    FileLocation,
    LocationError,
    StorageLocation,
    open_backend,
    parse_location,
)
from scsi_emulation.block_device import BlockDevice
from scsi_emulation.identity import DeviceIdentity
from scsi_emulation.options import BlockDeviceOptions
from scsi_emulation.target import EmulatedTarget

from iscsi_target.chap import ChapCredentials
from iscsi_target.config import DEFAULT_IQN, TargetConfig
from iscsi_target.server import DEFAULT_PORT, IscsiServer

__all__ = ["CliError", "LunSpec", "ServerOptions", "build_target", "main", "parse_args"]

PROG = "iscsi-target"
LOG_LEVELS = ("debug", "info", "warning", "error")
logger = logging.getLogger(__name__)


class CliError(Exception):
    """An operator mistake; the message is the whole stderr line (without the prefix)."""


@dataclass(frozen=True, slots=True)
class LunSpec:
    """One LU: its storage location (path or URI, see `parse_location`) and how it presents
    itself."""

    lun: int
    path: str
    read_only: bool = False
    solid_state: bool = False
    block_size: int = 512
    write_cache: bool = True
    thin_provisioning: bool = False
    removable: bool = False


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything `main` needs, validated."""

    host: str
    port: int
    config: TargetConfig
    luns: tuple[LunSpec, ...]
    max_connections: int = 64
    log_level: str = "info"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text == "on"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for --help text and tests)."""
    p = _Parser(
        prog=PROG,
        description=(
            "An iSCSI target (RFC 7143) serving image files, block devices and remote storage "
            "as SCSI disks."
        ),
        epilog=(
            "Each IMAGE is [LUN=]LOCATION[,OPTION...]; LUNs count up from 0 unless given. "
            "A LOCATION is a raw image file or block device (PATH, file:PATH, "
            "file:PATH?direct=on for O_DIRECT), an NBD export (nbd://HOST[:PORT]/EXPORT, "
            "nbd+unix:///EXPORT?socket=PATH) or a Ceph RBD image "
            "(rbd:POOL/IMAGE[?conf=PATH&id=USER]). "
            "Per-LU options override the global ones: ro, rw, ssd, hdd, bs=512|4096, "
            "wce=on|off, thin=on|off, removable."
        ),
    )
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image file, block device or URI per LUN"
    )
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"address to listen on (default 127.0.0.1:{DEFAULT_PORT})",
    )
    p.add_argument("--iqn", default=DEFAULT_IQN, help=f"target name (default {DEFAULT_IQN})")
    p.add_argument("--read-only", action="store_true", help="refuse writes on every LU")
    p.add_argument("--solid-state", action="store_true", help="report non-rotational media")
    p.add_argument("--block-size", type=int, default=512, choices=(512, 4096), metavar="BYTES")
    p.add_argument("--write-cache", type=_on_off, default=True, metavar="on|off")
    p.add_argument(
        "--thin-provisioning",
        type=_on_off,
        default=False,
        metavar="on|off",
        help="report LBPME and accept UNMAP / WRITE SAME with UNMAP (default off)",
    )
    p.add_argument("--removable", action="store_true", help="removable medium (RMB)")
    p.add_argument(
        "--allow-initiator",
        action="append",
        metavar="IQN",
        help="admit only these initiator names (repeat; default: any)",
    )
    p.add_argument("--chap-user", help="CHAP name the initiators must present")
    p.add_argument("--chap-secret", help="CHAP secret (or --chap-secret-file)")
    p.add_argument("--chap-secret-file", metavar="PATH", help="file holding the CHAP secret")
    p.add_argument("--mutual-chap-user", help="CHAP name the target answers with (mutual CHAP)")
    p.add_argument("--mutual-chap-secret", help="secret for mutual CHAP")
    p.add_argument("--portal-address", metavar="HOST:PORT", help="TargetAddress for SendTargets")
    p.add_argument("--max-connections", type=_positive, default=64, metavar="N")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return p


def _listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise CliError(f"--listen {text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def _lun_spec(item: str, lun: int, base: LunSpec) -> LunSpec:
    path, *options = item.split(",")
    spec = replace(base, lun=lun, path=path)
    for option in options:
        name, _, value = option.partition("=")
        if name in ("ro", "rw"):
            spec = replace(spec, read_only=name == "ro")
        elif name in ("ssd", "hdd"):
            spec = replace(spec, solid_state=name == "ssd")
        elif name == "bs" and value in ("512", "4096"):
            spec = replace(spec, block_size=int(value))
        elif name == "wce" and value in ("on", "off"):
            spec = replace(spec, write_cache=value == "on")
        elif name == "thin" and value in ("on", "off"):
            spec = replace(spec, thin_provisioning=value == "on")
        elif name == "removable" and not value:
            spec = replace(spec, removable=True)
        else:
            raise CliError(f"unknown LU option {option!r} in {item!r}")
    if not spec.path:
        raise CliError(f"no image path in {item!r}")
    # A URI that does not parse is caught here, before any storage is opened.
    try:
        parse_location(spec.path)
    except LocationError as exc:
        raise CliError(f"bad storage location {exc}") from None
    return spec


def _lun_specs(items: Sequence[str], base: LunSpec) -> tuple[LunSpec, ...]:
    try:
        assigned = assign_luns(items)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return tuple(_lun_spec(rest, lun, base) for lun, rest in assigned)


def _chap(ns: argparse.Namespace) -> tuple[ChapCredentials | None, ChapCredentials | None]:
    secret: str | None = ns.chap_secret
    if ns.chap_secret_file:
        try:
            with open(ns.chap_secret_file, encoding="utf-8") as file:
                secret = file.read().strip()
        except OSError as exc:
            raise CliError(f"cannot read {ns.chap_secret_file}: {exc.strerror}") from None
    if bool(ns.chap_user) != bool(secret):
        raise CliError("--chap-user and --chap-secret go together")
    if bool(ns.mutual_chap_user) != bool(ns.mutual_chap_secret):
        raise CliError("--mutual-chap-user and --mutual-chap-secret go together")
    if ns.mutual_chap_user and not ns.chap_user:
        raise CliError("mutual CHAP needs --chap-user and --chap-secret too")
    chap = ChapCredentials(ns.chap_user, secret.encode()) if ns.chap_user and secret else None
    mutual = (
        ChapCredentials(ns.mutual_chap_user, ns.mutual_chap_secret.encode())
        if ns.mutual_chap_user
        else None
    )
    return chap, mutual


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    """Parse and validate; raises CliError (or SystemExit from argparse for syntax errors)."""
    ns = build_parser().parse_args(argv)
    host, port = _listen(ns.listen)
    base = LunSpec(
        lun=0,
        path="",
        read_only=ns.read_only,
        solid_state=ns.solid_state,
        block_size=ns.block_size,
        write_cache=ns.write_cache,
        thin_provisioning=ns.thin_provisioning,
        removable=ns.removable,
    )
    luns = _lun_specs(ns.images, base)
    if not ns.iqn.startswith(("iqn.", "eui.", "naa.")) or any(c.isspace() for c in ns.iqn):
        raise CliError(f"--iqn {ns.iqn!r} is not an iSCSI name (iqn., eui. or naa.)")
    chap, mutual = _chap(ns)
    portal = ns.portal_address or f"{host}:{port}"
    config = TargetConfig(
        iqn=ns.iqn,
        portal_address=portal,
        allowed_initiators=frozenset(ns.allow_initiator) if ns.allow_initiator else None,
        chap=chap,
        mutual_chap=mutual,
        block_sizes={spec.lun: spec.block_size for spec in luns},
    )
    return ServerOptions(host, port, config, luns, ns.max_connections, ns.log_level)


def build_target(luns: Sequence[LunSpec]) -> EmulatedTarget:
    """Open every image as a `BlockDevice` LU of one `EmulatedTarget` (CliError on failure)."""
    target = EmulatedTarget()
    try:
        for spec in luns:
            target.attach(spec.lun, _open_lu(spec), announce=False)
    except BaseException:
        target.close()
        raise
    return target


def _serial(location: StorageLocation) -> str:
    """A stable unit serial (hence NAA designator) from the image's real path, or the URI of
    remote storage, so two LUs of the same storage look alike and different ones never do."""
    key = os.path.realpath(location.path) if isinstance(location, FileLocation) else str(location)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _open_storage(spec: LunSpec) -> tuple[StorageLocation, StorageBackend]:
    try:
        location = parse_location(spec.path)
        backend = open_backend(location, read_only=spec.read_only, write_cache=spec.write_cache)
        return location, backend
    except LocationError as exc:
        raise CliError(f"bad storage location {exc}") from None
    except OSError as exc:
        # BackendError messages already name the location ("cannot open image X: ...").
        raise CliError(exc.strerror or f"cannot open {spec.path}: {exc}") from None


def _open_lu(spec: LunSpec) -> BlockDevice:
    location, backend = _open_storage(spec)
    try:
        if spec.block_size % backend.logical_block_size:
            raise CliError(
                f"{spec.path} has {backend.logical_block_size}-byte logical blocks: "
                f"use bs={max(backend.logical_block_size, 512)}"
            )
        if backend.size < spec.block_size:
            raise CliError(f"image {spec.path} is smaller than one {spec.block_size}-byte block")
        if spec.thin_provisioning and not backend.supports_discard:
            raise CliError(f"{spec.path} cannot deallocate blocks, so thin=on is not possible")
        if backend.size % spec.block_size:
            logger.warning(
                "image %s: the last %d bytes (not a whole block) are not accessible",
                spec.path,
                backend.size % spec.block_size,
            )
        try:
            options = BlockDeviceOptions(
                read_only=spec.read_only,
                solid_state=spec.solid_state,
                block_size=spec.block_size,
                write_cache=spec.write_cache,
                thin_provisioning=spec.thin_provisioning,
                removable=spec.removable,
                identity=DeviceIdentity(serial=_serial(location)),
            )
        except ValueError as exc:
            raise CliError(f"{spec.path}: {exc}") from None
        return BlockDevice(backend, options)
    except BaseException:
        backend.close()
        raise


async def _run(options: ServerOptions, target: EmulatedTarget) -> None:
    try:
        listeners = await trio.open_tcp_listeners(options.port, host=options.host)
    except OSError as exc:
        reason = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise CliError(f"cannot listen on {options.host}:{options.port}: {reason}") from None
    server = IscsiServer(target, options.config, max_connections=options.max_connections)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(server.run, listeners)
            address = listeners[0].socket.getsockname()
            logger.info(
                "serving %s (%d LUs) on %s:%d", options.config.iqn, len(options.luns), *address[:2]
            )
            async for signum in signals:
                logger.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iscsi-target` console script."""
    try:
        options = parse_args(argv)
        logging.basicConfig(
            level=options.log_level.upper(), format=f"{PROG}: %(levelname)s %(name)s: %(message)s"
        )
        target = build_target(options.luns)
        try:
            trio.run(_run, options, target)
        finally:
            target.close()
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # option combinations BlockDeviceOptions refuses
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
