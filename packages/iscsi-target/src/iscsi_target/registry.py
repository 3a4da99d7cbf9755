"""The sessions of one target across all its connections: TSIH allocation, session
reinstatement, I_T nexus loss and TARGET COLD RESET (RFC 7143 sections 6.3.5 and 11.5.1).

Holds the `scsi_core.target.Target` and the configuration shared by every connection. It
knows connections only through the small `SessionMember` protocol (no sockets, no trio).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from scsi_core.target import Target, TaskManagementFunction

from iscsi_target.config import TargetConfig
from iscsi_target.constants import LoginStatus

__all__ = ["SessionMember", "SessionRegistry", "nexus_name"]

logger = logging.getLogger(__name__)


class SessionMember(Protocol):
    """What the registry needs of a connection."""

    def request_close(self) -> None:
        """Drop the connection as soon as possible (reinstatement, cold reset)."""


def nexus_name(initiator_name: str, isid: int) -> str:
    """The SCSI initiator port name of an iSCSI session (RFC 7143 section 4.4.2)."""
    return f"{initiator_name},i,0x{isid:012x}"


@dataclass(slots=True)
class _Session:
    tsih: int
    member: SessionMember
    key: tuple[str, int]
    nexus: Hashable
    normal: bool


class SessionRegistry:
    """Every live session of the target, keyed by TSIH and by (InitiatorName, ISID)."""

    def __init__(self, target: Target, config: TargetConfig) -> None:
        self.target = target
        self.config = config
        self._by_tsih: dict[int, _Session] = {}
        self._by_key: dict[tuple[str, int], _Session] = {}
        self._by_member: dict[int, _Session] = {}
        self._next_tsih = 1

    def __len__(self) -> int:
        return len(self._by_tsih)

    def open_session(
        self, member: SessionMember, initiator_name: str, isid: int, tsih: int, *, normal: bool
    ) -> int | LoginStatus:
        """Admit a completed login: return the new TSIH, or the Login status that refuses it.

        A login with TSIH 0 whose (InitiatorName, ISID) names a live session reinstates it:
        the old session is closed first, which is an I_T nexus loss (section 6.3.5).
        """
        if tsih != 0:
            # MaxConnections is 1: no connection can be added to an existing session.
            if tsih in self._by_tsih:
                return LoginStatus.TOO_MANY_CONNECTIONS
            return LoginStatus.SESSION_DOES_NOT_EXIST
        key = (initiator_name, isid)
        old = self._by_key.get(key)
        if old is not None:
            logger.info("reinstating session %#06x of %s", old.tsih, initiator_name)
            self.close_session(old.member)
            old.member.request_close()
        new_tsih = self._allocate_tsih()
        session = _Session(new_tsih, member, key, nexus_name(initiator_name, isid), normal)
        self._by_tsih[new_tsih] = session
        self._by_key[key] = session
        self._by_member[id(member)] = session
        return new_tsih

    def close_session(self, member: SessionMember) -> None:
        """End `member`'s session (logout or connection loss): an I_T nexus loss for SCSI."""
        session = self._by_member.pop(id(member), None)
        if session is None:
            return
        del self._by_tsih[session.tsih]
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        if session.normal:
            self.nexus_lost(session.nexus)

    def nexus_lost(self, nexus: Hashable) -> None:
        """Tell the SCSI target that an I_T nexus is gone (SAM-5 6.3.4)."""
        # I_T NEXUS RESET is target-wide: the LUN argument does not select anything.
        luns = self.target.luns()
        lun = luns[0] if luns else 0
        self.target.task_management(TaskManagementFunction.I_T_NEXUS_RESET, lun, 0, nexus)

    def cold_reset(self, origin: SessionMember) -> None:
        """Close every session but `origin`'s (which closes after its TMF response)."""
        for session in list(self._by_tsih.values()):
            if session.member is not origin:
                self.close_session(session.member)
                session.member.request_close()

    def _allocate_tsih(self) -> int:
        # TSIH 0 is reserved for "new session" (section 11.12.6).
        while True:
            tsih = self._next_tsih
            self._next_tsih = tsih % 0xFFFF + 1
            if tsih not in self._by_tsih:
                return tsih
