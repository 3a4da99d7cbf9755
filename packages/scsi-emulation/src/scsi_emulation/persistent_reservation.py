"""Persistent reservations (SPC-4 5.12) and the PERSISTENT RESERVE IN/OUT commands (6.15, 6.16).

Holds `PersistentReservations` (the registrations per I_T nexus, the reservation, the PRgeneration
counter and the access rules that decide RESERVATION CONFLICT), the TransportID of a nexus
(SPC-4 7.6.4), and the command functions ``(device, request) -> Response`` in
`PERSISTENT_RESERVATION_COMMANDS`. Knows nothing about transports: a nexus is an opaque
hashable value, except that a string of the form ``NAME,i,0xISID`` is reported as an iSCSI
initiator port TransportID. Not supported (REPORT CAPABILITIES says so): persist through power
loss (APTPL), SPEC_I_PT, ALL_TG_PT, REGISTER AND MOVE, REPLACE LOST RESERVATION.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scsi_core.opcodes import Opcode, PersistentReserveIn, PersistentReserveOut, ServiceActionIn16
from scsi_core.sense import Asc, SenseKey
from scsi_core.status import Status
from scsi_core.target import Request, Response

from scsi_emulation.errors import (
    CommandError,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)
from scsi_emulation.transfer import data_out_residual, receive_parameters, send_data

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = [
    "PERSISTENT_RESERVATION_COMMANDS",
    "RESERVATION_CONFLICT",
    "PersistentReservations",
    "Reservation",
    "ReservationType",
    "transport_id",
]

logger = logging.getLogger(__name__)

#: The RESERVATION CONFLICT response (no sense data: SAM-5 5.3.1).
RESERVATION_CONFLICT = Response(Status.RESERVATION_CONFLICT)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">II")  # PRGENERATION, ADDITIONAL LENGTH
# PERSISTENT RESERVE OUT basic parameter list (SPC-4 6.16.3): RESERVATION KEY, SERVICE ACTION
# RESERVATION KEY, obsolete, flags (SPEC_I_PT, ALL_TG_PT, APTPL), reserved, obsolete.
_PROUT_PARAMETERS = struct.Struct(">QQ4xBx2x")
_PROUT_PARAMETER_LENGTH = 24
# READ RESERVATION descriptor (6.15.3): RESERVATION KEY, obsolete, reserved, SCOPE|TYPE, obsolete.
_RESERVATION_DESCRIPTOR = struct.Struct(">Q4xxB2x")
# REPORT CAPABILITIES (6.15.4): LENGTH, flags, TMV|ALLOW COMMANDS|PTPL_A, TYPE MASK, reserved.
_CAPABILITIES = struct.Struct(">HBBH2x")
# READ FULL STATUS descriptor (6.15.5) up to the TransportID: RESERVATION KEY, reserved,
# ALL_TG_PT|R_HOLDER, SCOPE|TYPE, reserved, RELATIVE TARGET PORT IDENTIFIER, ADDITIONAL LENGTH.
_FULL_STATUS_DESCRIPTOR = struct.Struct(">Q4xBB4xHI")

_SCOPE_LU = 0x0
_FLAG_SPEC_I_PT = 0x08
_FLAG_ALL_TG_PT = 0x04
_FLAG_APTPL = 0x01
_RELATIVE_TARGET_PORT = 1  # this emulation has a single target port


class ReservationType(enum.IntEnum):
    """PERSISTENT RESERVATION TYPE codes (SPC-4 6.16.2, table 171)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        """Every registrant is a reservation holder (SPC-4 5.12.10)."""
        return self in _ALL_REGISTRANTS

    @property
    def registrants_have_access(self) -> bool:
        """Registrants only / all registrants: every registered nexus has full access."""
        return self not in (ReservationType.WRITE_EXCLUSIVE, ReservationType.EXCLUSIVE_ACCESS)

    @property
    def exclusive_access(self) -> bool:
        """Reads conflict too for nexuses without access (the Exclusive Access types)."""
        return self in _EXCLUSIVE_ACCESS


