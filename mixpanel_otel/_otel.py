"""OpenTelemetry exporters: group updates from spans and log records.

Both follow the SDK's exporter interfaces exactly: ``export`` translates and
queues (never raises, never blocks on the network), ``force_flush`` flushes
the shared consumer, ``shutdown`` is idempotent and later exports fail.
They load with no arguments, from the environment, as the entry points
``opentelemetry_traces_exporter`` / ``opentelemetry_logs_exporter`` ``mixpanel``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

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

from ._frontend import ConsumerLike, FrontEnd
from ._rules import RulesSource
from ._translate import EVENT_NAME
from ._wire import GroupUpdate, iso_utc

__all__ = ["MixpanelLogExporter", "MixpanelSpanExporter"]

_EMPTY: dict[str, Any] = {}


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
        self._translate = self._front.translator.translate
        self._off = not self._front.enabled
        self._stopped = False

    @property
    def disabled(self) -> Optional[str]:
        """Why this exporter sends nothing, or None when it delivers."""
        return self._front.disabled

    def _report(self, what: Callable[[], str], errors: list[str], ignored: list[str]) -> None:
        if ignored:
            self._front.report_ignored(len(ignored))
            ignored.clear()
        if errors:
            self._front.report_invalid(what(), errors)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Deliver what is pending; True when nothing is left within the timeout."""
        return bool(self.consumer.flush(timeout_millis / 1000))

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
        if self._off:
            return SpanExportResult.SUCCESS
        try:
            updates: list[GroupUpdate] = []
            counter = self.consumer.truncations
            ignored: list[str] = []
            for span in spans:
                errors: list[str] = []
                seconds = _seconds(span.end_time or span.start_time) or time.time()
                resource = span.resource.attributes if span.resource is not None else _EMPTY

                def special(name: str, span: ReadableSpan = span) -> Any:
                    return _span_special(span, name)

                updates += self._translate(
                    span.attributes or _EMPTY,
                    seconds,
                    resource,
                    special,
                    counter,
                    errors,
                    ignored=ignored,
                )
                for event in span.events:
                    if event.name == EVENT_NAME:
                        updates += self._translate(
                            event.attributes or _EMPTY,
                            _seconds(event.timestamp) or seconds,
                            counter=counter,
                            errors=errors,
                            apply_rules=False,
                            ignored=ignored,
                        )
                self._report(lambda span=span: _describe_span(span), errors, ignored)  # type: ignore[misc]
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
        if self._off:
            return LogRecordExportResult.SUCCESS
        try:
            updates: list[GroupUpdate] = []
            counter = self.consumer.truncations
            ignored: list[str] = []
            for item in batch:
                record = item.log_record
                errors: list[str] = []
                resource = getattr(item, "resource", None) or getattr(record, "resource", None)

                def special(name: str, record: Any = record) -> Any:
                    return _log_special(record, name)

                updates += self._translate(
                    record.attributes or _EMPTY,
                    _seconds(record.timestamp or record.observed_timestamp) or time.time(),
                    resource.attributes if resource is not None else _EMPTY,
                    special,
                    counter,
                    errors,
                    ignored=ignored,
                )
                self._report(
                    lambda record=record: f"log record {str(record.body)[:60]!r}",  # type: ignore[misc]
                    errors,
                    ignored,
                )
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
    if name == "@duration_ms":
        if span.start_time is None or span.end_time is None:
            return None
        return (span.end_time - span.start_time) / 1e6
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
