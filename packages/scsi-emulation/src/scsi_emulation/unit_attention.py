"""Unit attention conditions, queued per I_T nexus (SAM-5 5.14, SPC-5 5.x).

Holds `UnitAttentions`: for each I_T nexus a logical unit has seen, the conditions not yet
reported, and the condition a nexus seen for the first time starts with (power on / reset).
Knows nothing about commands: the logical unit decides which commands report a condition.
"""

from __future__ import annotations

from collections.abc import Hashable

from scsi_core.sense import Asc

__all__ = ["UnitAttentions"]

_MAX_QUEUED = 16


def _is_reset(code: Asc) -> bool:
    return code.asc == 0x29


class UnitAttentions:
    """Pending unit attention conditions per I_T nexus.

    ``initial`` is what a nexus the LU has not seen before finds pending (SAM-5 6.3.1: a power
    on or hard reset establishes POWER ON, RESET, OR BUS DEVICE RESET OCCURRED for every
    nexus). A reset condition replaces whatever else was pending, because SAM-5 lets a reset
    clear other unit attentions; other conditions queue in arrival order, without duplicates.
    """

    def __init__(self, initial: Asc | None = Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED):
        self._initial = initial
        self._queues: dict[Hashable, list[Asc]] = {}

    def known(self, nexus: Hashable) -> bool:
        """Whether this nexus has been seen (its queue exists)."""
        return nexus in self._queues

    def _queue(self, nexus: Hashable) -> list[Asc]:
        q = self._queues.get(nexus)
        if q is None:
            q = [self._initial] if self._initial is not None else []
            self._queues[nexus] = q
        return q

    def peek(self, nexus: Hashable) -> Asc | None:
        """The condition that would be reported next, registering a new nexus."""
        q = self._queue(nexus)
        return q[0] if q else None

    def pop(self, nexus: Hashable) -> Asc | None:
        """Report (remove and return) the next condition."""
        q = self._queue(nexus)
        return q.pop(0) if q else None

    def establish(
        self, code: Asc, nexus: Hashable | None = None, *, exclude: Hashable | None = None
    ) -> None:
        """Establish ``code`` for ``nexus``, or for every known nexus except ``exclude``."""
        targets = [nexus] if nexus is not None else [n for n in self._queues if n != exclude]
        for n in targets:
            q = self._queue(n)
            if _is_reset(code):
                q[:] = [code]
            elif code not in q and len(q) < _MAX_QUEUED:
                q.append(code)

    def clear(self, nexus: Hashable, code: Asc) -> None:
        """Remove ``code`` from a nexus's queue (e.g. REPORT LUNS clears 3F/0E)."""
        q = self._queues.get(nexus)
        if q and code in q:
            q.remove(code)

    def forget(self, nexus: Hashable) -> None:
        """Drop all state for a nexus that no longer exists."""
        self._queues.pop(nexus, None)
