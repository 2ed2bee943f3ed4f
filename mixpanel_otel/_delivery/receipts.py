"""Receipts: what became of one submission's updates.

:meth:`Consumer.submit` hands one back; it settles when every update is
delivered, spooled, failed or dropped. An update merged into another settles
with the one it was merged into. The gateway acknowledges an OTLP request
with it; fire-and-forget :meth:`Consumer.enqueue` makes none.
"""

from __future__ import annotations

import enum
import threading
from typing import Optional

__all__ = ["Fate", "Receipt"]


class Fate(enum.Enum):
    """How an update left the consumer."""

    DELIVERED = "delivered"
    SPOOLED = "spooled"
    FAILED = "failed"  # rejected by Mixpanel or unsendable; reported to on_error
    DROPPED = "dropped"  # no room and no spool, or lost at exit


class Receipt:
    """Counts of one submission's updates by fate; :meth:`wait` for all of them."""

    def __init__(self, total: int, refused: bool = False, reason: str = "") -> None:
        self.total = total
        self.refused = refused
        self.retry_after: Optional[float] = None
        self.delivered = self.spooled = self.failed = self.dropped = 0
        self.errors: list[str] = [reason] if reason else []
        self._event = threading.Event()
        if refused or total == 0:
            self._event.set()

    def __repr__(self) -> str:
        return (
            f"<Receipt {self.total} update(s): delivered={self.delivered} spooled={self.spooled}"
            f" failed={self.failed} dropped={self.dropped}{' refused' if self.refused else ''}>"
        )

    @property
    def settled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until every update is settled (or ``timeout`` s); True when settled."""
        return self._event.wait(timeout)

    def settle(self, fate: Fate, reason: str = "") -> None:
        """Record one update's fate (called by the consumer, under its lock)."""
        setattr(self, fate.value, getattr(self, fate.value) + 1)  # the count named as the fate
        if reason and len(self.errors) < 20 and reason not in self.errors:
            self.errors.append(reason)
        if self.delivered + self.spooled + self.failed + self.dropped >= self.total:
            self._event.set()
