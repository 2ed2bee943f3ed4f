"""OpenTelemetry exporters: group updates from spans and log records.

Both follow the SDK's exporter interfaces exactly: ``export`` translates and
queues (never raises, never blocks on the network), ``force_flush`` flushes
the shared consumer, ``shutdown`` is idempotent and later exports fail.
They load with no arguments, from the environment, as the entry points
``opentelemetry_traces_exporter`` / ``opentelemetry_logs_exporter`` ``mixpanel``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

try:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
except ImportError:  # pragma: no cover - SDK releases before the rename
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef]
        LogExporter as LogRecordExporter,
    )
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef]
        LogExportResult as LogRecordExportResult,
    )
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ._consumer import Consumer
from ._frontend import FrontEnd
from ._translate import EVENT_NAME
from ._wire import iso_utc

__all__ = ["MixpanelLogExporter", "MixpanelSpanExporter"]

_EMPTY: dict = {}


def _seconds(nanos: Optional[int]) -> Optional[float]:
    return None if nanos is None else nanos / 1e9


class _Exporter:
    """What both exporters share: a front end, flush and shutdown."""

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        consumer: Optional[Consumer] = None,
        rules: Any = None,
        **options: Any,
    ) -> None:
        self._front = FrontEnd(token, api_host, consumer, rules, options)
        self.consumer = self._front.consumer
        self._translate = self._front.translator.translate
        self._stopped = False

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Deliver what is pending; True when nothing is left within the timeout."""
        return self.consumer.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Flush within the consumer's shutdown timeout; later exports fail. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.consumer.flush(self.consumer.shutdown_timeout)


class MixpanelSpanExporter(_Exporter, SpanExporter):
    """Group updates from span attributes, ``mixpanel.group`` span events and rules."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped:
            return SpanExportResult.FAILURE
        try:
            updates: list = []
            counter = self.consumer.truncations
            for span in spans:
                errors: list = []
                seconds = _seconds(span.end_time or span.start_time) or time.time()
                resource = span.resource.attributes if span.resource is not None else _EMPTY
                updates += self._translate(
                    span.attributes or _EMPTY,
                    seconds,
                    resource,
                    lambda name, span=span: _span_special(span, name),
                    counter,
                    errors,
                )
                for event in span.events:
                    if event.name == EVENT_NAME:
                        updates += self._translate(
                            event.attributes or _EMPTY,
                            _seconds(event.timestamp) or seconds,
                            counter=counter,
                            errors=errors,
                            apply_rules=False,
                        )
                if errors:
                    self._front.report_invalid(_describe_span(span), errors)
            if updates:
                self.consumer.enqueue(updates)
            return SpanExportResult.SUCCESS
        except Exception as exc:  # the SDK's processors expect no exceptions
            self._front.report_invalid(f"a batch of {len(spans)} span(s)", [repr(exc)])
            return SpanExportResult.FAILURE


class MixpanelLogExporter(_Exporter, LogRecordExporter):
    """Group updates from log records: the stdlib record conventions, the flat form and rules."""

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        if self._stopped:
            return LogRecordExportResult.FAILURE
        try:
            updates: list = []
            counter = self.consumer.truncations
            for item in batch:
                record = item.log_record
                errors: list = []
                resource = getattr(item, "resource", None) or getattr(record, "resource", None)
                updates += self._translate(
                    record.attributes or _EMPTY,
                    _seconds(record.timestamp or record.observed_timestamp) or time.time(),
                    resource.attributes if resource is not None else _EMPTY,
                    lambda name, record=record: _log_special(record, name),
                    counter,
                    errors,
                )
                if errors:
                    self._front.report_invalid(f"log record {str(record.body)[:60]!r}", errors)
            if updates:
                self.consumer.enqueue(updates)
            return LogRecordExportResult.SUCCESS
        except Exception as exc:
            self._front.report_invalid(f"a batch of {len(batch)} log record(s)", [repr(exc)])
            return LogRecordExportResult.FAILURE


def _span_special(span: ReadableSpan, name: str) -> Any:
    if name == "@name":
        return span.name
    if name == "@start_time":
        return iso_utc(_seconds(span.start_time))
    if name == "@end_time":
        return iso_utc(_seconds(span.end_time))
    if name == "@status":
        return span.status.status_code.name
    return None


def _log_special(record: Any, name: str) -> Any:
    if name == "@name":
        event_name = getattr(record, "event_name", None)
        return event_name or (record.body if isinstance(record.body, str) else None)
    if name == "@severity":
        return record.severity_text
    if name in ("@start_time", "@end_time"):
        return iso_utc(_seconds(record.timestamp or record.observed_timestamp))
    return None


def _describe_span(span: ReadableSpan) -> str:
    context = span.get_span_context()
    trace = f"{context.trace_id:032x}" if context is not None else "?"
    return f"span {span.name!r} (trace {trace})"
