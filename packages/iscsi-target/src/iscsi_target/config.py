"""The target's configuration as the protocol core sees it: name, portal, access rules, CHAP
credentials and negotiation limits.

Plain data; building it from command-line options is `cli`'s job and the logical units
themselves live behind the `scsi_core.target.Target` the server is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from iscsi_target.chap import ChapCredentials
from iscsi_target.negotiation import TargetLimits

__all__ = ["DEFAULT_IQN", "TargetConfig"]

DEFAULT_IQN = "iqn.2024-01.org.example.vhost-device-scsi:target"


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """Everything the sans-IO core needs to know about the target it speaks for.

    `allowed_initiators` is None to admit every initiator name. `block_sizes` maps LUN to
    logical block size; it lets the transport compare the Expected Data Transfer Length with
    the transfer length of block commands (residual overflow, RFC 7143 section 11.4.5).
    `portal_address` is what SendTargets reports as TargetAddress ("host:port").
    """

    iqn: str = DEFAULT_IQN
    alias: str = ""
    tpgt: int = 1
    portal_address: str = "127.0.0.1:3260"
    allowed_initiators: frozenset[str] | None = None
    chap: ChapCredentials | None = None
    mutual_chap: ChapCredentials | None = None
    limits: TargetLimits = field(default_factory=TargetLimits)
    cmdsn_window: int = 128
    block_sizes: Mapping[int, int] = field(default_factory=dict)

    def initiator_allowed(self, name: str) -> bool:
        """True when the ACL admits initiator `name`."""
        return self.allowed_initiators is None or name in self.allowed_initiators
