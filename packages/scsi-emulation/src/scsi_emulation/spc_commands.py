"""SPC commands of the emulated block device: identification, sense, mode, LUN and command
reporting, medium control and RESERVE/RELEASE(6).

Holds one function per command, ``(device, request) -> Response``, and the `SPC_COMMANDS`
table the `BlockDevice` dispatches from; that table also carries the commands of the feature
modules (persistent reservations, SANITIZE, EXTENDED COPY, READ DEFECT DATA, WRITE ATOMIC).
Each function may raise `CommandError`; the CDB's reserved bits were already checked against
the command's usage data. Knows nothing about
READ/WRITE or the back-end beyond ``flush``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from scsi_core.opcodes import MaintenanceIn, Opcode, has_service_action
from scsi_core.sense import Asc, SenseData, SenseKey
from scsi_core.target import Request, Response

from scsi_emulation.atomic_write import ATOMIC_WRITE_COMMANDS
from scsi_emulation.backend import BackendError
from scsi_emulation.command_table import SERVICE_ACTION_OPCODES, CommandInfo
from scsi_emulation.defect_data import DEFECT_DATA_COMMANDS
from scsi_emulation.errors import GOOD, CommandError, invalid_field_in_cdb
from scsi_emulation.extended_copy import COPY_COMMANDS
from scsi_emulation.logical_unit import report_luns
from scsi_emulation.persistent_reservation import (
    PERSISTENT_RESERVATION_COMMANDS,
    RESERVATION_CONFLICT,
)
from scsi_emulation.sanitize import SANITIZE_COMMANDS, SANITIZE_IN_PROGRESS
from scsi_emulation.transfer import receive_parameters, send_data
from scsi_emulation.vpd import PERIPHERAL_DISK, VpdContext, standard_inquiry, vpd_page

if TYPE_CHECKING:
    from scsi_emulation.block_device import BlockDevice

__all__ = ["SPC_COMMANDS"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ALL_COMMANDS_DESCRIPTOR = struct.Struct(">BxHxBH")  # opcode, SA, flags, CDB length
_ONE_COMMAND_HEADER = struct.Struct(">xBH")  # CTDP|SUPPORT, CDB SIZE
_TIMEOUTS = struct.Struct(">HxBII")  # length 0Ah, command specific, nominal, recommended


def test_unit_ready(dev: BlockDevice, request: Request) -> Response:
    """TEST UNIT READY (SPC-5 6.47): medium checks happen at admission."""
    return GOOD


def inquiry(dev: BlockDevice, request: Request) -> Response:
    """INQUIRY (SPC-5 6.7): standard data, or a VPD page when EVPD is set."""
    cdb = request.cdb
    allocation = _U16.unpack_from(cdb, 3)[0]
    if cdb[1] & 0x01:
        ctx = VpdContext(dev.lun, dev.options, _unmap_granularity(dev))
        data = vpd_page(cdb[2], ctx)
        if data is None:
            raise invalid_field_in_cdb(2)
    else:
        if cdb[2]:
            raise invalid_field_in_cdb(2)
        ident = dev.options.identity
        data = standard_inquiry(
            PERIPHERAL_DISK,
            ident.vendor,
            ident.product,
            ident.revision,
            removable=dev.options.removable,
            third_party_copy=True,
        )
    return send_data(request, data, allocation)


def _unmap_granularity(dev: BlockDevice) -> int:
    return max(dev.backend.allocation_granularity >> dev.shift, 1)


def request_sense(dev: BlockDevice, request: Request) -> Response:
    """REQUEST SENSE (SPC-5 6.39): a pending unit attention is reported and cleared."""
    cdb = request.cdb
    code = dev.ua.pop(request.nexus)
    if code is not None:
        dev.invalidate_fast_path()
        sense = SenseData.of(SenseKey.UNIT_ATTENTION, code)
    elif dev.sanitizing:
        sense = SenseData.of(SANITIZE_IN_PROGRESS.key, SANITIZE_IN_PROGRESS.code)
    elif not dev.medium_present:
        sense = SenseData.of(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
    else:
        sense = SenseData.of(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE_INFORMATION)
    return send_data(request, sense.to_bytes(bool(cdb[1] & 0x01)), cdb[4])


def report_luns_command(dev: BlockDevice, request: Request) -> Response:
    """REPORT LUNS (SPC-5 6.33); clears REPORTED LUNS DATA HAS CHANGED for the nexus."""
    response = report_luns(request, dev.lister)
    dev.ua.clear(request.nexus, Asc.REPORTED_LUNS_DATA_HAS_CHANGED)
    return response


def _mode_sense(dev: BlockDevice, request: Request, ten: bool) -> Response:
    cdb = request.cdb
    data = dev.mode.mode_sense(
        cdb,
        ten=ten,
        write_protect=dev.read_only,
        blocks=dev.nblocks,
        block_size=dev.block_size,
    )
    allocation = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
    return send_data(request, data, allocation)


def mode_sense_6(dev: BlockDevice, request: Request) -> Response:
    """MODE SENSE(6) (SPC-5 6.13)."""
    return _mode_sense(dev, request, ten=False)


def mode_sense_10(dev: BlockDevice, request: Request) -> Response:
    """MODE SENSE(10) (SPC-5 6.14)."""
    return _mode_sense(dev, request, ten=True)


def _mode_select(dev: BlockDevice, request: Request, ten: bool) -> Response:
    cdb = request.cdb
    if cdb[1] & 0x01:  # SP: no saved pages
        raise invalid_field_in_cdb(1, 0)
    length = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
    params = receive_parameters(request, length)
    if not params:
        return GOOD
    if dev.mode.select(params, ten=ten, block_size=dev.block_size):
        dev.set_write_cache(dev.mode.wce)
        # SWP (control page): the LU is write-protected while it is set (SPC-4 7.5.8).
        dev.read_only = dev.options.read_only or dev.backend.read_only or dev.mode.swp
        # SPC-5 7.5.1: other I_T nexuses learn that shared mode parameters changed.
        dev.ua.establish(Asc.MODE_PARAMETERS_CHANGED, exclude=request.nexus)
        dev.invalidate_fast_path()
    return GOOD


def mode_select_6(dev: BlockDevice, request: Request) -> Response:
    """MODE SELECT(6) (SPC-5 6.11)."""
    return _mode_select(dev, request, ten=False)


def mode_select_10(dev: BlockDevice, request: Request) -> Response:
    """MODE SELECT(10) (SPC-5 6.12)."""
    return _mode_select(dev, request, ten=True)


def _timeouts(info: CommandInfo) -> bytes:
    return _TIMEOUTS.pack(0x0A, 0, 0, info.timeout)


def report_supported_operation_codes(dev: BlockDevice, request: Request) -> Response:
    """REPORT SUPPORTED OPERATION CODES (SPC-5 6.35), all four reporting options."""
    cdb = request.cdb
    rctd = bool(cdb[2] & 0x80)
    option = cdb[2] & 0x07
    allocation = _U32.unpack_from(cdb, 6)[0]
    commands = dev.commands
    if option == 0:
        parts = []
        for c in commands:
            has_sa = c.service_action is not None
            flags = (0x02 if rctd else 0) | (0x01 if has_sa else 0)
            descriptor = _ALL_COMMANDS_DESCRIPTOR.pack(
                c.opcode, c.service_action or 0, flags, len(c.usage)
            )
            parts.append(descriptor)
            if rctd:
                parts.append(_timeouts(c))
        body = b"".join(parts)
        return send_data(request, _U32.pack(len(body)) + body, allocation)
    opcode = cdb[3]
    requested_sa = _U16.unpack_from(cdb, 4)[0]
    # 83h/84h take service actions since SPC-4 (EXTENDED COPY LID1/LID4 ...).
    takes_sa = has_service_action(opcode) or opcode in SERVICE_ACTION_OPCODES
    if option == 1:
        if takes_sa:
            raise invalid_field_in_cdb(3)
        sa: int | None = None
    elif option == 2:
        if not takes_sa:
            raise invalid_field_in_cdb(3)
        sa = requested_sa
    elif option == 3:
        sa = requested_sa if takes_sa else None
    else:
        raise invalid_field_in_cdb(2, 2)
    info = next((c for c in commands if c.opcode == opcode and c.service_action == sa), None)
    if info is None:
        data = _ONE_COMMAND_HEADER.pack(0x01, 0)  # SUPPORT 001b: not supported
    else:
        support = (0x80 if rctd else 0) | 0x03  # CTDP, SUPPORT 011b: supported (standard)
        data = _ONE_COMMAND_HEADER.pack(support, len(info.usage)) + info.usage
        if rctd:
            data += _timeouts(info)
    return send_data(request, data, allocation)


def report_supported_task_management_functions(dev: BlockDevice, request: Request) -> Response:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-5 6.36)."""
    cdb = request.cdb
    allocation = _U32.unpack_from(cdb, 6)[0]
    if allocation < 4:
        raise invalid_field_in_cdb(6)
    # ATS, ATSS, CTSS, LURS, QTS; QAES, QTSS, ITNRS.
    data = bytes((0x80 | 0x40 | 0x10 | 0x08 | 0x04, 0x04 | 0x02 | 0x01, 0, 0))
    if cdb[2] & 0x80:  # REPD: extended format, ADDITIONAL DATA LENGTH 0Ch
        data = data[:3] + b"\x0c" + bytes(12)
    return send_data(request, data, allocation)


