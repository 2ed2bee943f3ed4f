"""A stand-in for ``Consumer.submit`` until the consumer hands out receipts itself.

Emulated over ``enqueue`` + ``flush``: a submission settles when the whole
consumer has nothing left, so it is conservative (it may wait for other
requests' updates too) and it cannot tell which updates Mixpanel refused.
Remove this module once ``Consumer.submit`` exists on ``main``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

__all__ = ["ReceiptLike", "submit", "failing"]


class ReceiptLike(Protocol):
    """What the gateway reads from a receipt (the consumer's ``Receipt`` has all of it)."""

    refused: bool
    retry_after: Optional[float]
    delivered: int
    spooled: int
    failed: int
    dropped: int
    errors: list[str]

    def wait(self, timeout: Optional[float] = None) -> bool: ...


class _Emulated:
    def __init__(self, consumer: Any, total: int, refused: bool, reason: str) -> None:
        self._consumer = consumer
        self._total = total
        self.refused = refused
        self.retry_after: Optional[float] = 1.0 if refused else None
        self.delivered = self.spooled = self.failed = self.dropped = 0
        self.errors: list[str] = [reason] if reason else []
        self._settled = refused or not total

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._settled:
            return True
        if self._consumer.flush(timeout):
            self._settled = True
            self.delivered = self._total
            return True
        self.retry_after = 1.0
        return False


def submit(consumer: Any, updates: list[Any]) -> ReceiptLike:
    """``consumer.submit(updates)`` when the consumer has it, else the emulation."""
    if hasattr(consumer, "submit"):
        receipt: ReceiptLike = consumer.submit(updates)
        return receipt
    pending = consumer.stats()["pending"]
    if pending + len(updates) > consumer.max_pending:
        return _Emulated(consumer, len(updates), True, f"over max_pending ({consumer.max_pending})")
    consumer.enqueue(updates)
    return _Emulated(consumer, len(updates), False, "")


def failing(consumer: Any) -> bool:
    """``consumer.failing`` when the consumer has it (the emulation cannot tell)."""
    return bool(getattr(consumer, "failing", False))
