"""Operational text key negotiation, the responder's side (RFC 7143 sections 6.2 and 13).

Holds the table of keys with their negotiation rule (list, Boolean OR/AND, numerical
minimum/maximum, declarative), the target's own limits and the negotiated parameters of a
session. It answers every key an initiator offers, as section 6.2 requires. It knows nothing
of PDUs, of the login stages' order or of CHAP (see `login` and `chap`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from iscsi_target.text import TextError, parse_boolean, parse_number

__all__ = [
    "KEYS",
    "KeyRule",
    "KeySpec",
    "NegotiationError",
    "Negotiator",
    "OperationalParameters",
    "TargetLimits",
]

logger = logging.getLogger(__name__)

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"
_ANSWER_VALUES = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})


class NegotiationError(Exception):
    """The offered keys break the negotiation rules (e.g. a key offered twice)."""


class KeyRule(enum.Enum):
    """How the outcome of a key is computed (RFC 7143 section 6.2.2)."""

    LIST = "list"  # the first value in the offerer's list that the responder supports
    OR = "or"
    AND = "and"
    MIN = "min"
    MAX = "max"
    DECLARATIVE = "declarative"  # each side states its own value; no answer is required


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key of RFC 7143 section 13: its rule, valid range and whether it is login-only."""

    name: str
    rule: KeyRule
    low: int = 0
    high: int = 0
    login_only: bool = True


_DSL_HIGH = (1 << 24) - 1
KEYS: dict[str, KeySpec] = {
    spec.name: spec
    for spec in (
        KeySpec("HeaderDigest", KeyRule.LIST),
        KeySpec("DataDigest", KeyRule.LIST),
        KeySpec("MaxConnections", KeyRule.MIN, 1, 65535),
        KeySpec("InitialR2T", KeyRule.OR),
        KeySpec("ImmediateData", KeyRule.AND),
        KeySpec("MaxRecvDataSegmentLength", KeyRule.DECLARATIVE, 512, _DSL_HIGH, False),
        KeySpec("MaxBurstLength", KeyRule.MIN, 512, _DSL_HIGH),
        KeySpec("FirstBurstLength", KeyRule.MIN, 512, _DSL_HIGH),
        KeySpec("DefaultTime2Wait", KeyRule.MAX, 0, 3600),
        KeySpec("DefaultTime2Retain", KeyRule.MIN, 0, 3600),
        KeySpec("MaxOutstandingR2T", KeyRule.MIN, 1, 65535),
        KeySpec("DataPDUInOrder", KeyRule.OR),
        KeySpec("DataSequenceInOrder", KeyRule.OR),
        KeySpec("ErrorRecoveryLevel", KeyRule.MIN, 0, 2),
        KeySpec("IFMarker", KeyRule.AND),
        KeySpec("OFMarker", KeyRule.AND),
        KeySpec("TaskReporting", KeyRule.LIST),
        KeySpec("iSCSIProtocolLevel", KeyRule.MIN, 0, 31),
        KeySpec("InitiatorName", KeyRule.DECLARATIVE),
        KeySpec("InitiatorAlias", KeyRule.DECLARATIVE, login_only=False),
        KeySpec("TargetName", KeyRule.DECLARATIVE),
        KeySpec("SessionType", KeyRule.DECLARATIVE),
        KeySpec("TargetAlias", KeyRule.DECLARATIVE),
    )
}
# Obsolete marker interval keys (RFC 3720 appendix A.3.2): irrelevant once markers are off.
_MARKER_INTERVALS = frozenset({"IFMarkInt", "OFMarkInt"})


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What the target supports or prefers for each negotiated key."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 8
    initial_r2t: bool = False
    immediate_data: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    digests: tuple[str, ...] = ("None", "CRC32C")
    max_connections: int = 1
    error_recovery_level: int = 0
    protocol_level: int = 1


@dataclass(slots=True)
class OperationalParameters:
    """The values in force for a session and its connection (defaults of RFC 7143 section 13).

    `max_recv_data_segment_length` is the initiator's (the largest data segment we may send);
    `target_max_recv_data_segment_length` is ours (the largest we accept).
    """

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 8192
    target_max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str = ""
    target_name: str = ""


