"""Admission: what a caller does when the consumer is full. One decision, no state.

While delivery is succeeding a caller *waits* for room, at most
``max_block`` seconds: a burst is held back by backpressure, never dropped.
When delivery is failing, when the wait expires, when waiting could never
end (the caller is the worker itself, or nothing is running to make room),
or with ``max_block=0``, the update *overflows*: it is spilled to the spool
when there is one, else dropped, counted and warned about with the reason.
"""

from __future__ import annotations

import enum
from typing import Optional

__all__ = ["Admission", "decide"]


class Admission(enum.Enum):
    WAIT = "wait"
    OVERFLOW = "overflow"


def decide(
    *,
    failing: bool,
    max_block: float,
    wait_until: Optional[float],
    now: float,
    can_wait: bool,
) -> tuple[Admission, str]:
    """WAIT or OVERFLOW for an update that finds no room, with the reason for an overflow."""
    if failing:
        return Admission.OVERFLOW, "delivery is failing"
    if max_block <= 0:
        return Admission.OVERFLOW, "max_block is 0"
    if not can_wait:
        return Admission.OVERFLOW, "nothing can make room while this thread waits"
    if wait_until is not None and now >= wait_until:
        return Admission.OVERFLOW, f"no room within max_block ({max_block:g} s)"
    return Admission.WAIT, ""
