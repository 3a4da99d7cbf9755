"""The login phase of one connection, the target's side (RFC 7143 sections 6.3 and 11.12-13).

A state machine that takes Login Requests and returns Login Responses: it gathers text split
over several PDUs (C bit), checks the initiator and target names against the configuration,
runs the security stage (AuthMethod and CHAP) when credentials are configured, negotiates the
operational keys and agrees to stage transitions. It does not allocate sessions or TSIHs: on
success the owner (`connection`) fills in the TSIH of the final response.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from iscsi_target.chap import AuthenticationError, ChapAuthenticator
from iscsi_target.config import TargetConfig
from iscsi_target.constants import LoginStage, LoginStatus
from iscsi_target.negotiation import (
    NegotiationError,
    Negotiator,
    OperationalParameters,
)
from iscsi_target.pdu import LoginRequest, LoginResponse
from iscsi_target.text import TextError, decode_text, encode_text

__all__ = ["LoginMachine", "LoginStep"]

logger = logging.getLogger(__name__)

SUPPORTED_VERSION = 0
MAX_LOGIN_TEXT = 65536  # a bound on text gathered over C-bit continuations
_SECURITY_KEYS = ("AuthMethod", "CHAP_")


class _Phase(enum.Enum):
    ACTIVE = "active"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(slots=True)
class LoginStep:
    """The answer to one Login Request.

    `complete` means the final response was built (the connection enters full feature phase
    once it is sent); `failed` means the connection must close after sending `response`.
    """

    response: LoginResponse
    complete: bool = False
    failed: bool = False


class LoginMachine:
    """Drives one connection's login phase; `params` receives the negotiated values."""

    def __init__(self, config: TargetConfig, params: OperationalParameters, statsn: int) -> None:
        self.config = config
        self.params = params
        self.negotiator = Negotiator(config.limits, params)
        self.statsn = statsn
        self.exp_cmdsn = 0
        self._phase = _Phase.ACTIVE
        self._first: LoginRequest | None = None
        self._pending_text = bytearray()
        self._authenticated = config.chap is None
        self._auth_method_agreed = False
        self._chap = (
            ChapAuthenticator(config.chap, config.mutual_chap) if config.chap is not None else None
        )
        self._declared_tpgt = False
        self._declared_mrdsl = False

    @property
    def leading_request(self) -> LoginRequest | None:
        """The first Login Request of the connection (ISID, TSIH, CID)."""
        return self._first

    def receive(self, request: LoginRequest) -> LoginStep:
        """Process one Login Request and return the response to send."""
        if self._phase is not _Phase.ACTIVE:
            return self._fail(request, LoginStatus.INVALID_DURING_LOGIN, "login already ended")
        if self._first is None:
            self._first = request
            self.exp_cmdsn = request.cmdsn
            if request.version_min > SUPPORTED_VERSION:
                return self._fail(
                    request, LoginStatus.UNSUPPORTED_VERSION, f"version {request.version_min}"
                )
        elif request.isid != self._first.isid or request.tsih != self._first.tsih:
            return self._fail(request, LoginStatus.INITIATOR_ERROR, "ISID or TSIH changed")
        if request.csg not in (LoginStage.SECURITY, LoginStage.OPERATIONAL):
            return self._fail(request, LoginStatus.INITIATOR_ERROR, f"CSG {request.csg}")
        self._pending_text += request.data
        if len(self._pending_text) > MAX_LOGIN_TEXT:
            return self._fail(request, LoginStatus.OUT_OF_RESOURCES, "login text too long")
        if request.cont:
            # More text follows: acknowledge with an empty response (section 6.3).
            return LoginStep(self._response(request, transit=False, nsg=request.csg))
        text = bytes(self._pending_text)
        self._pending_text.clear()
        try:
            pairs = decode_text(text)
        except TextError as exc:
            return self._fail(request, LoginStatus.INITIATOR_ERROR, str(exc))
        try:
            return self._negotiate(request, pairs)
        except NegotiationError as exc:
            return self._fail(request, LoginStatus.INITIATOR_ERROR, str(exc))
        except AuthenticationError as exc:
            return self._fail(request, LoginStatus.AUTHENTICATION_FAILURE, str(exc))

    def _negotiate(self, request: LoginRequest, pairs: list[tuple[str, str]]) -> LoginStep:
        keys = dict(pairs)
        answers: list[tuple[str, str]] = []
        first_text = not self.params.initiator_name
        security = [(k, v) for k, v in pairs if k.startswith(_SECURITY_KEYS)]
        operational = [(k, v) for k, v in pairs if not k.startswith(_SECURITY_KEYS)]
        answers += self.negotiator.respond(operational)
        if first_text:
            status = self._check_names()
            if status is not None:
                return self._fail(request, status[0], status[1])
        if request.csg == LoginStage.SECURITY:
            answers += self._security(keys, security)
        elif security:
            return self._fail(request, LoginStatus.INITIATOR_ERROR, "security keys in operational")
        elif not self._authenticated:
            return self._fail(
                request, LoginStatus.AUTHENTICATION_FAILURE, "CHAP required, security skipped"
            )
        if self.params.session_type == "Normal" and not self._declared_tpgt:
            answers.append(("TargetPortalGroupTag", str(self.config.tpgt)))
            self._declared_tpgt = True
        transit, nsg = False, request.csg
        if request.transit:
            if request.nsg <= request.csg or request.nsg == 2:
                return self._fail(request, LoginStatus.INITIATOR_ERROR, f"NSG {request.nsg}")
            if self._authenticated:
                transit, nsg = True, request.nsg
        entering_operational = request.csg == LoginStage.OPERATIONAL or (
            transit and nsg == LoginStage.FULL_FEATURE
        )
        if entering_operational and not self._declared_mrdsl:
            answers.append(self.negotiator.declaration())
            self._declared_mrdsl = True
        response = self._response(request, transit=transit, nsg=nsg)
        response.data = encode_text(answers)
        if transit and nsg == LoginStage.FULL_FEATURE:
            self._phase = _Phase.COMPLETE
            self.params.target_max_recv_data_segment_length = (
                self.config.limits.max_recv_data_segment_length
            )
            return LoginStep(response, complete=True)
        return LoginStep(response)

    def _check_names(self) -> tuple[LoginStatus, str] | None:
        params = self.params
        if not params.initiator_name:
            return LoginStatus.MISSING_PARAMETER, "no InitiatorName"
        if not self.config.initiator_allowed(params.initiator_name):
            return LoginStatus.AUTHORIZATION_FAILURE, f"initiator {params.initiator_name!r}"
        if params.session_type == "Normal":
            if not params.target_name:
                return LoginStatus.MISSING_PARAMETER, "no TargetName"
            if params.target_name != self.config.iqn:
                return LoginStatus.NOT_FOUND, f"target {params.target_name!r}"
        return None

    def _security(
        self, keys: dict[str, str], security: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        method = keys.get("AuthMethod")
        if method is not None:
            wanted = "CHAP" if self._chap is not None else "None"
            if wanted not in method.split(","):
                raise AuthenticationError(f"AuthMethod {method!r} does not include {wanted}")
            answers.append(("AuthMethod", wanted))
            self._auth_method_agreed = True
            if self._chap is None:
                self._authenticated = True
        if self._chap is not None:
            chap_keys = {k: v for k, v in security if k.startswith("CHAP_")}
            if chap_keys and not self._auth_method_agreed:
                raise AuthenticationError("CHAP keys before AuthMethod")
            answers += self._chap.respond(chap_keys)
            self._authenticated = self._chap.done
        elif not self._auth_method_agreed:
            # No AuthMethod offered and none required: the security stage may be passed.
            self._authenticated = True
        return answers

    def _response(self, request: LoginRequest, *, transit: bool, nsg: int) -> LoginResponse:
        response = LoginResponse(
            itt=request.itt,
            isid=request.isid,
            csg=request.csg,
            nsg=nsg if transit else 0,
            transit=transit,
            tsih=request.tsih,
            statsn=self.statsn,
            exp_cmdsn=self.exp_cmdsn,
            max_cmdsn=(self.exp_cmdsn + self.config.cmdsn_window - 1) & 0xFFFFFFFF,
            version_max=SUPPORTED_VERSION,
            version_active=SUPPORTED_VERSION,
        )
        # Every Login Response carries the next StatSN (section 11.13.4).
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return response

    def _fail(self, request: LoginRequest, status: LoginStatus, reason: str) -> LoginStep:
        logger.info("login of %r refused (%s): %s", self.params.initiator_name, status.name, reason)
        self._phase = _Phase.FAILED
        response = self._response(request, transit=False, nsg=request.csg)
        response.status = status
        return LoginStep(response, failed=True)