_ALL_REGISTRANTS = frozenset(
    (
        ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
        ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
    )
)
_EXCLUSIVE_ACCESS = frozenset(
    (
        ReservationType.EXCLUSIVE_ACCESS,
        ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
    )
)
# PERSISTENT RESERVATION TYPE MASK bits (6.15.4, table 167), bytes 4..5 as a 16-bit value.
_TYPE_MASK = {
    ReservationType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x8000,
    ReservationType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x4000,
    ReservationType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 0x2000,
    ReservationType.EXCLUSIVE_ACCESS: 0x0800,
    ReservationType.WRITE_EXCLUSIVE: 0x0200,
    ReservationType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x0001,
}


class _Access(enum.IntEnum):
    ALLOWED = 0  # never conflicts with a persistent reservation
    READ = 1  # conflicts only with the Exclusive Access types
    WRITE = 2  # conflicts with every type


def _access_table() -> list[_Access]:
    # SPC-4 5.12.3 table 58 and SBC-3 4.17 table 13, for a nexus without access. Anything not
    # listed (writes, MODE SELECT, SANITIZE, EXTENDED COPY, RESERVE/RELEASE(6) ...) conflicts.
    table = [_Access.WRITE] * 256
    for op in (
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.TEST_UNIT_READY,
        Opcode.PERSISTENT_RESERVE_IN,
        Opcode.PERSISTENT_RESERVE_OUT,  # its own rules apply (5.12.7 ff.)
        Opcode.MAINTENANCE_IN,
        Opcode.LOG_SENSE,
        Opcode.READ_CAPACITY_10,
    ):
        table[op] = _Access.ALLOWED
    for op in (
        Opcode.READ_6,
        Opcode.READ_10,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.VERIFY_10,
        Opcode.VERIFY_12,
        Opcode.VERIFY_16,
        Opcode.PRE_FETCH_10,
        Opcode.PRE_FETCH_16,
        Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10,
        Opcode.READ_DEFECT_DATA_10,
        Opcode.READ_DEFECT_DATA_12,
        Opcode.RECEIVE_COPY_RESULTS,
        Opcode.READ_BUFFER,
        Opcode.SERVICE_ACTION_IN_16,  # GET LBA STATUS; READ CAPACITY(16) is allowed below
    ):
        table[op] = _Access.READ
    return table


_ACCESS = _access_table()


@dataclass(slots=True)
class Reservation:
    """The persistent reservation: who made it and its type (scope is always LU)."""

    holder: Hashable
    type: ReservationType


class PersistentReservations:
    """Registrations, the reservation and PRgeneration of one logical unit (SPC-4 5.12).

    State survives I_T nexus loss and resets (SPC-4 5.12.1); only CLEAR and PREEMPT remove
    other nexuses' registrations. Not persisted across restarts (APTPL is not supported).
    """

    def __init__(self) -> None:
        self.registrations: dict[Hashable, int] = {}
        self.reservation: Reservation | None = None
        self.generation = 0

    # -- queries ---------------------------------------------------------------------------

    def is_holder(self, nexus: Hashable) -> bool:
        """Whether ``nexus`` holds the reservation (every registrant, for all-registrants)."""
        res = self.reservation
        if res is None:
            return False
        if res.type.all_registrants:
            return nexus in self.registrations
        return res.holder == nexus

    def has_access(self, nexus: Hashable) -> bool:
        """Whether ``nexus`` may run any command despite the reservation."""
        res = self.reservation
        if res is None or res.holder == nexus:
            return True
        return res.type.registrants_have_access and nexus in self.registrations

    def conflicts(self, nexus: Hashable, cdb: bytes | memoryview) -> bool:
        """Whether the command in ``cdb`` from ``nexus`` meets RESERVATION CONFLICT."""
        res = self.reservation
        if res is None or self.has_access(nexus):
            return False
        op = cdb[0]
        access = _ACCESS[op]
        if op == Opcode.SERVICE_ACTION_IN_16 and len(cdb) > 1:
            if cdb[1] & 0x1F == ServiceActionIn16.READ_CAPACITY_16:
                access = _Access.ALLOWED
        elif op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL and len(cdb) > 4 and not cdb[4] & 0x03:
            access = _Access.ALLOWED  # PREVENT=0 is allowed (SBC-3 table 13)
        if access == _Access.ALLOWED:
            return False
        if access == _Access.READ:
            return res.type.exclusive_access
        return True

    # -- changes ---------------------------------------------------------------------------

    def bump(self) -> None:
        """Count one successful registration change (PRgeneration, SPC-4 6.15.2)."""
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def unregister(self, nexus: Hashable) -> list[tuple[Hashable, Asc]]:
        """Remove ``nexus``'s registration; return the unit attentions it causes (5.12.11.2)."""
        self.registrations.pop(nexus, None)
        res = self.reservation
        if res is None:
            return []
        if res.type.all_registrants:
            # The reservation lasts while any registrant remains.
            if not self.registrations:
                self.reservation = None
            return []
        if res.holder != nexus:
            return []
        self.reservation = None
        if res.type.registrants_have_access:
            return [(n, Asc.RESERVATIONS_RELEASED) for n in self.registrations]
        return []


