"""CHAP authentication in the login security stage, the target's side (RFC 7143 section 12.1.3,
RFC 1994).

Holds the credentials type and the authenticator that answers CHAP_A, checks CHAP_N/CHAP_R
against a challenge it issued and, for mutual CHAP, answers the initiator's own challenge. It
knows the CHAP_* keys only; the login stages and other keys are `login`'s.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from iscsi_target.text import TextError, encode_binary, parse_binary, parse_number

__all__ = ["CHAP_MD5", "AuthenticationError", "ChapAuthenticator", "ChapCredentials"]

logger = logging.getLogger(__name__)

CHAP_MD5 = 5  # the algorithm number iSCSI requires support for (section 12.1.3)
CHALLENGE_LENGTH = 16


class AuthenticationError(Exception):
    """The initiator failed (or refused) authentication."""


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and its shared secret."""

    user: str
    secret: bytes

    def __post_init__(self) -> None:
        # RFC 7143 section 12.1.3 requires secrets of at least 96 bits for CHAP over iSCSI
        # unless IPsec protects them; we do not enforce that (tools use short test secrets).
        if not self.user or not self.secret:
            raise ValueError("CHAP user and secret must not be empty")


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """MD5(identifier || secret || challenge) (RFC 1994 section 4.1)."""
    return hashlib.md5(bytes((identifier,)) + secret + challenge, usedforsecurity=True).digest()


class _State(enum.Enum):
    AWAIT_ALGORITHM = "await_algorithm"
    AWAIT_RESPONSE = "await_response"
    DONE = "done"


class ChapAuthenticator:
    """One CHAP exchange: offer a challenge, verify the answer, answer a mutual challenge."""

    def __init__(self, credentials: ChapCredentials, mutual: ChapCredentials | None) -> None:
        self.credentials = credentials
        self.mutual = mutual
        self._state = _State.AWAIT_ALGORITHM
        self._identifier = 0
        self._challenge = b""

    @property
    def done(self) -> bool:
        """True once the initiator has proven its identity."""
        return self._state is _State.DONE

    def respond(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Consume the CHAP_* keys of one login request and return the target's CHAP keys.

        Raises `AuthenticationError` on any failure; the caller answers with status 0x0201.
        """
        try:
            if self._state is _State.AWAIT_ALGORITHM:
                return self._offer_challenge(keys)
            if self._state is _State.AWAIT_RESPONSE:
                return self._check_response(keys)
        except TextError as exc:
            raise AuthenticationError(f"malformed CHAP value: {exc}") from exc
        if any(key.startswith("CHAP_") for key in keys):
            raise AuthenticationError("CHAP keys after authentication completed")
        return []

    def _offer_challenge(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        algorithms = keys.get("CHAP_A")
        if algorithms is None:
            return []  # AuthMethod was just agreed; the initiator sends CHAP_A next
        if str(CHAP_MD5) not in algorithms.split(","):
            raise AuthenticationError(f"no supported CHAP algorithm in {algorithms!r}")
        self._identifier = secrets.randbelow(256)
        self._challenge = secrets.token_bytes(CHALLENGE_LENGTH)
        self._state = _State.AWAIT_RESPONSE
        return [
            ("CHAP_A", str(CHAP_MD5)),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", encode_binary(self._challenge)),
        ]

    def _check_response(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise AuthenticationError("CHAP_N or CHAP_R missing")
        expected = chap_response(self._identifier, self.credentials.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), self.credentials.user.encode())
        if not (hmac.compare_digest(parse_binary(response), expected) and name_ok):
            raise AuthenticationError(f"CHAP response of {name!r} does not match")
        answers: list[tuple[str, str]] = []
        if "CHAP_I" in keys or "CHAP_C" in keys:
            if self.mutual is None:
                raise AuthenticationError("mutual CHAP requested but not configured")
            identifier = parse_number(keys.get("CHAP_I", ""))
            challenge = parse_binary(keys.get("CHAP_C", ""))
            if not 0 <= identifier <= 255 or not challenge:
                raise AuthenticationError("invalid mutual CHAP identifier or challenge")
            # A challenge equal to ours would let an attacker reflect our own answer back
            # (RFC 7143 section 12.1.3).
            if challenge == self._challenge:
                raise AuthenticationError("initiator reflected the target's CHAP challenge")
            answers = [
                ("CHAP_N", self.mutual.user),
                ("CHAP_R", encode_binary(chap_response(identifier, self.mutual.secret, challenge))),
            ]
        self._state = _State.DONE
        logger.debug("CHAP authentication of %r succeeded", name)
        return answers