class Negotiator:
    """Answers offered keys according to `KEYS` and records the outcome in `params`."""

    def __init__(self, limits: TargetLimits, params: OperationalParameters) -> None:
        self.limits = limits
        self.params = params
        self._seen: set[str] = set()

    def respond(
        self, pairs: list[tuple[str, str]], *, in_login: bool = True
    ) -> list[tuple[str, str]]:
        """Return the answers to `pairs` and apply the negotiated values.

        Raises `NegotiationError` when a key is offered twice in one negotiation (section
        6.2); an invalid value is answered with "Reject", an unknown key with
        "NotUnderstood".
        """
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key in self._seen and key in KEYS:
                raise NegotiationError(f"key {key} offered twice")
            self._seen.add(key)
            if value in _ANSWER_VALUES:
                continue  # the initiator's answer to one of our declarations
            answer = self._respond_one(key, value, in_login)
            if answer is not None:
                answers.append((key, answer))
        self._reconcile()
        return answers

    def _respond_one(self, key: str, value: str, in_login: bool) -> str | None:
        spec = KEYS.get(key)
        if spec is None:
            if key in _MARKER_INTERVALS:
                return IRRELEVANT
            logger.debug("key %s not understood", key)
            return NOT_UNDERSTOOD
        if spec.login_only and not in_login:
            return REJECT
        try:
            return self._apply(spec, value)
        except TextError as exc:
            logger.info("rejecting %s=%s: %s", key, value[:40], exc)
            return REJECT

    def _apply(self, spec: KeySpec, value: str) -> str | None:
        params, limits = self.params, self.limits
        name = spec.name
        if spec.rule is KeyRule.DECLARATIVE:
            if name == "MaxRecvDataSegmentLength":
                params.max_recv_data_segment_length = _in_range(spec, parse_number(value))
            elif name == "InitiatorName":
                params.initiator_name = value
            elif name == "InitiatorAlias":
                params.initiator_alias = value
            elif name == "TargetName":
                params.target_name = value
            elif name == "SessionType":
                if value not in ("Normal", "Discovery"):
                    return REJECT
                params.session_type = value
            return None
        if spec.rule is KeyRule.LIST:
            offered = value.split(",")
            if name in ("HeaderDigest", "DataDigest"):
                chosen = _first_supported(offered, limits.digests)
                if chosen is not None:
                    setattr(params, _attribute(name), chosen == "CRC32C")
            elif name == "TaskReporting":
                chosen = _first_supported(offered, ("RFC3720",))
            else:  # pragma: no cover - every LIST key is handled above
                chosen = None
            return chosen if chosen is not None else REJECT
        if spec.rule in (KeyRule.OR, KeyRule.AND):
            offer = parse_boolean(value)
            ours = _our_boolean(name, limits)
            result = (offer or ours) if spec.rule is KeyRule.OR else (offer and ours)
            if name not in ("IFMarker", "OFMarker"):
                setattr(params, _attribute(name), result)
            return "Yes" if result else "No"
        number = _in_range(spec, parse_number(value))
        ours_number = _our_number(name, limits)
        result_number = (
            min(number, ours_number) if spec.rule is KeyRule.MIN else max(number, ours_number)
        )
        if name != "iSCSIProtocolLevel":
            setattr(params, _attribute(name), result_number)
        return str(result_number)

    def _reconcile(self) -> None:
        params = self.params
        # FirstBurstLength must not exceed MaxBurstLength (section 13.14).
        params.first_burst_length = min(params.first_burst_length, params.max_burst_length)

    def declaration(self) -> tuple[str, str]:
        """The target's own MaxRecvDataSegmentLength, which it states unasked (section 13.12)."""
        value = self.limits.max_recv_data_segment_length
        self.params.target_max_recv_data_segment_length = value
        return "MaxRecvDataSegmentLength", str(value)


def _first_supported(offered: list[str], supported: tuple[str, ...]) -> str | None:
    for value in offered:
        if value in supported:
            return value
    return None


def _in_range(spec: KeySpec, number: int) -> int:
    if not spec.low <= number <= spec.high:
        raise TextError(f"{spec.name}={number} outside {spec.low}..{spec.high}")
    return number


def _our_boolean(name: str, limits: TargetLimits) -> bool:
    if name == "InitialR2T":
        return limits.initial_r2t
    if name == "ImmediateData":
        return limits.immediate_data
    # Markers are not supported; DataPDUInOrder and DataSequenceInOrder: we need in-order data.
    return name not in ("IFMarker", "OFMarker")


def _our_number(name: str, limits: TargetLimits) -> int:
    return {
        "MaxConnections": limits.max_connections,
        "MaxBurstLength": limits.max_burst_length,
        "FirstBurstLength": limits.first_burst_length,
        "DefaultTime2Wait": limits.default_time2wait,
        "DefaultTime2Retain": limits.default_time2retain,
        "MaxOutstandingR2T": limits.max_outstanding_r2t,
        "ErrorRecoveryLevel": limits.error_recovery_level,
        "iSCSIProtocolLevel": limits.protocol_level,
    }[name]


_ATTRIBUTES = {
    "HeaderDigest": "header_digest",
    "DataDigest": "data_digest",
    "MaxConnections": "max_connections",
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
    "ErrorRecoveryLevel": "error_recovery_level",
}


def _attribute(name: str) -> str:
    return _ATTRIBUTES[name]
