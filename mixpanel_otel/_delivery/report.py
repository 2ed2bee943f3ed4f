"""The reporter: the one place the consumer counts and tells what became of its work.

Every answer goes through :meth:`Reporter.answered` (requests, retries,
health); every update or message that will not be delivered goes through
:meth:`Reporter.failed` (Mixpanel rejected it, or it cannot be sent) or
:meth:`Reporter.dropped` (no room, the spool could not keep it, the exit
deadline): counted once and handed to ``on_error`` exactly once with the
reason (or logged, rate-limited, without one).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

from .._exceptions import MixpanelException
from .._transport import Answer, Outcome
from .._wire import GroupUpdate, wire_message
from .encode import Failure, shown
from .stats import Health, Stats, Throttle, logger

__all__ = ["Reporter"]

_DROP_WARN_EVERY = 10.0


class Reporter:
    """Counters, delivery health and ``on_error`` for one consumer."""

    def __init__(
        self,
        token: str,
        on_error: Optional[Callable[..., Any]],
        health_warn_after: float,
        clock: Callable[[], float],
        secret: Optional[str] = None,
    ) -> None:
        self._token = token
        self._secret = secret  # a service account's, when one is configured
        self.on_error = on_error
        self.stats = Stats()
        lock = self.stats.lock  # the reporter's one lock
        self.health = Health(health_warn_after, clock=clock, scrub=self.scrub, lock=lock)
        self._drop_warning = Throttle(_DROP_WARN_EVERY, lock=lock)
        self._inside = threading.local()  # on_error running on this thread
        self.losses = 0  # updates and messages failed or dropped, ever (flush compares)

    def scrub(self, text: str) -> str:
        """``text`` without the token or the service-account secret (an upstream may echo them)."""
        text = text.replace(self._token, "<token>")
        if self._secret:
            text = text.replace(self._secret, "<secret>")
        return text

    def answered(self, answer: Answer) -> None:
        self.stats.add("requests")
        if answer.outcome is Outcome.RETRY:
            self.stats.add("retries")
            self.health.failure(answer.reason)
        elif answer.outcome is Outcome.OK:
            self.health.success()

    def error(self, what: str, exc: BaseException) -> None:
        """A bug of ours or a callback that raised: counted in ``errors`` and logged."""
        self.stats.add("errors")
        logger.error("mixpanel-otel: %s raised %s", what, self.scrub(repr(exc)))

    def failed(self, failures: Sequence[Failure]) -> None:
        """Messages Mixpanel rejected, or that cannot be sent (unsendable)."""
        if not failures:
            return
        self.stats.add("failed", len(failures))
        self.losses += len(failures)
        by_reason: dict[str, list[Any]] = {}
        for failure in failures:
            by_reason.setdefault(failure.reason, []).append(failure.message)
        for reason, messages in by_reason.items():
            self._tell(MixpanelException(self.scrub(reason)), messages, throttled=False)

    def dropped(self, lost: Sequence[Union[GroupUpdate, str]], reason: str) -> None:
        """Updates (or SDK messages' texts) that will not be delivered: no room, no spool
        to keep them, no time."""
        if not lost:
            return
        count = sum(1 if isinstance(item, str) else item.stands_for for item in lost)
        self.stats.add("dropped", count)
        self.losses += count
        messages: list[Any] = list(lost)
        if self.on_error:  # only on_error sees the messages themselves
            messages = [m if isinstance(m, str) else wire_message(self._token, m) for m in lost]
        self._tell(MixpanelException(f"dropped: {self.scrub(reason)}"), messages, throttled=True)

    def _tell(self, error: MixpanelException, messages: list[Any], throttled: bool) -> None:
        if self.on_error is None or getattr(self._inside, "yes", False):
            allowed, suppressed = self._drop_warning.allow() if throttled else (True, 0)
            if allowed:
                logger.warning(
                    "mixpanel-otel: %d message(s) not delivered: %s (stats() counts them)%s",
                    len(messages),
                    error,
                    f"; {suppressed} more such report(s) since the last" if suppressed else "",
                )
            return
        self._inside.yes = True  # a drop inside on_error is logged, not reported again
        try:
            self.on_error(error, [shown(message, self._token) for message in messages])
        except Exception as exc:
            self.error("on_error", exc)
        finally:
            self._inside.yes = False
