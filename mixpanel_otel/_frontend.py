"""What every front end shares: its consumer (or none, when disabled), translator
and the reporting of bad records.

Configuration policy, one place for all front ends:

- an argument that is wrong raises :class:`MixpanelException` at construction;
- ``MIXPANEL_OTEL_DISABLED=true`` makes the front end a no-op, silently;
- no token (no argument, no ``MIXPANEL_TOKEN``) makes it a no-op with one warning;
- a wrong environment value (a broken ``MIXPANEL_OTEL_RULES`` file, say) makes it
  a no-op with one error naming the problem: a Mixpanel misconfiguration never
  breaks the host application, nor its other telemetry.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, TypeVar, Union

from ._config import (
    check_arguments,
    disabled_by_environment,
    resolve_options,
    resolve_target,
    warn_unknown_environment,
)
from ._delivery.stats import Throttle
from ._exceptions import ConfigurationError, MissingToken, MixpanelException
from ._records import Adapter, Walker
from ._rules import Rules, RulesSource, load_all
from ._translate import Translator
from ._wire import GroupUpdate, Truncations, endpoint_path

if TYPE_CHECKING:
    from ._delivery import Consumer

__all__ = [
    "ConsumerLike",
    "DisabledConsumer",
    "FrontEnd",
    "disabled_front_ends",
    "get_consumer",
    "open_consumer",
]

logger = logging.getLogger("mixpanel_otel")
R = TypeVar("R")
_WARN_EVERY = 10.0
_reporting = threading.local()


class ConsumerLike(Protocol):
    """The part of the shared consumer a front end uses."""

    base_url: str
    shutdown_timeout: float
    truncations: Truncations

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None: ...
    def count_invalid(self, count: int = 1) -> None: ...
    def count_ignored(self, count: int = 1) -> None: ...
    def flush(self, timeout: Optional[float] = None) -> bool: ...
    def stats(self) -> dict[str, int]: ...


#: What ``stats()`` reports besides the counters: the consumer's state now.
_GAUGES = ("pending", "pending_bytes", "in_flight", "spool_rows", "truncated", "failing")


class DisabledConsumer:
    """Stands in for the consumer of a disabled front end: accepts and discards.

    ``stats()`` has the consumer's keys (:data:`~mixpanel_otel._delivery.stats.COUNTERS`,
    its gauges and :data:`~mixpanel_otel._delivery.stats.TRAIT_COUNTERS`), all 0, plus
    ``discarded`` (updates a :class:`GroupClient` handed it) and ``disabled`` (1);
    ``reason`` says why.
    """

    base_url = "disabled://"
    shutdown_timeout = 0.0

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.truncations = Truncations()
        self._discarded = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<mixpanel_otel DisabledConsumer: {self.reason}>"

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None:
        count = sum(1 for _ in updates)
        with self._lock:
            self._discarded += count

    def deliver_now(self, updates: Iterable[GroupUpdate]) -> None:
        self.enqueue(updates)

    def send(
        self,
        endpoint: str,
        json_message: str,
        api_key: Any = None,
        api_secret: Optional[str] = None,
    ) -> None:
        """The official SDK's consumer protocol: count the message and send nothing."""
        endpoint_path(endpoint)  # an unknown endpoint raises, as on the real consumer
        with self._lock:
            self._discarded += 1

    def count_invalid(self, count: int = 1) -> None:
        pass

    def count_ignored(self, count: int = 1) -> None:
        pass

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        # Imported here: importing the package must not import the delivery package,
        # whose registry sets its exit and at-fork hooks when the first consumer is made.
        from ._delivery.stats import COUNTERS, TRAIT_COUNTERS

        stats = dict.fromkeys((*COUNTERS, *_GAUGES, *TRAIT_COUNTERS), 0)
        stats["discarded"] = self._discarded
        stats["disabled"] = 1
        return stats


_NO_TOKEN = (
    "no Mixpanel project token (pass token= or set MIXPANEL_TOKEN); group updates are discarded"
)
_disabled: Counter[str] = Counter()  # why -> front ends disabled for it, this process
_said: set[str] = set()
_said_lock = threading.Lock()


def disabled_front_ends() -> dict[str, int]:
    """How many front ends this process disabled, by reason (for tests and ``check``)."""
    with _said_lock:
        return dict(_disabled)


def _disable(reason: str, level: int) -> DisabledConsumer:
    """Count a disabled front end and log ``reason`` once per process (level 0: never)."""
    with _said_lock:
        _disabled[reason] += 1
        first = reason not in _said
        _said.add(reason)
    if first and level:
        logger.log(level, "mixpanel-otel is disabled: %s", reason)
    return DisabledConsumer(reason)


def _capturing() -> bool:
    """Whether ``mixpanel_otel.testing.capture_groups`` is active: it wins over disabling."""
    from ._delivery import registry

    return bool(getattr(registry, "_OVERRIDE", None))