def start_stop_unit(dev: BlockDevice, request: Request) -> Response:
    """START STOP UNIT (SBC-4 5.31): load/eject on removable LUs, flush on stop."""
    cdb = request.cdb
    if cdb[4] >> 4:  # POWER CONDITION set: START and LOEJ are ignored
        return GOOD
    start, loej, no_flush = cdb[4] & 0x01, cdb[4] & 0x02, cdb[4] & 0x04
    if not start and not no_flush:
        try:
            dev.backend.flush()
        except BackendError as e:
            raise CommandError(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from e
    if loej and dev.options.removable:
        if dev.prevent:
            # Neither eject nor load while PREVENT is in effect (libiscsi PreventAllow.Eject).
            raise CommandError(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
        if start:
            if not dev.medium_present:
                # The loading nexus knows the medium changed: only the others get 28/00.
                dev.medium_present = True
                dev.ua.establish(
                    Asc.NOT_READY_TO_READY_CHANGE_MEDIUM_MAY_HAVE_CHANGED, exclude=request.nexus
                )
                dev.invalidate_fast_path()
        else:
            dev.set_medium(False)
    return GOOD


def prevent_allow_medium_removal(dev: BlockDevice, request: Request) -> Response:
    """PREVENT ALLOW MEDIUM REMOVAL (SBC-4 5.12), per I_T nexus."""
    prevent = request.cdb[4] & 0x03
    if prevent == 0:
        dev.prevent.discard(request.nexus)
    elif prevent == 1:
        dev.prevent.add(request.nexus)
    else:
        raise invalid_field_in_cdb(4, 1)
    return GOOD


def reserve_6(dev: BlockDevice, request: Request) -> Response:
    """RESERVE(6) (SPC-2 7.21): the whole LU for this nexus (conflicts are found at admission).

    While any persistent reservation registration exists, RESERVE(6) and RELEASE(6) end in
    RESERVATION CONFLICT (SPC-4 5.12.3, CRH=1 in REPORT CAPABILITIES).
    """
    if dev.pr.registrations:
        return RESERVATION_CONFLICT
    dev.set_reservation(request.nexus)
    return GOOD


def release_6(dev: BlockDevice, request: Request) -> Response:
    """RELEASE(6) (SPC-2 7.17): only the holder releases; from others it is a no-op."""
    if dev.pr.registrations:
        return RESERVATION_CONFLICT
    if dev.reservation == request.nexus:
        dev.set_reservation(None)
    return GOOD


CommandFunction = Callable[["BlockDevice", Request], Response]

SPC_COMMANDS: dict[tuple[int, int | None], CommandFunction] = {
    (Opcode.TEST_UNIT_READY, None): test_unit_ready,
    (Opcode.INQUIRY, None): inquiry,
    (Opcode.REQUEST_SENSE, None): request_sense,
    (Opcode.REPORT_LUNS, None): report_luns_command,
    (Opcode.MODE_SENSE_6, None): mode_sense_6,
    (Opcode.MODE_SENSE_10, None): mode_sense_10,
    (Opcode.MODE_SELECT_6, None): mode_select_6,
    (Opcode.MODE_SELECT_10, None): mode_select_10,
    (
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
    ): report_supported_operation_codes,
    (
        Opcode.MAINTENANCE_IN,
        MaintenanceIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
    ): report_supported_task_management_functions,
    (Opcode.START_STOP_UNIT, None): start_stop_unit,
    (Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None): prevent_allow_medium_removal,
    (Opcode.RESERVE_6, None): reserve_6,
    (Opcode.RELEASE_6, None): release_6,
    **PERSISTENT_RESERVATION_COMMANDS,
    **SANITIZE_COMMANDS,
    **COPY_COMMANDS,
    **DEFECT_DATA_COMMANDS,
    **ATOMIC_WRITE_COMMANDS,
}
