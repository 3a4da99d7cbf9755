"""The state of one SCSI command inside an iSCSI session: where its Data-Out stands.

Tracks the write buffer (Expected Data Transfer Length bytes), the unsolicited burst (immediate
data and Data-Out with TTT ffffffffh, up to FirstBurstLength), the outstanding R2Ts and the
DataSN and buffer offset each Data-Out must carry (RFC 7143 sections 4.2.4 and 11.7-11.8).
It knows nothing of sequence numbers of the session, of sending PDUs or of executing the
command; `connection` drives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from iscsi_target.buffers import DataInBuffer
from iscsi_target.constants import RESERVED_TAG
from iscsi_target.pdu import DataOut, ScsiCommand
from iscsi_target.transfer import Transfer

__all__ = ["PendingR2T", "ScsiTask"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingR2T:
    """One R2T sent and not yet satisfied: the Data-Out sequence it solicits."""

    ttt: int
    r2tsn: int
    offset: int
    length: int
    received: int = 0
    next_datasn: int = 0


@dataclass(slots=True, eq=False)
class ScsiTask:
    """One SCSI command from its SCSI Command PDU to its status."""

    command: ScsiCommand
    lun: int
    transfer: Transfer | None
    write_buffer: bytearray | None = None
    received: int = 0
    unsolicited_open: bool = False
    unsolicited_limit: int = 0
    unsolicited_next_datasn: int = 0
    r2ts: dict[int, PendingR2T] = field(default_factory=dict)
    next_r2t_offset: int = 0
    next_r2tsn: int = 0
    data_error: str = ""
    executing: bool = False
    data_in: DataInBuffer | None = None
    pdus_sent: int = 0  # R2T and Data-In PDUs: the ExpDataSN of the SCSI Response

    @property
    def itt(self) -> int:
        """The Initiator Task Tag."""
        return self.command.itt

    @property
    def expected_length(self) -> int:
        """The Expected Data Transfer Length of the command."""
        return self.command.expected_data_transfer_length

    def start_write(self, first_burst_length: int, unsolicited_allowed: bool) -> None:
        """Allocate the write buffer and take the immediate data of the command PDU."""
        edtl = self.expected_length
        self.write_buffer = bytearray(edtl)
        immediate = self.command.data
        self.write_buffer[: len(immediate)] = immediate
        self.received = len(immediate)
        self.unsolicited_limit = min(edtl, first_burst_length)
        more_wanted = self.received < self.unsolicited_limit
        self.unsolicited_open = unsolicited_allowed and not self.command.final and more_wanted
        self.next_r2t_offset = self.received

    @property
    def all_data_received(self) -> bool:
        """True when every byte of the Expected Data Transfer Length has arrived."""
        return self.received >= self.expected_length

    @property
    def quiescent(self) -> bool:
        """True when no Data-Out sequence is open (no unsolicited burst, no R2T pending)."""
        return not self.unsolicited_open and not self.r2ts

    def plan_r2ts(self, max_outstanding: int, max_burst: int) -> list[tuple[int, int, int]]:
        """(r2tsn, offset, length) of the R2Ts to send now; the caller assigns each a TTT."""
        if self.data_error or self.unsolicited_open:
            return []
        plans: list[tuple[int, int, int]] = []
        edtl = self.expected_length
        while len(self.r2ts) + len(plans) < max_outstanding and self.next_r2t_offset < edtl:
            length = min(max_burst, edtl - self.next_r2t_offset)
            plans.append((self.next_r2tsn, self.next_r2t_offset, length))
            self.next_r2tsn += 1
            self.next_r2t_offset += length
        return plans

    def add_r2t(self, r2t: PendingR2T) -> None:
        """Record an R2T that was sent."""
        self.r2ts[r2t.ttt] = r2t
        self.pdus_sent += 1

    def accept_data_out(self, pdu: DataOut) -> None:
        """Place one Data-Out PDU's payload, checking its TTT, DataSN and buffer offset.

        A violation sets `data_error` (the command then fails with a data phase error once
        the initiator has finished the sequence it is sending) instead of raising.
        """
        length = len(pdu.data)
        if pdu.ttt == RESERVED_TAG:
            self._accept_unsolicited(pdu, length)
        else:
            self._accept_solicited(pdu, length)

    def _accept_unsolicited(self, pdu: DataOut, length: int) -> None:
        if not self.unsolicited_open:
            self._fail(f"unsolicited Data-Out not expected (offset {pdu.buffer_offset})")
            return
        if pdu.final:
            self.unsolicited_open = False
        if self.data_error:
            return
        if pdu.datasn != self.unsolicited_next_datasn:
            self._fail(f"DataSN {pdu.datasn}, expected {self.unsolicited_next_datasn}")
            return
        end = pdu.buffer_offset + length
        if pdu.buffer_offset != self.received or end > self.unsolicited_limit:
            self._fail(f"unsolicited data at {pdu.buffer_offset}+{length}")
            return
        self._place(pdu, length)
        self.unsolicited_next_datasn += 1
        if self.received >= self.unsolicited_limit:
            self.unsolicited_open = False
        if not self.unsolicited_open:
            self.next_r2t_offset = self.received

    def _accept_solicited(self, pdu: DataOut, length: int) -> None:
        r2t = self.r2ts.get(pdu.ttt)
        if r2t is None:
            self._fail(f"Data-Out with unknown TTT {pdu.ttt:#x}")
            return
        if pdu.final:
            del self.r2ts[pdu.ttt]
        if self.data_error:
            return
        if pdu.datasn != r2t.next_datasn:
            self._fail(f"DataSN {pdu.datasn}, expected {r2t.next_datasn}")
            return
        if pdu.buffer_offset != r2t.offset + r2t.received or r2t.received + length > r2t.length:
            self._fail(f"solicited data at {pdu.buffer_offset}+{length} outside the R2T")
            return
        self._place(pdu, length)
        r2t.received += length
        r2t.next_datasn += 1
        if r2t.received == r2t.length:
            self.r2ts.pop(pdu.ttt, None)

    def _place(self, pdu: DataOut, length: int) -> None:
        assert self.write_buffer is not None
        offset = pdu.buffer_offset
        self.write_buffer[offset : offset + length] = pdu.data
        self.received += length

    def _fail(self, reason: str) -> None:
        if not self.data_error:
            logger.warning("task %#x: %s", self.itt, reason)
            self.data_error = reason