def open_consumer(
    token: Optional[str],
    api_host: Optional[str],
    consumer: Optional[ConsumerLike],
    options: dict[str, Any],
    *,
    missing_token_level: int = logging.WARNING,
    need_token: bool = False,
    fallback_on_error: bool = False,
) -> Union[ConsumerLike, DisabledConsumer]:
    """The consumer a front end uses: the one given, else the shared one for
    (token, host), else a :class:`DisabledConsumer` (see the module's policy).

    ``need_token`` raises instead of disabling when the token is missing (a
    caller that wants delivery confirmed, ``GroupClient(sync=True)``).
    ``fallback_on_error`` disables (with one error) on any unexpected error
    too: for objects built with no arguments, from the environment alone
    (``opentelemetry-instrument``'s exporters).
    """
    if consumer is not None:
        if options:
            raise MixpanelException("pass consumer options to get_consumer(), not with consumer=")
        return consumer
    check_arguments(options)
    warn_unknown_environment()
    try:
        if disabled_by_environment() and not _capturing():
            return _disable("MIXPANEL_OTEL_DISABLED is set", 0)
        resolve_options(options)
        if not _capturing():
            resolve_target(token, api_host, options.get("region"))
        return _shared(token, api_host, options)
    except ConfigurationError as exc:
        if not exc.from_environment or (need_token and isinstance(exc, MissingToken)):
            raise
        if isinstance(exc, MissingToken):
            return _disable(_NO_TOKEN, missing_token_level)
        return _disable(f"{exc}; group updates are discarded", logging.ERROR)
    except Exception as exc:
        if not fallback_on_error:
            raise
        reason = str(exc) if isinstance(exc, MixpanelException) else repr(exc)
        return _disable(f"could not start: {reason}; group updates are discarded", logging.ERROR)


def _shared(token: Optional[str], api_host: Optional[str], options: dict[str, Any]) -> Consumer:
    from ._delivery import get_consumer as shared_consumer
    from ._metrics import publish

    shared: Consumer = shared_consumer(token, api_host, **options)
    publish(shared)
    return shared


def get_consumer(
    token: Optional[str] = None, api_host: Optional[str] = None, **options: Any
) -> Union[Consumer, DisabledConsumer]:
    """This process's consumer for (token, API host), created with ``options`` if new.

    ``token`` and ``api_host`` fall back to ``MIXPANEL_TOKEN`` and
    ``MIXPANEL_API_HOST`` (or ``MIXPANEL_REGION``); a missing token or a
    wrong value raises :class:`MixpanelException`. Options apply when the
    consumer is created; a later call that gives another value gets the
    same consumer and one warning naming the option and the value kept.
    The consumer publishes its ``stats()`` as OpenTelemetry metrics. With
    ``MIXPANEL_OTEL_DISABLED=true``, or without a token (one warning, as the
    front ends), it is a :class:`DisabledConsumer`: it takes what the official
    SDK ``send()`` s and sends nothing, and its ``flush()`` returns at once,
    so a shutdown hook's ``get_consumer().flush(5)`` runs everywhere.
    """
    check_arguments(options)
    warn_unknown_environment()
    if disabled_by_environment() and not _capturing():
        return _disable("MIXPANEL_OTEL_DISABLED is set", 0)
    try:
        return _shared(token, api_host, dict(options))
    except MissingToken:
        return _disable(_NO_TOKEN, logging.WARNING)


class FrontEnd:
    """Holds a front end's consumer and translator; counts and reports bad records.

    Records go in through a :meth:`walker`, one per kind of record.

    ``enabled`` is False when the consumer is a :class:`DisabledConsumer`;
    the front end then skips its work. Rules from ``MIXPANEL_OTEL_RULES``
    are read only when enabled; rules passed as an argument are always
    checked (and raise).
    """

    def __init__(
        self,
        token: Optional[str],
        api_host: Optional[str],
        consumer: Optional[ConsumerLike],
        rules: RulesSource,
        options: dict[str, Any],
        *,
        missing_token_level: int = logging.WARNING,
        fallback_on_error: bool = False,
    ) -> None:
        explicit_rules = load_all(rules) if rules is not None else None
        self.consumer = open_consumer(
            token,
            api_host,
            consumer,
            options,
            missing_token_level=missing_token_level,
            fallback_on_error=fallback_on_error,
        )
        self.enabled = not isinstance(self.consumer, DisabledConsumer)
        if explicit_rules is not None:
            found = explicit_rules
        elif self.enabled:
            try:
                found = load_all(None)
            except ConfigurationError as exc:
                if not exc.from_environment:
                    raise
                self.consumer = _disable(f"{exc}; group updates are discarded", logging.ERROR)
                self.enabled = False
                found = Rules([], [])
        else:
            found = Rules([], [])
        traits = None
        if found.traits and self.enabled:
            from ._traits import feed_for

            traits = feed_for(self.consumer, found.traits)
        self.translator = Translator(found.rules, self.consumer.truncations, traits)
        self._walkers: dict[Adapter[Any], Walker[Any]] = {}
        self._warnings = Throttle(_WARN_EVERY)

    def walker(self, adapter: Adapter[R]) -> Walker[R]:
        """The one path for this front end's records of ``adapter``'s kind (built once)."""
        walker = self._walkers.get(adapter)
        if walker is None:
            walker = self._walkers[adapter] = Walker(self, adapter)
        return walker

    @property
    def disabled(self) -> Optional[str]:
        """Why this front end is a no-op, or None when it delivers."""
        consumer = self.consumer
        return consumer.reason if isinstance(consumer, DisabledConsumer) else None

    def report_ignored(self, count: int) -> None:
        """Count records with group tags but no operation: not an error, no warning."""
        self.consumer.count_ignored(count)

    def report_invalid(self, what: str, reasons: list[str]) -> None:
        """Count what a record lost (one per reason) and warn, at most once per 10 s,
        naming the record and why.

        The warning goes to the ``mixpanel_otel`` logger, whose records every
        front end ignores, and never re-enters from inside a report.
        """
        self.consumer.count_invalid(len(reasons) or 1)
        if getattr(_reporting, "active", False):
            return
        allowed, skipped = self._warnings.allow()
        if not allowed:
            return
        _reporting.active = True
        try:
            logger.warning(
                "mixpanel-otel: dropped invalid group data in %s: %s%s",
                what,
                "; ".join(map(str, reasons)),
                f" ({skipped} more invalid record(s) since the last warning)" if skipped else "",
            )
        except Exception:
            pass
        finally:
            _reporting.active = False
