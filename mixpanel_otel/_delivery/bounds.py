"""The bounds on what the consumer holds, and what fits under them."""

from __future__ import annotations

from .._wire import GroupUpdate
from .dispatch import Dispatch

__all__ = ["Bounds"]


class Bounds:
    """``max_pending`` and ``max_pending_bytes`` over a dispatch; the ledger's lock is held."""

    def __init__(self, dispatch: Dispatch, max_pending: int, max_pending_bytes: int) -> None:
        self._dispatch = dispatch
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._spill_room = max(64, max_pending // 4)  # overflow waiting for a spill job

    def room(self) -> bool:
        """Whether one more update may be held."""
        dispatch = self._dispatch
        return dispatch.held < self.max_pending and dispatch.held_bytes < self.max_pending_bytes

    def spill_has_room(self) -> bool:
        """Whether overflow may queue for a spill job without waiting."""
        return self._dispatch.overflow < self._spill_room

    def spill_fits(self, updates: list[GroupUpdate], patient: bool) -> int:
        """How many of ``updates`` may queue for a spill job. A ``patient`` caller
        leaves room for a few batches only (then waits); the rest go while under
        ``max_pending_bytes`` waiting, since the writer is only slow."""
        dispatch = self._dispatch
        count = self._spill_room - dispatch.overflow if patient else len(updates)
        room = self.max_pending_bytes - dispatch.overflow_bytes
        taken = 0
        for update in updates[: max(0, count)]:
            room -= update.size
            if room < 0:
                break
            taken += 1
        return taken
