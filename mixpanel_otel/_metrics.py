"""The consumers' counters as OpenTelemetry metrics, for a service's own pipeline.

Named like the OpenTelemetry SDK's self-observability metrics
(``otel.sdk.processor.span.processed``, ``otel.sdk.processor.span.queue.size``):
``mixpanel_otel.consumer.<thing>.<what>``, a curly-brace unit, and the
attributes ``otel.component.type`` / ``otel.component.name`` naming which
consumer, plus ``server.address``. Every value is read from
``consumer.stats()`` at collection time, through observable instruments, so
publishing costs nothing between collections and the metrics equal
``stats()``. The instruments are made once per meter provider; each consumer
is added once (a ``WeakSet``), and a consumer that is gone stops reporting.

With no ``MeterProvider`` configured the global one is the API's proxy:
the instruments attach to the real provider once one is set, or stay no-ops.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any, Optional, Protocol
from urllib.parse import urlsplit

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

__all__ = ["METRICS", "publish"]

METER_NAME = "mixpanel-otel"
COMPONENT_TYPE = "mixpanel_otel_consumer"


class _Stats(Protocol):
    base_url: str

    def stats(self) -> dict[str, int]: ...


#: stats() key -> (metric name, unit, monotonic, description)
METRICS: dict[str, tuple[str, str, bool, str]] = {
    "enqueued": (
        "mixpanel_otel.consumer.update.enqueued",
        "{update}",
        True,
        "Group updates handed to the consumer.",
    ),
    "coalesced": (
        "mixpanel_otel.consumer.update.coalesced",
        "{update}",
        True,
        "Group updates merged into a pending update of the same group.",
    ),
    "sent": (
        "mixpanel_otel.consumer.update.sent",
        "{update}",
        True,
        "Group messages Mixpanel acknowledged.",
    ),
    "failed": (
        "mixpanel_otel.consumer.update.failed",
        "{update}",
        True,
        "Group messages not delivered: refused by Mixpanel, or given up on.",
    ),
    "dropped": (
        "mixpanel_otel.consumer.update.dropped",
        "{update}",
        True,
        "Group updates dropped because the consumer was full.",
    ),
    "invalid": (
        "mixpanel_otel.consumer.update.invalid",
        "{update}",
        True,
        "Group updates or records refused before queueing, each with a logged reason.",
    ),
    "ignored": (
        "mixpanel_otel.consumer.record.ignored",
        "{record}",
        True,
        "Records with group tags but no operation (bound context): not an error.",
    ),
    "filtered": (
        "mixpanel_otel.consumer.update.filtered",
        "{update}",
        True,
        "Group messages before_send dropped.",
    ),
    "spooled": (
        "mixpanel_otel.consumer.update.spooled",
        "{update}",
        True,
        "Group updates written to the durable spool.",
    ),
    "replayed": (
        "mixpanel_otel.consumer.update.replayed",
        "{update}",
        True,
        "Group updates read back from the durable spool.",
    ),
    "truncated": (
        "mixpanel_otel.consumer.string.truncated",
        "{string}",
        True,
        "String values cut to Mixpanel's 255-byte limit.",
    ),
    "requests": (
        "mixpanel_otel.consumer.request.sent",
        "{request}",
        True,
        "HTTP requests made to the API host.",
    ),
    "retries": (
        "mixpanel_otel.consumer.request.retried",
        "{request}",
        True,
        "HTTP requests retried after a retryable failure.",
    ),
    "errors": (
        "mixpanel_otel.consumer.request.failed",
        "{request}",
        True,
        "HTTP requests that failed (connection error, timeout, refusal).",
    ),
    "traits_observed": (
        "mixpanel_otel.consumer.trait.observed",
        "{record}",
        True,
        "Records counted for a computed trait (a record matching three traits counts 3).",
    ),
    "traits_late": (
        "mixpanel_otel.consumer.trait.late",
        "{record}",
        True,
        "Records for a computed trait already older than its window: not counted.",
    ),
    "traits_evicted": (
        "mixpanel_otel.consumer.trait.evicted",
        "{group}",
        True,
        "Groups whose computed-trait state was dropped past trait_max_groups.",
    ),
    "traits_emitted": (
        "mixpanel_otel.consumer.trait.emitted",
        "{update}",
        True,
        "Computed-trait updates ($set, $unset) handed to the consumer.",
    ),
    "pending": (
        "mixpanel_otel.consumer.queue.size",
        "{update}",
        False,
        "Group updates pending or in flight.",
    ),
    "pending_bytes": (
        "mixpanel_otel.consumer.queue.bytes",
        "By",
        False,
        "Approximate size of the pending and in-flight group updates.",
    ),
}
_GAUGE_SUFFIXES = ("pending", "_bytes", "in_flight", "size")


def _describe(key: str) -> tuple[str, str, bool, str]:
    """A stats key no table entry names yet: published under its own name."""
    known = METRICS.get(key)
    if known is not None:
        return known
    monotonic = not key.endswith(_GAUGE_SUFFIXES)
    return f"mixpanel_otel.consumer.{key}", "1", monotonic, f"The consumer's stats()[{key!r}]."


class _Publisher:
    """The instruments on one meter, and the consumers they report."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self._consumers: weakref.WeakKeyDictionary[Any, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def add(self, consumer: _Stats) -> None:
        with self._lock:
            if consumer in self._consumers:
                return
            host = urlsplit(consumer.base_url).hostname or consumer.base_url
            self._consumers[consumer] = {
                "otel.component.type": COMPONENT_TYPE,
                "otel.component.name": f"{COMPONENT_TYPE}/{next(self._numbers)}",
                "server.address": host,
            }
            keys = [*METRICS, *consumer.stats()]  # a key may appear once first counted
            new = [key for key in dict.fromkeys(keys) if key not in self._keys]
            self._keys.update(new)
        for key in new:
            self._instrument(key)

    def _instrument(self, key: str) -> None:
        name, unit, monotonic, description = _describe(key)

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                consumers = list(self._consumers.items())
            for consumer, attributes in consumers:
                value = consumer.stats().get(key)
                if value is not None:
                    yield Observation(value, attributes)

        create = (
            self._meter.create_observable_counter
            if monotonic
            else self._meter.create_observable_up_down_counter
        )
        create(name, callbacks=[observe], unit=unit, description=description)


_publishers: dict[Any, _Publisher] = {}  # a provider (or "global") -> its publisher
_publishers_lock = threading.Lock()


def publish(consumer: _Stats, meter_provider: Optional[MeterProvider] = None) -> None:
    """Report ``consumer``'s counters through ``meter_provider`` (default: the global
    one). Idempotent; never raises (metrics are a courtesy, delivery is not)."""
    try:
        key: Any = meter_provider if meter_provider is not None else "global"
        with _publishers_lock:
            publisher = _publishers.get(key)
            if publisher is None:
                from . import __version__

                # The global provider is read once: until one is set it is the API's
                # proxy, whose instruments attach to the real provider later.
                provider = meter_provider or metrics.get_meter_provider()
                meter = provider.get_meter(METER_NAME, __version__)
                publisher = _publishers[key] = _Publisher(meter)
        publisher.add(consumer)
    except Exception:  # pragma: no cover - a broken provider must not stop delivery
        logging.getLogger("mixpanel_otel").debug(
            "mixpanel-otel: metrics not published", exc_info=True
        )
