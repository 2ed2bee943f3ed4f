"""OpenTelemetry exporters: group updates from spans and log records.

Both follow the SDK's exporter interfaces exactly: ``export`` translates and
queues (never raises, never blocks on the network), ``force_flush`` flushes
the shared consumer, ``shutdown`` is idempotent and later exports fail.
They load with no arguments, from the environment, as the entry points
``opentelemetry_traces_exporter`` / ``opentelemetry_logs_exporter`` ``mixpanel``.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

try:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
except ImportError:  # pragma: no cover - SDK releases before the rename
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef,assignment,unused-ignore]
        LogExporter as LogRecordExporter,
    )
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef,assignment,unused-ignore]
        LogExportResult as LogRecordExportResult,
    )
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ._delivery import process
from ._delivery.stats import logger
from ._frontend import ConsumerLike, FrontEnd
from ._records import EMPTY, Adapter, Event
from ._rules import RulesSource
from ._translate import EVENT_NAME
from ._wire import iso_utc

__all__ = [
    "flush_at_exit",
    "SDK_LOG_RECORDS",
    "SDK_SPANS",
    "MixpanelLogExporter",
    "MixpanelSpanExporter",
    "SdkLogRecords",
    "SdkSpans",
]


def _seconds(nanos: Optional[int]) -> Optional[float]:
    return None if nanos is None else nanos / 1e9


class _Exporter:
    """What both exporters share: a front end, flush and shutdown.

    Built with no arguments (as ``opentelemetry-instrument`` builds it), an
    exporter never fails: a missing token, a broken ``MIXPANEL_OTEL_RULES``
    file, a wrong variable or any error starting the consumer logs one error
    naming the problem and leaves a disabled exporter (``disabled`` says
    why; its exports succeed and send nothing), so the service's other
    exporters and instrumentation carry on. Arguments that are wrong raise.
    """

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        consumer: Optional[ConsumerLike] = None,
        rules: RulesSource = None,
        **options: Any,
    ) -> None:
        explicit = (
            token is not None
            or api_host is not None
            or consumer is not None
            or rules is not None
            or bool(options)
        )
        self._front = FrontEnd(
            token,
            api_host,
            consumer,
            rules,
            options,
            missing_token_level=logging.ERROR,
            fallback_on_error=not explicit,
        )
        self.consumer = self._front.consumer
        self._off = not self._front.enabled
        self._stopped = False
        if not self._off:  # its provider is flushed before our consumer at SIGTERM and exit
            process.add_exit_step("providers", flush_providers)

    @property
    def disabled(self) -> Optional[str]:
        """Why this exporter sends nothing, or None when it delivers."""
        return self._front.disabled

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Deliver what is pending; True when nothing is left within the timeout."""
        return bool(self.consumer.flush(timeout_millis / 1000))

    def shutdown(self) -> None:
        """Flush within the consumer's shutdown timeout; later exports fail. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.consumer.flush(self.consumer.shutdown_timeout)


# -- the host's providers, flushed before the consumers at exit ---------------------

_HANDED_OVER: weakref.WeakSet[Any] = weakref.WeakSet()


def flush_at_exit(provider: Any) -> None:
    """Flush ``provider`` (a ``TracerProvider`` or ``LoggerProvider`` that is not the
    global one) at exit and SIGTERM, before the consumers, within the exit budget.
    The global providers are flushed without this call."""
    _HANDED_OVER.add(provider)
    process.add_exit_step("providers", flush_providers)


def flush_providers(deadline: float) -> None:
    """The providers' exit step: ``force_flush`` on the global tracer and logger
    providers and those handed over, each with what is left of the budget.

    Their batch processors hold spans and log records for seconds before our
    exporters see them; their ``export`` only queues into our consumer.
    """
    for provider in _providers():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            provider.force_flush(max(1, int(left * 1000)))
        except Exception as exc:  # a host provider's bug must not cost our flush
            logger.error("mixpanel-otel: flushing %r failed: %r", provider, exc)


def _providers() -> list[Any]:
    found: list[Any] = []
    trace_api = sys.modules.get("opentelemetry.trace")
    logs_api = sys.modules.get("opentelemetry._logs")
    candidates = [
        trace_api.get_tracer_provider() if trace_api is not None else None,
        logs_api.get_logger_provider() if logs_api is not None else None,
        *list(_HANDED_OVER),
    ]
    for provider in candidates:  # the API's no-op and proxy providers cannot flush
        if callable(getattr(provider, "force_flush", None)) and all(
            provider is not seen for seen in found
        ):
            found.append(provider)
    return found


class MixpanelSpanExporter(_Exporter, SpanExporter):
    """Group updates from span attributes, ``mixpanel.group`` span events and rules."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped:
            return SpanExportResult.FAILURE
        if self._off:
            return SpanExportResult.SUCCESS
        try:
            self._front.walker(SDK_SPANS).ingest(spans)
        except Exception as exc:  # the SDK's processors expect no exceptions
            self._front.report_invalid(f"a batch of {len(spans)} span(s)", [repr(exc)])
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class MixpanelLogExporter(_Exporter, LogRecordExporter):
    """Group updates from log records: the stdlib record conventions, the flat form and rules."""

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        if self._stopped:
            return LogRecordExportResult.FAILURE
        if self._off:
            return LogRecordExportResult.SUCCESS
        try:
            self._front.walker(SDK_LOG_RECORDS).ingest(batch)
        except Exception as exc:
            self._front.report_invalid(f"a batch of {len(batch)} log record(s)", [repr(exc)])
            return LogRecordExportResult.FAILURE
        return LogRecordExportResult.SUCCESS


