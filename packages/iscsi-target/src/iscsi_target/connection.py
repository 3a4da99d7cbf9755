"""One iSCSI connection (and, with MaxConnections=1, its session), sans-IO.

Bytes in (`receive_data`), bytes out (`data_to_send`): the login phase, then the full feature
phase of RFC 7143: the CmdSN window and StatSN, SCSI commands with immediate, unsolicited and
solicited (R2T) data, Data-In sequences with residuals, task management, NOP, Text
(SendTargets), Logout and Reject. SCSI semantics are the `scsi_core.target.Target`'s. This
module does no I/O and knows no event loop: a pending command's completion arrives through the
`marshal` callable the owner supplies.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from scsi_core.lun import REPORT_LUNS_WLUN, decode_lun
from scsi_core.sense import Asc, SenseKey, build_sense
from scsi_core.status import Status
from scsi_core.target import (
    BytesReader,
    Request,
    Response,
    TaskAttribute,
    TaskManagementFunction,
    TmfResponse,
)

from iscsi_target.buffers import DataInBuffer
from iscsi_target.constants import (
    RESERVED_TAG,
    LoginStatus,
    LogoutReason,
    LogoutResponseCode,
    RejectReason,
    TmfFunction,
    TmfResponseCode,
)
from iscsi_target.framing import FramingError, PduReader, RawPdu, frame_pdu
from iscsi_target.login import LoginMachine
from iscsi_target.negotiation import NegotiationError, Negotiator, OperationalParameters
from iscsi_target.pdu import (
    R2T,
    Data,
    DataIn,
    DataOut,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    PduError,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    decode_pdu,
)
from iscsi_target.registry import SessionRegistry, nexus_name
from iscsi_target.seqnum import sn_add, sn_in_window
from iscsi_target.task import PendingR2T, ScsiTask
from iscsi_target.text import TextError, decode_text, encode_text
from iscsi_target.transfer import Direction, expected_transfer, with_transfer_length

__all__ = ["Connection", "ConnectionState"]

logger = logging.getLogger(__name__)

Marshal = Callable[[Callable[[], None]], None]

LOGIN_MAX_DATA_SEGMENT = 8192  # the default MaxRecvDataSegmentLength before negotiation
MAX_TRANSFER_LENGTH = 64 << 20  # the largest EDTL (and read buffer) one command may use
MAX_TEXT = 65536

_TASK_ATTRIBUTES = {
    0: TaskAttribute.SIMPLE,  # untagged
    1: TaskAttribute.SIMPLE,
    2: TaskAttribute.ORDERED,
    3: TaskAttribute.HEAD_OF_QUEUE,
    4: TaskAttribute.ACA,
}
_TMF_FUNCTIONS: dict[int, TaskManagementFunction] = {
    TmfFunction.ABORT_TASK: TaskManagementFunction.ABORT_TASK,
    TmfFunction.ABORT_TASK_SET: TaskManagementFunction.ABORT_TASK_SET,
    TmfFunction.CLEAR_ACA: TaskManagementFunction.CLEAR_ACA,
    TmfFunction.CLEAR_TASK_SET: TaskManagementFunction.CLEAR_TASK_SET,
    TmfFunction.LOGICAL_UNIT_RESET: TaskManagementFunction.LOGICAL_UNIT_RESET,
    TmfFunction.TARGET_WARM_RESET: TaskManagementFunction.TARGET_WARM_RESET,
    TmfFunction.TARGET_COLD_RESET: TaskManagementFunction.TARGET_COLD_RESET,
}
_TMF_RESPONSES = {
    TmfResponse.FUNCTION_COMPLETE: TmfResponseCode.FUNCTION_COMPLETE,
    TmfResponse.FUNCTION_SUCCEEDED: TmfResponseCode.FUNCTION_COMPLETE,
    TmfResponse.FUNCTION_REJECTED: TmfResponseCode.FUNCTION_NOT_SUPPORTED,
    TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER: TmfResponseCode.LUN_DOES_NOT_EXIST,
    TmfResponse.SERVICE_DELIVERY_OR_TARGET_FAILURE: TmfResponseCode.FUNCTION_REJECTED,
}
_CMDSN_PDUS = (ScsiCommand, NopOut, TaskManagementRequest, TextRequest, LogoutRequest)


class ConnectionState(enum.Enum):
    """Where the connection is in its life."""

    LOGIN = "login"
    FULL_FEATURE = "full_feature"
    CLOSING = "closing"  # the last PDUs are queued; close once they are sent
    CLOSED = "closed"


def _direct(callback: Callable[[], None]) -> None:
    callback()


class Connection:
    """The target's side of one iSCSI connection.

    `marshal(callback)` must run `callback` on the thread that owns this object; it is used
    for commands the SCSI target completes later (possibly from another thread). The default
    runs it at once, which suits targets that always complete inline. `on_output` is called
    when such a late completion queued bytes to send; `on_close_request` when another
    connection's action (reinstatement, cold reset) ends this one.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        marshal: Marshal = _direct,
        peer: str = "",
    ) -> None:
        self.registry = registry
        self.config = registry.config
        self.target = registry.target
        self.peer = peer
        self.params = OperationalParameters()
        self.state = ConnectionState.LOGIN
        self.on_output: Callable[[], None] | None = None
        self.on_close_request: Callable[[], None] | None = None
        self._marshal = marshal
        self._reader = PduReader(LOGIN_MAX_DATA_SEGMENT)
        self._out: list[Data] = []
        self._login = LoginMachine(self.config, self.params, statsn=1)
        self._header_digest = False
        self._data_digest = False
        self.statsn = 0
        self.exp_cmdsn = 0
        self.tsih = 0
        self.nexus = ""
        self._session_open = False
        self._queued: dict[int, tuple[Pdu, RawPdu]] = {}
        self._tasks: dict[int, ScsiTask] = {}
        self._next_ttt = 1
        self._text = bytearray()
        self._text_negotiator = Negotiator(self.config.limits, self.params)

    # ------------------------------------------------------------------ the I/O boundary

    @property
    def max_cmdsn(self) -> int:
        """The highest CmdSN the initiator may send now."""
        return sn_add(self.exp_cmdsn, self.config.cmdsn_window - 1)

    @property
    def wants_close(self) -> bool:
        """True when the owner should close the transport after sending what is queued."""
        return self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED)

    def receive_data(self, data: Data) -> None:
        """Process received bytes; responses accumulate for `data_to_send`."""
        if self.wants_close:
            return
        self._reader.feed(data)
        try:
            while not self.wants_close:
                raw = self._reader.next_pdu()
                if raw is None:
                    break
                self._receive_pdu(raw)
        except FramingError as exc:
            logger.warning("%s: dropping the connection: %s", self.peer, exc)
            self._close()
        except Exception:
            # A bug must cost this connection only, never the server or other sessions.
            logger.exception("%s: internal error; dropping the connection", self.peer)
            self._close()

    def data_to_send(self) -> list[Data]:
        """Take the byte strings queued for sending, in order."""
        out, self._out = self._out, []
        return out

    def connection_lost(self) -> None:
        """The transport closed: end the session (an I_T nexus loss if it was not logged out)."""
        self._close()

    def request_close(self) -> None:
        """Drop this connection without a response (reinstatement or cold reset elsewhere)."""
        self._close()
        if self.on_close_request is not None:
            self.on_close_request()

    # ------------------------------------------------------------------ dispatch

    def _receive_pdu(self, raw: RawPdu) -> None:
        try:
            pdu = decode_pdu(raw.bhs, raw.ahs, raw.data)
        except PduError as exc:
            logger.warning("%s: %s", self.peer, exc)
            if self.state is ConnectionState.LOGIN:
                self._close()
            else:
                self._reject(raw.bhs, RejectReason.COMMAND_NOT_SUPPORTED)
            return
        if self.state is ConnectionState.LOGIN:
            if isinstance(pdu, LoginRequest):
                self._on_login(pdu)
            else:
                logger.warning("%s: %s during login", self.peer, type(pdu).__name__)
                self._close()
            return
        if not raw.data_digest_ok:
            # ERL 0: a data digest error is answered with a Reject and ends the connection
            # (RFC 7143 sections 7.8 and 7.12).
            self._reject(raw.bhs, RejectReason.DATA_DIGEST_ERROR)
            self.state = ConnectionState.CLOSING
            self._end_session()
            return
        if isinstance(pdu, DataOut):
            self._on_data_out(pdu)
        elif isinstance(pdu, _CMDSN_PDUS):
            self._order(pdu, raw)
        elif pdu.OPCODE < 0x20 and not isinstance(pdu, LoginRequest):
            # SNACK: no recovery at ErrorRecoveryLevel 0 (section 11.16).
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
        else:
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)

    def _order(self, pdu: Pdu, raw: RawPdu) -> None:
        """Deliver commands in CmdSN order; ignore those outside the window (section 4.2.2.1)."""
        assert isinstance(pdu, _CMDSN_PDUS)
        if pdu.immediate:
            self._dispatch(pdu, raw)
            return
        cmdsn = pdu.cmdsn
        if cmdsn == self.exp_cmdsn:
            self.exp_cmdsn = sn_add(cmdsn, 1)
            self._dispatch(pdu, raw)
            while self.exp_cmdsn in self._queued and not self.wants_close:
                queued, queued_raw = self._queued.pop(self.exp_cmdsn)
                self.exp_cmdsn = sn_add(self.exp_cmdsn, 1)
                self._dispatch(queued, queued_raw)
        elif sn_in_window(cmdsn, self.exp_cmdsn, self.max_cmdsn) and cmdsn not in self._queued:
            self._queued[cmdsn] = (pdu, raw)
        else:
            logger.info(
                "%s: CmdSN %d outside [%d, %d]: ignored",
                self.peer,
                cmdsn,
                self.exp_cmdsn,
                self.max_cmdsn,
            )

    def _dispatch(self, pdu: Pdu, raw: RawPdu) -> None:
        if isinstance(pdu, ScsiCommand):
            self._on_scsi_command(pdu, raw)
        elif isinstance(pdu, NopOut):
            self._on_nop_out(pdu)
        elif isinstance(pdu, TaskManagementRequest):
            self._on_task_management(pdu, raw)
        elif isinstance(pdu, TextRequest):
            self._on_text(pdu, raw)
        elif isinstance(pdu, LogoutRequest):
            self._on_logout(pdu)

    # ------------------------------------------------------------------ login

    def _on_login(self, request: LoginRequest) -> None:
        step = self._login.receive(request)
        response = step.response
        if step.complete:
            normal = self.params.session_type == "Normal"
            result = self.registry.open_session(
                self, self.params.initiator_name, request.isid, request.tsih, normal=normal
            )
            if isinstance(result, LoginStatus):
                logger.info("%s: login refused: %s", self.peer, result.name)
                response.status = result
                response.transit = False
                response.nsg = 0
                step.failed = True
            else:
                self._session_open = True
                self.tsih = response.tsih = result
                self.nexus = nexus_name(self.params.initiator_name, request.isid)
        self._send(response)
        if step.failed:
            self.state = ConnectionState.CLOSING
            return
        if step.complete:
            self.state = ConnectionState.FULL_FEATURE
            self.statsn = self._login.statsn
            self.exp_cmdsn = self._login.exp_cmdsn
            # Digests start with the first PDU after the login (section 13.1).
            self._header_digest = self._reader.header_digest = self.params.header_digest
            self._data_digest = self._reader.data_digest = self.params.data_digest
            self._reader.max_data_segment_length = max(
                LOGIN_MAX_DATA_SEGMENT, self.params.target_max_recv_data_segment_length
            )
            logger.info(
                "%s: %s session %#06x for %s",
                self.peer,
                self.params.session_type,
                self.tsih,
                self.params.initiator_name,
            )

    # ------------------------------------------------------------------ SCSI commands

    def _on_scsi_command(self, command: ScsiCommand, raw: RawPdu) -> None:
        if self.params.session_type != "Normal":
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        if command.itt in self._tasks or command.itt == RESERVED_TAG:
            self._reject(raw.bhs, RejectReason.TASK_IN_PROGRESS)
            return
        edtl = command.expected_data_transfer_length
        if command.data and not (command.write and self.params.immediate_data):
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        if len(command.data) > min(edtl, self.params.first_burst_length):
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        lun = decode_lun(command.lun)
        if lun is None:
            self._respond_sense(command, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            return
        if edtl > MAX_TRANSFER_LENGTH or (command.read and command.write):
            # Bidirectional commands are not supported (no SCSI command here needs them).
            self._respond_sense(
                command, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
            )
            return
        block_size = self.config.block_sizes.get(lun)
        transfer = expected_transfer(command.cdb, block_size) if block_size else None
        task = ScsiTask(command, lun, transfer)
        self._tasks[command.itt] = task
        if command.write and edtl:
            task.start_write(self.params.first_burst_length, not self.params.initial_r2t)
            self._advance_write(task)
        else:
            self._execute(task)

    def _on_data_out(self, pdu: DataOut) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.write_buffer is None or task.executing:
            # The command was answered early (an error) or aborted: its data is not wanted.
            logger.debug("%s: Data-Out for unknown task %#x ignored", self.peer, pdu.itt)
            return
        task.accept_data_out(pdu)
        self._advance_write(task)

    def _advance_write(self, task: ScsiTask) -> None:
        if task.data_error:
            if task.quiescent:
                del self._tasks[task.itt]
                self._respond_sense(task.command, SenseKey.ABORTED_COMMAND, Asc.DATA_PHASE_ERROR)
            return
        if task.all_data_received:
            self._execute(task)
            return
        plans = task.plan_r2ts(self.params.max_outstanding_r2t, self.params.max_burst_length)
        for r2tsn, offset, length in plans:
            r2t = PendingR2T(self._allocate_ttt(), r2tsn, offset, length)
            task.add_r2t(r2t)
            self._send(
                R2T(
                    itt=task.itt,
                    ttt=r2t.ttt,
                    r2tsn=r2tsn,
                    buffer_offset=offset,
                    desired_data_transfer_length=length,
                    statsn=self.statsn,
                    exp_cmdsn=self.exp_cmdsn,
                    max_cmdsn=self.max_cmdsn,
                    lun=task.command.lun,
                )
            )

    def _allocate_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = ttt + 1 if ttt < 0xFFFFFFFE else 1
        return ttt

    def _execute(self, task: ScsiTask) -> None:
        command = task.command
        edtl = command.expected_data_transfer_length
        transfer = task.transfer
        cdb: bytes | memoryview = command.cdb
        if transfer is not None and transfer.direction is Direction.OUT:
            if transfer.strict and transfer.length != edtl:
                # COMPARE AND WRITE needs exactly its verify and write data (SBC-4 5.3).
                del self._tasks[task.itt]
                self._respond_sense(
                    command,
                    SenseKey.ILLEGAL_REQUEST,
                    Asc.INVALID_FIELD_IN_CDB,
                    residual=transfer.length - edtl,
                )
                return
            if transfer.length > edtl:
                # The initiator sent less than the CDB asks: write only the whole blocks it
                # sent and report the overflow (RFC 7143 section 11.4.5.1), as libiscsi's
                # iSCSIResiduals tests expect.
                blocks = edtl // transfer.block_size if transfer.block_size else 0
                shorter = with_transfer_length(cdb, blocks) if blocks else None
                if shorter is None and not transfer.block_size:
                    # Not a plain block count (WRITE SAME...): refuse the command.
                    del self._tasks[task.itt]
                    self._respond_sense(
                        command,
                        SenseKey.ILLEGAL_REQUEST,
                        Asc.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
                        residual=transfer.length - edtl,
                    )
                    return
                if shorter is None:
                    del self._tasks[task.itt]
                    self._send_status(
                        ScsiResponse(
                            itt=command.itt,
                            status=Status.GOOD,
                            flags=ScsiResponse.FLAG_OVERFLOW,
                            residual_count=transfer.length - edtl,
                        )
                    )
                    return
                cdb = shorter
        capacity = edtl if command.read else 0
        wants_data_in = command.read
        if transfer is not None and transfer.direction is Direction.IN:
            # Room for what the CDB asks even beyond the EDTL, to measure the overflow.
            capacity = max(capacity, min(transfer.length, MAX_TRANSFER_LENGTH))
            wants_data_in = True
        task.data_in = DataInBuffer(capacity) if wants_data_in else None
        data_out = BytesReader(task.write_buffer) if task.write_buffer is not None else None
        task.executing = True
        request = Request(
            lun=task.lun,
            cdb=cdb,
            data_out=data_out,
            data_in=task.data_in,
            tag=command.itt,
            task_attr=_TASK_ATTRIBUTES.get(command.attribute, TaskAttribute.SIMPLE),
            nexus=self.nexus,
        )
        response = self.target.execute(
            request, lambda r: self._marshal(lambda: self._late(task, r))
        )
        if response is not None:
            self._complete(task, response)

    def _late(self, task: ScsiTask, response: Response) -> None:
        self._complete(task, response)
        if self._out and self.on_output is not None:
            self.on_output()

    def _complete(self, task: ScsiTask, response: Response) -> None:
        if self._tasks.get(task.itt) is not task or self.state is not ConnectionState.FULL_FEATURE:
            return  # aborted, or the connection is gone: nobody is told (SAM-5 5.6)
        del self._tasks[task.itt]
        command = task.command
        edtl = command.expected_data_transfer_length
        transfer = task.transfer
        flags = 0
        residual = 0
        send = 0
        if task.data_in is not None:
            produced = task.data_in.written
            if command.read:
                send = min(produced, edtl)
            if produced > edtl:
                flags, residual = ScsiResponse.FLAG_OVERFLOW, produced - edtl
            elif produced < edtl:
                flags, residual = ScsiResponse.FLAG_UNDERFLOW, edtl - produced
        elif transfer is not None:
            if transfer.length < edtl:
                flags, residual = ScsiResponse.FLAG_UNDERFLOW, edtl - transfer.length
            elif transfer.length > edtl:
                flags, residual = ScsiResponse.FLAG_OVERFLOW, transfer.length - edtl
        elif command.write:
            if 0 < response.residual <= edtl:
                flags, residual = ScsiResponse.FLAG_UNDERFLOW, response.residual
        elif edtl:
            flags, residual = ScsiResponse.FLAG_UNDERFLOW, edtl
        collapse = response.status == Status.GOOD and not response.sense
        if send:
            assert task.data_in is not None
            self._send_data_in(task, task.data_in, send, flags, residual, collapse)
            if collapse:
                return
        self._send_status(
            ScsiResponse(
                itt=command.itt,
                status=response.status,
                flags=flags,
                residual_count=residual,
                exp_datasn=task.pdus_sent,
                data=_sense_segment(response.sense),
            )
        )

    def _send_data_in(
        self,
        task: ScsiTask,
        data_in: DataInBuffer,
        length: int,
        flags: int,
        residual: int,
        with_status: bool,
    ) -> None:
        segment = self.params.max_recv_data_segment_length
        burst = self.params.max_burst_length
        offset = 0
        datasn = 0
        while offset < length:
            # A Data-In sequence (F bit) ends at each MaxBurstLength boundary (section 13.13).
            burst_end = min(length, (offset // burst + 1) * burst)
            end = min(burst_end, offset + segment)
            last = end == length
            pdu = DataIn(
                itt=task.itt,
                datasn=datasn,
                buffer_offset=offset,
                final=end == burst_end,
                lun=task.command.lun,
                exp_cmdsn=self.exp_cmdsn,
                max_cmdsn=self.max_cmdsn,
                data=data_in.view(offset, end),
            )
            if last and with_status:
                pdu.status_present = True
                pdu.status = Status.GOOD
                pdu.residual_flags = flags
                pdu.residual_count = residual
                pdu.statsn = self.statsn
                self.statsn = sn_add(self.statsn, 1)
            else:
                pdu.statsn = self.statsn
            self._send(pdu)
            datasn += 1
            offset = end
        task.pdus_sent += datasn

    def _respond_sense(
        self, command: ScsiCommand, key: SenseKey, code: Asc, residual: int = 0
    ) -> None:
        edtl = command.expected_data_transfer_length
        flags = 0
        if residual > 0:
            flags = ScsiResponse.FLAG_OVERFLOW
        elif residual < 0 or (residual == 0 and edtl):
            flags, residual = ScsiResponse.FLAG_UNDERFLOW, edtl if residual == 0 else -residual
        self._send_status(
            ScsiResponse(
                itt=command.itt,
                status=Status.CHECK_CONDITION,
                flags=flags,
                residual_count=residual,
                data=_sense_segment(build_sense(key, code)),
            )
        )

    # ------------------------------------------------------------------ task management

    def _on_task_management(self, request: TaskManagementRequest, raw: RawPdu) -> None:
        if self.params.session_type != "Normal":
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        code = self._task_management(request)
        self._send_status(TaskManagementResponse(itt=request.itt, response=code))
        if request.function == TmfFunction.TARGET_COLD_RESET and code == 0:
            # A cold reset ends every session, this one after its response (section 11.5.1).
            self.registry.cold_reset(self)
            self.state = ConnectionState.CLOSING
            self._end_session()

    def _task_management(self, request: TaskManagementRequest) -> TmfResponseCode:
        function = request.function
        if function == TmfFunction.TASK_REASSIGN:
            return TmfResponseCode.REASSIGNMENT_NOT_SUPPORTED
        scsi_function = _TMF_FUNCTIONS.get(function)
        if scsi_function is None:
            return TmfResponseCode.FUNCTION_REJECTED
        lun = decode_lun(request.lun)
        target_wide = function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET)
        if not target_wide and (
            lun is None or lun == REPORT_LUNS_WLUN or lun not in self.target.luns()
        ):
            return TmfResponseCode.LUN_DOES_NOT_EXIST
        if lun is None:
            lun = 0
        if function == TmfFunction.ABORT_TASK:
            task = self._tasks.get(request.referenced_task_tag)
            if task is None or task.lun != lun:
                # Already completed (or never received): section 11.5.1 case c.
                return TmfResponseCode.TASK_DOES_NOT_EXIST
            del self._tasks[task.itt]
            if task.executing:
                result = self.target.task_management(scsi_function, lun, task.itt, self.nexus)
                return _TMF_RESPONSES.get(result, TmfResponseCode.FUNCTION_REJECTED)
            return TmfResponseCode.FUNCTION_COMPLETE
        if function != TmfFunction.CLEAR_ACA:
            for itt, task in list(self._tasks.items()):
                if target_wide or task.lun == lun:
                    del self._tasks[itt]
        result = self.target.task_management(scsi_function, lun, 0, self.nexus)
        return _TMF_RESPONSES.get(result, TmfResponseCode.FUNCTION_REJECTED)

    # ------------------------------------------------------------------ NOP, Text, Logout

    def _on_nop_out(self, nop: NopOut) -> None:
        if nop.itt == RESERVED_TAG:
            return  # a ping answer or a plain sequence-number update: no response
        data = nop.data[: self.params.max_recv_data_segment_length]
        self._send_status(NopIn(itt=nop.itt, ttt=RESERVED_TAG, lun=nop.lun, data=data))

    def _on_text(self, request: TextRequest, raw: RawPdu) -> None:
        self._text += request.data
        if len(self._text) > MAX_TEXT:
            self._text.clear()
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        if request.cont:
            # Text continues in the next request: answer with an empty response (section 11.10).
            self._send_status(
                TextResponse(
                    itt=request.itt, ttt=self._allocate_ttt(), final=False, lun=request.lun
                )
            )
            return
        text = bytes(self._text)
        self._text.clear()
        try:
            pairs = decode_text(text)
            answers: list[tuple[str, str]] = []
            for key, value in pairs:
                if key == "SendTargets":
                    answers += self._send_targets(value)
            others = [(k, v) for k, v in pairs if k != "SendTargets"]
            self._text_negotiator = Negotiator(self.config.limits, self.params)
            answers += self._text_negotiator.respond(others, in_login=False)
        except (TextError, NegotiationError) as exc:
            logger.warning("%s: bad Text Request: %s", self.peer, exc)
            self._reject(raw.bhs, RejectReason.PROTOCOL_ERROR)
            return
        self._send_status(
            TextResponse(
                itt=request.itt, ttt=RESERVED_TAG, lun=request.lun, data=encode_text(answers)
            )
        )

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        """SendTargets answer (RFC 7143 appendix C): our one target, if it is the one asked."""
        iqn = self.config.iqn
        discovery = self.params.session_type == "Discovery"
        if (value == "All" and discovery) or value == iqn or (value == "" and not discovery):
            address = f"{self.config.portal_address},{self.config.tpgt}"
            return [("TargetName", iqn), ("TargetAddress", address)]
        return []

    def _on_logout(self, request: LogoutRequest) -> None:
        if request.reason == LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            self._send_status(
                LogoutResponse(itt=request.itt, response=LogoutResponseCode.RECOVERY_NOT_SUPPORTED)
            )
            return
        self._send_status(
            LogoutResponse(
                itt=request.itt,
                response=LogoutResponseCode.SUCCESS,
                time2wait=self.params.default_time2wait,
                time2retain=0,
            )
        )
        self.state = ConnectionState.CLOSING
        self._end_session()

    # ------------------------------------------------------------------ output helpers

    def _reject(self, bhs: bytes, reason: RejectReason) -> None:
        logger.info("%s: Reject (%s) of opcode %#04x", self.peer, reason.name, bhs[0] & 0x3F)
        self._send_status(Reject(reason=reason, data=bhs[:48]))

    def _send_status(
        self,
        pdu: ScsiResponse | TaskManagementResponse | NopIn | TextResponse | LogoutResponse | Reject,
    ) -> None:
        """Send a PDU that consumes a StatSN (every response except R2T and Data-In)."""
        pdu.statsn = self.statsn
        pdu.exp_cmdsn = self.exp_cmdsn
        pdu.max_cmdsn = self.max_cmdsn
        self.statsn = sn_add(self.statsn, 1)
        self._send(pdu)

    def _send(self, pdu: Pdu) -> None:
        header, data = pdu.encode()
        self._out += frame_pdu(
            header, data, header_digest=self._header_digest, data_digest=self._data_digest
        )

    def _end_session(self) -> None:
        self._tasks.clear()
        self._queued.clear()
        if self._session_open:
            self._session_open = False
            self.registry.close_session(self)

    def _close(self) -> None:
        self.state = ConnectionState.CLOSED
        self._end_session()


def _sense_segment(sense: bytes) -> bytes:
    """The data segment of a SCSI Response: SenseLength then the sense data (section 11.4.7)."""
    if not sense:
        return b""
    return len(sense).to_bytes(2, "big") + sense
