"""Counters, rate-limited warnings and delivery health: how the consumer reports.

Every count goes through :meth:`Stats.add`; every warning that could repeat
goes through :class:`Throttle`; whether delivery is failing right now, and
for how long, is :class:`Health`'s job.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import Any, Callable, ContextManager, Optional

__all__ = ["COUNTERS", "TRAIT_COUNTERS", "Health", "Stats", "Throttle", "logger"]

logger = logging.getLogger("mixpanel_otel")
_HEALTH_REPEAT = 60.0  # seconds between two warnings that delivery is still failing

#: The counters of ``stats()``, each a number of messages unless it says otherwise.
COUNTERS = (
    "enqueued",  # updates accepted (a merged update counts once here and once in coalesced)
    "coalesced",  # updates merged into an earlier pending one (never sent on their own)
    "sent",  # messages Mixpanel acknowledged
    "failed",  # messages Mixpanel rejected, or unsendable; reported to on_error
    "dropped",  # updates given up: no room, the spool could not keep them, the exit deadline
    "invalid",  # records a front end could not use (bad data), counted by the front end
    "ignored",  # records with group tags but no operation (not an error)
    "filtered",  # messages before_send returned None for
    "retries",  # requests retried after a retryable failure
    "requests",  # HTTP requests made
    "errors",  # callbacks (on_error, before_send) that raised, and internal errors
    "spooled",  # messages written to the spool
    "replayed",  # spooled messages read back to be sent
    "blocked",  # callers that waited for room (admission)
)

#: The computed traits' counters in ``stats()``, kept by the consumer's traits engine
#: (:mod:`mixpanel_otel._traits`); 0 while no front end on the consumer computes traits.
TRAIT_COUNTERS = (
    "traits_observed",  # records counted for a trait (a record matching three traits: 3)
    "traits_late",  # records for a trait already older than its window: not counted
    "traits_evicted",  # groups whose trait state was dropped past trait_max_groups
    "traits_emitted",  # trait updates ($set, $unset) handed to the consumer's queue
)


class Stats:
    """Named counters, safe from any thread. Their ``lock`` is the reporter's one lock:
    the consumer's health and its throttled warnings share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)

    def add(self, name: str, count: int = 1) -> None:
        with self.lock:
            self._counts[name] += count

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self._counts)


class Throttle:
    """At most one warning of each kind every ``every`` seconds; counts the rest.
    The one rate limit of every repeating warning (delivery, spool, front ends, gateway).
    ``lock`` guards it: its own unless given."""

    def __init__(self, every: float, lock: Optional[ContextManager[Any]] = None) -> None:
        self.every = every
        self._lock = lock if lock is not None else threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def allow(self, kind: str = "", now: Optional[float] = None) -> tuple[bool, int]:
        """``(warn now?, warnings of this kind held back since the last one)``."""
        now = monotonic() if now is None else now
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return False, 0
            self._last[kind] = now
            return True, self._skipped.pop(kind, 0)


class Health:
    """Whether delivery is failing now, and the warnings that say so.

    Failing starts with the first retryable failure and ends with the next
    success. Once it has lasted ``warn_after`` seconds a warning names the
    reason (DNS, connection refused, HTTP status and body), repeated at most
    once a minute; recovery gets one line.
    """

    def __init__(
        self,
        warn_after: float,
        clock: Callable[[], float] = monotonic,
        scrub: Callable[[str], str] = str,
        lock: Optional[ContextManager[Any]] = None,
    ) -> None:
        self.warn_after = warn_after
        self._clock = clock
        self._scrub = scrub
        self._lock = lock if lock is not None else threading.Lock()
        self.failing_since: Optional[float] = None
        self.reason = ""
        self._warned_at: Optional[float] = None

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def failure(self, reason: str) -> None:
        now = self._clock()
        with self._lock:
            self.reason = reason
            if self.failing_since is None:
                self.failing_since = now
            lasted = now - self.failing_since
            due = lasted >= self.warn_after and (
                self._warned_at is None or now - self._warned_at >= _HEALTH_REPEAT
            )
            if due:
                self._warned_at = now
        if due:
            logger.warning(
                "mixpanel-otel: delivery has been failing for %.0f s: %s "
                "(updates are kept and retried; stats() counts them)",
                lasted,
                self._scrub(reason),
            )

    def success(self) -> None:
        if self.failing_since is None:
            return
        now = self._clock()
        with self._lock:
            since, warned = self.failing_since, self._warned_at
            self.failing_since = self._warned_at = None
        if since is not None and warned is not None:
            logger.warning("mixpanel-otel: delivery recovered after %.0f s", now - since)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            since = self.failing_since
            return {
                "failing": since is not None,
                "failing_for": 0.0 if since is None else self._clock() - since,
                "reason": self._scrub(self.reason) if since is not None else "",
            }
