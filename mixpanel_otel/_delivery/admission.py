"""Admission: what a caller does when the consumer is full. One decision, no state.

While delivery is succeeding a caller *waits* for room, at most
``max_block`` seconds: a burst is held back by backpressure, never dropped.
When delivery is failing, when the wait expires, when waiting could never
end (the caller is the worker itself, or nothing is running to make room),
or with ``max_block=0``, the update *overflows*: it is spilled to the spool
when there is one, else dropped, counted and warned about with the reason.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["overflow_reason"]


def overflow_reason(
    *, failing: bool, max_block: float, wait_until: Optional[float], now: float, can_wait: bool
) -> str:
    """Why an update that finds no room overflows now; empty when it waits."""
    if failing:
        return "delivery is failing"
    if max_block <= 0:
        return "max_block is 0"
    if not can_wait:
        return "nothing can make room while this thread waits"
    if wait_until is not None and now >= wait_until:
        return f"no room within max_block ({max_block:g} s)"
    return ""