def transport_id(nexus: Hashable) -> bytes:
    """The TransportID (SPC-4 7.6.4) naming ``nexus``'s initiator port.

    ``NAME,i,0xISID`` strings (iSCSI initiator port names) use the iSCSI format 01b; other
    strings the iSCSI device name format 00b; anything else is named by its ``repr`` with
    protocol identifier Fh (no specific protocol), for which SPC defines no layout.
    """
    if isinstance(nexus, str):
        first = (0x40 if ",i,0x" in nexus else 0x00) | 0x05
        name = nexus.encode("utf-8", "replace")
    else:
        first = 0x0F
        name = repr(nexus).encode("ascii", "replace")
    length = max(20, (len(name) + 1 + 3) & ~3)  # null terminated, multiple of four, >= 20
    return bytes((first, 0)) + _U16.pack(length) + name.ljust(length, b"\0")


# -- PERSISTENT RESERVE IN -----------------------------------------------------------------


def _allocation(request: Request) -> int:
    return int(_U16.unpack_from(request.cdb, 7)[0])


def read_keys(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE IN, READ KEYS (SPC-4 6.15.2)."""
    pr = dev.pr
    keys = b"".join(k.to_bytes(8, "big") for k in pr.registrations.values())
    data = _HEADER.pack(pr.generation, len(keys)) + keys
    return send_data(request, data, _allocation(request))


def read_reservation(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE IN, READ RESERVATION (SPC-4 6.15.3)."""
    pr = dev.pr
    res = pr.reservation
    if res is None:
        data = _HEADER.pack(pr.generation, 0)
    else:
        # All-registrants reservations report key 0 (6.15.3).
        key = 0 if res.type.all_registrants else pr.registrations.get(res.holder, 0)
        descriptor = _RESERVATION_DESCRIPTOR.pack(key, (_SCOPE_LU << 4) | res.type)
        data = _HEADER.pack(pr.generation, len(descriptor)) + descriptor
    return send_data(request, data, _allocation(request))


def report_capabilities(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE IN, REPORT CAPABILITIES (SPC-4 6.15.4).

    CRH=1 (RESERVE/RELEASE(6) conflict while registrations exist, 5.12.3); no SIP_C,
    ATP_C, PTPL_C; TMV=1 with ALLOW COMMANDS 001b (TEST UNIT READY passes WE and EA).
    """
    mask = 0
    for t in ReservationType:
        mask |= _TYPE_MASK[t]
    data = _CAPABILITIES.pack(8, 0x10, 0x80 | (0x1 << 4), mask)
    return send_data(request, data, _allocation(request))


def read_full_status(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE IN, READ FULL STATUS (SPC-4 6.15.5)."""
    pr = dev.pr
    res = pr.reservation
    parts = []
    for nexus, key in pr.registrations.items():
        holder = pr.is_holder(nexus)
        scope_type = ((_SCOPE_LU << 4) | res.type) if holder and res is not None else 0
        tid = transport_id(nexus)
        parts.append(
            _FULL_STATUS_DESCRIPTOR.pack(
                key, int(holder), scope_type, _RELATIVE_TARGET_PORT, len(tid)
            )
            + tid
        )
    body = b"".join(parts)
    data = _HEADER.pack(pr.generation, len(body)) + body
    return send_data(request, data, _allocation(request))


# -- PERSISTENT RESERVE OUT ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ProutParameters:
    key: int
    service_action_key: int
    flags: int


def _scope_and_type(request: Request) -> ReservationType:
    """SCOPE must be LU_SCOPE and TYPE a supported type (SPC-4 6.16.2)."""
    byte = request.cdb[2]
    if byte >> 4 != _SCOPE_LU:
        raise invalid_field_in_cdb(2, 7)
    try:
        return ReservationType(byte & 0x0F)
    except ValueError:
        raise invalid_field_in_cdb(2, 3) from None


def _parameters(request: Request, registering: bool = False) -> _ProutParameters:
    length = int(_U32.unpack_from(request.cdb, 5)[0])
    if length != _PROUT_PARAMETER_LENGTH:
        # Without SPEC_I_PT the list is exactly 24 bytes (SPC-4 6.16.3).
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    key, sa_key, flags = _PROUT_PARAMETERS.unpack(receive_parameters(request, length))
    if registering:
        # SIP_C, ATP_C and PTPL_C are zero in REPORT CAPABILITIES.
        for bit, mask in ((3, _FLAG_SPEC_I_PT), (2, _FLAG_ALL_TG_PT), (0, _FLAG_APTPL)):
            if flags & mask:
                raise invalid_field_in_parameter_list(20, bit)
    return _ProutParameters(key, sa_key, flags)


def _done(dev: BlockDevice, request: Request, attentions: list[tuple[Hashable, Asc]]) -> Response:
    for nexus, code in attentions:
        if nexus != request.nexus:
            dev.establish_unit_attention(code, nexus)
    dev.invalidate_fast_path()
    return data_out_residual(request)


def _registered_key(dev: BlockDevice, request: Request, key: int) -> bool:
    """Whether the nexus is registered with RESERVATION KEY ``key`` (else: conflict)."""
    registered = dev.pr.registrations.get(request.nexus)
    return registered is not None and registered == key


def _register(dev: BlockDevice, request: Request, ignore_existing: bool) -> Response:
    """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 5.12.7)."""
    p = _parameters(request, registering=True)
    pr = dev.pr
    nexus = request.nexus
    current = pr.registrations.get(nexus)
    if current is None:
        if p.key and not ignore_existing:
            return RESERVATION_CONFLICT
        if p.service_action_key == 0:
            return data_out_residual(request)  # nothing to register
        pr.registrations[nexus] = p.service_action_key
        pr.bump()
        return _done(dev, request, [])
    if not ignore_existing and p.key != current:
        return RESERVATION_CONFLICT
    if p.service_action_key == 0:
        attentions = pr.unregister(nexus)
    else:
        pr.registrations[nexus] = p.service_action_key
        attentions = []
    pr.bump()
    return _done(dev, request, attentions)


def register(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, REGISTER."""
    return _register(dev, request, ignore_existing=False)


def register_and_ignore_existing_key(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY."""
    return _register(dev, request, ignore_existing=True)


def reserve(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, RESERVE (SPC-4 5.12.9): PRgeneration does not change."""
    kind = _scope_and_type(request)
    p = _parameters(request)
    if not _registered_key(dev, request, p.key):
        return RESERVATION_CONFLICT
    pr = dev.pr
    res = pr.reservation
    if res is not None:
        if res.type == kind and pr.is_holder(request.nexus):
            return data_out_residual(request)  # the same reservation again: no change
        return RESERVATION_CONFLICT
    pr.reservation = Reservation(request.nexus, kind)
    return _done(dev, request, [])


def release(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, RELEASE (SPC-4 5.12.11.2)."""
    kind = _scope_and_type(request)
    p = _parameters(request)
    if not _registered_key(dev, request, p.key):
        return RESERVATION_CONFLICT
    pr = dev.pr
    res = pr.reservation
    if res is None or not pr.is_holder(request.nexus):
        return data_out_residual(request)  # nothing this nexus holds: GOOD, no change
    if res.type != kind:
        raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    pr.reservation = None
    attentions: list[tuple[Hashable, Asc]] = []
    if res.type.registrants_have_access:
        # Registrants-only and all-registrants releases tell the other registrants.
        attentions = [(n, Asc.RESERVATIONS_RELEASED) for n in pr.registrations]
    return _done(dev, request, attentions)


def clear(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, CLEAR (SPC-4 5.12.11.6): every registration and the reservation."""
    p = _parameters(request)
    if not _registered_key(dev, request, p.key):
        return RESERVATION_CONFLICT
    pr = dev.pr
    others = [n for n in pr.registrations if n != request.nexus]
    pr.registrations.clear()
    pr.reservation = None
    pr.bump()
    return _done(dev, request, [(n, Asc.RESERVATIONS_PREEMPTED) for n in others])


def _preempt(dev: BlockDevice, request: Request) -> Response:
    """PREEMPT and PREEMPT AND ABORT (SPC-4 5.12.11.4, 5.12.11.5).

    Every command of this LU completes before the next is processed, so PREEMPT AND ABORT has
    no task of the preempted nexuses left to abort.
    """
    kind = _scope_and_type(request)
    p = _parameters(request)
    nexus = request.nexus
    if not _registered_key(dev, request, p.key):
        return RESERVATION_CONFLICT
    pr = dev.pr
    res = pr.reservation
    sa_key = p.service_action_key
    attentions: list[tuple[Hashable, Asc]] = []

    def remove(match: Callable[[Hashable, int], bool]) -> int:
        gone = [n for n, k in pr.registrations.items() if n != nexus and match(n, k)]
        for n in gone:
            del pr.registrations[n]
            attentions.append((n, Asc.REGISTRATIONS_PREEMPTED))
        return len(gone)

    if res is not None and res.type.all_registrants and sa_key == 0:
        # 5.12.11.4.4: preempt every other registrant and take a new reservation.
        remove(lambda n, k: True)
        pr.reservation = Reservation(nexus, kind)
    elif (
        res is not None
        and not res.type.all_registrants
        and (sa_key == pr.registrations.get(res.holder))
    ):
        # 5.12.11.4.3: preempt the holder (and every nexus registered with its key).
        remove(lambda n, k: k == sa_key)
        changed = res.type != kind
        pr.reservation = Reservation(nexus, kind)
        if changed:
            attentions.extend(
                (n, Asc.RESERVATIONS_RELEASED) for n in pr.registrations if n != nexus
            )
    else:
        # 5.12.11.4.2 / 4.4: remove registrations only; the reservation stays.
        if sa_key == 0:
            raise invalid_field_in_parameter_list(8)
        if (
            remove(lambda n, k: k == sa_key) == 0
            and pr.registrations.get(nexus) != sa_key  # its own key: nothing to remove
        ):
            return RESERVATION_CONFLICT
    pr.bump()
    return _done(dev, request, attentions)


def preempt(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, PREEMPT."""
    return _preempt(dev, request)


def preempt_and_abort(dev: BlockDevice, request: Request) -> Response:
    """PERSISTENT RESERVE OUT, PREEMPT AND ABORT."""
    return _preempt(dev, request)


CommandFunction = Callable[["BlockDevice", Request], Response]

PERSISTENT_RESERVATION_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.PERSISTENT_RESERVE_IN, PersistentReserveIn.READ_KEYS): read_keys,
    (Opcode.PERSISTENT_RESERVE_IN, PersistentReserveIn.READ_RESERVATION): read_reservation,
    (Opcode.PERSISTENT_RESERVE_IN, PersistentReserveIn.REPORT_CAPABILITIES): report_capabilities,
    (Opcode.PERSISTENT_RESERVE_IN, PersistentReserveIn.READ_FULL_STATUS): read_full_status,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.REGISTER): register,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.RESERVE): reserve,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.RELEASE): release,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.CLEAR): clear,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.PREEMPT): preempt,
    (Opcode.PERSISTENT_RESERVE_OUT, PersistentReserveOut.PREEMPT_AND_ABORT): preempt_and_abort,
    (
        Opcode.PERSISTENT_RESERVE_OUT,
        PersistentReserveOut.REGISTER_AND_IGNORE_EXISTING_KEY,
    ): register_and_ignore_existing_key,
}