class SdkSpans(Adapter[ReadableSpan]):
    """Reads an SDK span; its time is its end (its start while it runs)."""

    has_events = True

    def attributes(self, record: ReadableSpan) -> Mapping[str, Any]:
        return record.attributes or EMPTY

    def time(self, record: ReadableSpan) -> float:
        return _seconds(record.end_time or record.start_time) or time.time()

    def resource(self, record: ReadableSpan) -> Mapping[str, Any]:
        return record.resource.attributes if record.resource is not None else EMPTY

    def special(self, record: ReadableSpan, name: str, time: float) -> Any:
        if name == "@name":
            return record.name
        if name == "@start_time":
            return iso_utc(_seconds(record.start_time))
        if name == "@end_time":
            return iso_utc(_seconds(record.end_time))
        if name == "@status":
            return record.status.status_code.name
        if name == "@duration_ms":
            if record.start_time is None or record.end_time is None:
                return None
            return (record.end_time - record.start_time) / 1e6
        return None

    def events(self, record: ReadableSpan, time: float) -> Iterator[Event]:
        for event in record.events:
            if event.name == EVENT_NAME:
                yield event.attributes or EMPTY, _seconds(event.timestamp) or time

    def describe(self, record: ReadableSpan) -> str:
        context = record.get_span_context()
        trace = f"{context.trace_id:032x}" if context is not None else "?"
        return f"span {record.name!r} (trace {trace})"


class SdkLogRecords(Adapter[Any]):
    """Reads an SDK log record as the exporter gets it (``ReadableLogRecord`` or
    ``LogData``, by SDK release): the record and its resource."""

    def attributes(self, record: Any) -> Mapping[str, Any]:
        return record.log_record.attributes or EMPTY

    def time(self, record: Any) -> float:
        log_record = record.log_record
        return _seconds(log_record.timestamp or log_record.observed_timestamp) or time.time()

    def resource(self, record: Any) -> Mapping[str, Any]:
        resource = getattr(record, "resource", None) or getattr(record.log_record, "resource", None)
        return resource.attributes if resource is not None else EMPTY

    def special(self, record: Any, name: str, time: float) -> Any:
        log_record = record.log_record
        if name == "@name":
            event_name = getattr(log_record, "event_name", None)
            return event_name or (log_record.body if isinstance(log_record.body, str) else None)
        if name == "@severity":
            return log_record.severity_text
        return super().special(record, name, time)

    def describe(self, record: Any) -> str:
        return f"log record {str(record.log_record.body)[:60]!r}"


SDK_SPANS = SdkSpans()
SDK_LOG_RECORDS = SdkLogRecords()
