"""A small iSCSI initiator for tests, written against the package's PDU codec.

It runs over any `Transport` (two async methods): a real TCP stream for the server tests, or
`LoopbackTransport`, which feeds a sans-IO `Connection` directly.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from iscsi_target.connection import Connection
from iscsi_target.constants import RESERVED_TAG
from iscsi_target.framing import PduReader, frame_pdu
from iscsi_target.pdu import (
    R2T,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    decode_pdu,
)
from iscsi_target.text import decode_text, encode_binary, encode_text, parse_binary

INITIATOR = "iqn.2024-01.org.example:initiator"
LIBISCSI_KEYS = {
    "HeaderDigest": "None,CRC32C",
    "DataDigest": "None",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxBurstLength": "262144",
    "FirstBurstLength": "262144",
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "0",
    "MaxOutstandingR2T": "1",
    "ErrorRecoveryLevel": "0",
    "IFMarker": "No",
    "OFMarker": "No",
    "MaxConnections": "1",
    "MaxRecvDataSegmentLength": "262144",
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
}


class NoResponse(Exception):
    """The target sent nothing (where the loopback can tell at once)."""


class Transport(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes: ...


class LoopbackTransport:
    """Delivers bytes straight to a sans-IO `Connection` and returns what it queued."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._pending = b""

    async def send(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self._pending += b"".join(bytes(p) for p in self.connection.data_to_send())

    async def receive(self) -> bytes:
        self._pending += b"".join(bytes(p) for p in self.connection.data_to_send())
        if not self._pending:
            raise NoResponse
        data, self._pending = self._pending, b""
        return data


@dataclass
class CommandResult:
    """What came back for one SCSI command."""

    status: int
    sense: bytes = b""
    data: bytes = b""
    residual_flags: int = 0
    residual: int = 0
    data_in: list[DataIn] = field(default_factory=list)
    r2ts: list[R2T] = field(default_factory=list)

    @property
    def overflow(self) -> bool:
        return bool(self.residual_flags & ScsiResponse.FLAG_OVERFLOW)

    @property
    def underflow(self) -> bool:
        return bool(self.residual_flags & ScsiResponse.FLAG_UNDERFLOW)


class Initiator:
    """One connection's worth of initiator state: tags, CmdSN, negotiated values."""

    def __init__(self, transport: Transport, isid: int = 0x023D_0000_0001) -> None:
        self.transport = transport
        self.isid = isid
        self.reader = PduReader(1 << 24)
        self._itt = itertools.count(0x100)
        self.cmdsn = 1
        self.exp_statsn = 0
        self.tsih = 0
        self.negotiated: dict[str, str] = {}
        self._received: list[Pdu] = []
        self.header_digest = False
        self.data_digest = False

    def next_itt(self) -> int:
        return next(self._itt)

    # -------------------------------------------------------------- PDU I/O

    async def send(self, pdu: Pdu) -> None:
        header, data = pdu.encode()
        parts = frame_pdu(
            header, data, header_digest=self.header_digest, data_digest=self.data_digest
        )
        await self.transport.send(b"".join(bytes(p) for p in parts))

    async def receive(self) -> Pdu:
        while not self._received:
            self.reader.feed(await self.transport.receive())
            while (raw := self.reader.next_pdu()) is not None:
                self._received.append(decode_pdu(raw.bhs, raw.ahs, raw.data))
        pdu = self._received.pop(0)
        statsn = getattr(pdu, "statsn", None)
        if statsn is not None and not isinstance(pdu, (R2T, DataIn)):
            self.exp_statsn = (statsn + 1) & 0xFFFFFFFF
        return pdu

    # -------------------------------------------------------------- login

    async def login(
        self,
        target: str,
        *,
        initiator: str = INITIATOR,
        keys: dict[str, str] | None = None,
        session_type: str = "Normal",
        chap: tuple[str, bytes] | None = None,
        mutual: tuple[str, bytes] | None = None,
    ) -> LoginResponse:
        """Log in; returns the last Login Response (check its status)."""
        itt = self.next_itt()
        names = {"InitiatorName": initiator, "SessionType": session_type}
        if session_type == "Normal":
            names["TargetName"] = target
        operational = dict(LIBISCSI_KEYS if keys is None else keys)
        if chap is not None:
            response = await self._login_pdu(itt, 0, 1, {**names, "AuthMethod": "CHAP,None"})
            if response.status:
                return response
            response = await self._login_pdu(itt, 0, 1, {"CHAP_A": "5"}, transit=False)
            if response.status:
                return response
            offered = dict(decode_text(response.data))
            identifier = int(offered["CHAP_I"])
            challenge = parse_binary(offered["CHAP_C"])
            digest = hashlib.md5(bytes((identifier,)) + chap[1] + challenge).digest()
            answer = {"CHAP_N": chap[0], "CHAP_R": encode_binary(digest)}
            my_challenge = b"\x5a" * 16
            if mutual is not None:
                answer |= {"CHAP_I": "77", "CHAP_C": encode_binary(my_challenge)}
            response = await self._login_pdu(itt, 0, 1, answer)
            if response.status:
                return response
            if mutual is not None:
                got = dict(decode_text(response.data))
                expected = hashlib.md5(bytes((77,)) + mutual[1] + my_challenge).digest()
                assert got["CHAP_N"] == mutual[0]
                assert parse_binary(got["CHAP_R"]) == expected
            response = await self._login_pdu(itt, 1, 3, operational)
        else:
            response = await self._login_pdu(itt, 1, 3, {**names, **operational})
        if response.status == 0 and response.transit and response.nsg == 3:
            self.tsih = response.tsih
            self.cmdsn = response.exp_cmdsn
            self.header_digest = self.negotiated.get("HeaderDigest") == "CRC32C"
            self.data_digest = self.negotiated.get("DataDigest") == "CRC32C"
            self.reader.header_digest = self.header_digest
            self.reader.data_digest = self.data_digest
        return response

    async def _login_pdu(
        self, itt: int, csg: int, nsg: int, keys: dict[str, str], *, transit: bool = True
    ) -> LoginResponse:
        await self.send(
            LoginRequest(
                itt=itt,
                isid=self.isid,
                csg=csg,
                nsg=nsg,
                transit=transit,
                tsih=self.tsih,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                data=encode_text(keys.items()),
            )
        )
        response = await self.receive()
        assert isinstance(response, LoginResponse), response
        self.negotiated.update(decode_text(response.data))
        return response

    # -------------------------------------------------------------- full feature phase

    def _int(self, key: str, default: int) -> int:
        return int(self.negotiated.get(key, default))

    async def command(
        self,
        cdb: bytes,
        *,
        lun: bytes = bytes(8),
        read: int = 0,
        data: bytes = b"",
        edtl: int | None = None,
        read_flag: bool | None = None,
        write_flag: bool | None = None,
    ) -> CommandResult:
        """Run one SCSI command to its status, answering R2Ts."""
        itt = self.next_itt()
        length = edtl if edtl is not None else (len(data) if data else read)
        write = bool(data) if write_flag is None else write_flag
        immediate_ok = self.negotiated.get("ImmediateData", "Yes") == "Yes"
        unsolicited_ok = self.negotiated.get("InitialR2T", "Yes") == "No"
        first_burst = min(self._int("FirstBurstLength", 65536), length, len(data))
        segment = self._int("MaxRecvDataSegmentLength", 8192)
        immediate = data[: min(first_burst, segment)] if write and immediate_ok else b""
        unsolicited_end = first_burst if unsolicited_ok else len(immediate)
        cmdsn = self.cmdsn
        self.cmdsn += 1
        await self.send(
            ScsiCommand(
                itt=itt,
                cdb=cdb,
                expected_data_transfer_length=length,
                cmdsn=cmdsn,
                exp_statsn=self.exp_statsn,
                lun=lun,
                final=unsolicited_end <= len(immediate),
                read=bool(read) if read_flag is None else read_flag,
                write=write,
                data=immediate,
            )
        )
        if unsolicited_end > len(immediate):
            await self._data_out(itt, RESERVED_TAG, data, len(immediate), unsolicited_end, lun)
        result = CommandResult(status=-1)
        received = bytearray()
        while True:
            pdu = await self.receive()
            if isinstance(pdu, R2T):
                result.r2ts.append(pdu)
                end = pdu.buffer_offset + pdu.desired_data_transfer_length
                await self._data_out(itt, pdu.ttt, data, pdu.buffer_offset, end, lun)
            elif isinstance(pdu, DataIn):
                result.data_in.append(pdu)
                assert pdu.buffer_offset == len(received)
                received += pdu.data
                if pdu.status_present:
                    result.status = pdu.status
                    result.residual_flags = pdu.residual_flags
                    result.residual = pdu.residual_count
                    break
            elif isinstance(pdu, ScsiResponse):
                assert pdu.itt == itt
                result.status = pdu.status
                result.sense = pdu.sense
                result.residual_flags = pdu.flags
                result.residual = pdu.residual_count
                break
            else:
                raise AssertionError(f"unexpected {pdu!r}")
        result.data = bytes(received)
        return result

    async def _data_out(
        self, itt: int, ttt: int, data: bytes, start: int, end: int, lun: bytes
    ) -> None:
        segment = self._int("MaxRecvDataSegmentLength", 8192)
        datasn = 0
        offset = start
        while offset < end:
            chunk_end = min(end, offset + segment)
            await self.send(
                DataOut(
                    itt=itt,
                    ttt=ttt,
                    datasn=datasn,
                    buffer_offset=offset,
                    exp_statsn=self.exp_statsn,
                    lun=lun,
                    final=chunk_end == end,
                    data=data[offset:chunk_end],
                )
            )
            datasn += 1
            offset = chunk_end

    async def nop(self, data: bytes = b"") -> NopIn:
        await self.send(NopOut(itt=self.next_itt(), cmdsn=self.cmdsn, immediate=True, data=data))
        pdu = await self.receive()
        assert isinstance(pdu, NopIn), pdu
        return pdu

    async def tmf(
        self, function: int, referenced: int = RESERVED_TAG, lun: bytes = bytes(8)
    ) -> TaskManagementResponse:
        await self.send(
            TaskManagementRequest(
                itt=self.next_itt(),
                function=function,
                referenced_task_tag=referenced,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                lun=lun,
                immediate=True,
            )
        )
        pdu = await self.receive()
        assert isinstance(pdu, TaskManagementResponse), pdu
        return pdu

    async def text(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        cmdsn = self.cmdsn
        self.cmdsn += 1
        await self.send(
            TextRequest(
                itt=self.next_itt(),
                cmdsn=cmdsn,
                exp_statsn=self.exp_statsn,
                data=encode_text(keys.items()),
            )
        )
        pdu = await self.receive()
        assert isinstance(pdu, TextResponse), pdu
        return decode_text(pdu.data)

    async def logout(self) -> LogoutResponse:
        cmdsn = self.cmdsn
        self.cmdsn += 1
        await self.send(LogoutRequest(itt=self.next_itt(), cmdsn=cmdsn, exp_statsn=self.exp_statsn))
        pdu = await self.receive()
        assert isinstance(pdu, LogoutResponse), pdu
        return pdu

    async def expect_reject(self) -> Reject:
        pdu = await self.receive()
        assert isinstance(pdu, Reject), pdu
        return pdu
