"""OTLP requests in, translated group updates out; OTLP answers back.

Decodes ``ExportLogsServiceRequest`` / ``ExportTraceServiceRequest`` from
protobuf or OTLP/JSON, turns each log record, span and ``mixpanel.group``
span event into the flat attribute mapping every front end hands the shared
:class:`~mixpanel_otel._translate.Translator`, and encodes the responses
(partial success) and error bodies (``google.rpc.Status``).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .._translate import EVENT_NAME, Translator
from .._wire import GroupUpdate, Truncations, iso_utc

__all__ = [
    "LOGS",
    "TRACES",
    "Signal",
    "Translated",
    "BadRequest",
    "TooLarge",
    "decode",
    "retry_info",
    "status_body",
]

_EMPTY: dict[str, Any] = {}
_STATUS_NAMES = ("UNSET", "OK", "ERROR")  # trace.v1.Status.StatusCode, as the SDK names them
_MAX_REASONS = 5  # reasons kept per request for the partial-success message

Report = Callable[[str, list[Any]], None]


class BadRequest(Exception):
    """The request body is not a valid OTLP message of the expected kind."""


class TooLarge(BadRequest):
    """The request body (or what it decompresses to) is over the gateway's limit."""


@dataclass
class Translated:
    """What one Export request produced."""

    records: int = 0  # log records or spans in the request
    updates: list[GroupUpdate] = field(default_factory=list)
    rejected: int = 0  # records with invalid group data
    reasons: list[str] = field(default_factory=list)  # the first few, for the answer

    def reject(self, what: str, errors: list[Any]) -> None:
        self.rejected += 1
        if len(self.reasons) < _MAX_REASONS:
            self.reasons.append(f"{what}: {'; '.join(map(str, errors))}")


@dataclass(frozen=True)
class Signal:
    """One OTLP signal: its messages, how to translate it, how to answer."""

    name: str  # "logs" / "traces"
    path: str  # HTTP path
    service: str  # gRPC service
    request: Any
    response: Any
    rejected_field: str
    translate: Callable[[Any, Translator, Truncations, Report], Translated]

    def response_bytes(self, rejected: int, message: str, json_encoding: bool) -> bytes:
        """An Export response, with partial success when some records were rejected."""
        if json_encoding:
            if not rejected and not message:
                return b"{}"
            camel = json_format.MessageToDict(
                self.response(partial_success={self.rejected_field: rejected})
            )["partialSuccess"]
            camel["errorMessage"] = message
            return json.dumps({"partialSuccess": camel}).encode()
        if not rejected and not message:
            return b""
        response = self.response(
            partial_success={self.rejected_field: rejected, "error_message": message}
        )
        return bytes(response.SerializeToString())


def _value(any_value: Any) -> Any:
    """An ``AnyValue`` as the Python SDK holds it (arrays as lists, kvlists as dicts)."""
    kind = any_value.WhichOneof("value")
    if kind == "string_value":
        return any_value.string_value
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind)


def _attributes(key_values: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


def _seconds(nanos: int) -> Optional[float]:
    return nanos / 1e9 if nanos else None


def _translate_logs(
    request: Any, translator: Translator, counter: Truncations, report: Report
) -> Translated:
    result = Translated()
    translate = translator.translate
    updates = result.updates
    now = time.time()
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                result.records += 1
                attributes = _attributes(record.attributes)
                if not attributes and not translator.rules:
                    continue
                errors: list[Any] = []
                seconds = _seconds(record.time_unix_nano or record.observed_time_unix_nano)
                updates += translate(
                    attributes,
                    seconds or now,
                    resource,
                    partial(_log_special, record, seconds),
                    counter,
                    errors,
                )
                if errors:
                    what = f"log record {_body_text(record)[:60]!r}"
                    result.reject(what, errors)
                    report(what, errors)
    return result


def _translate_spans(
    request: Any, translator: Translator, counter: Truncations, report: Report
) -> Translated:
    result = Translated()
    translate = translator.translate
    updates = result.updates
    now = time.time()
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                result.records += 1
                errors: list[Any] = []
                seconds = _seconds(span.end_time_unix_nano or span.start_time_unix_nano) or now
                updates += translate(
                    _attributes(span.attributes),
                    seconds,
                    resource,
                    partial(_span_special, span),
                    counter,
                    errors,
                )
                for event in span.events:
                    if event.name == EVENT_NAME:
                        updates += translate(
                            _attributes(event.attributes),
                            _seconds(event.time_unix_nano) or seconds,
                            counter=counter,
                            errors=errors,
                            apply_rules=False,
                        )
                if errors:
                    what = f"span {span.name!r} (trace {span.trace_id.hex() or '?'})"
                    result.reject(what, errors)
                    report(what, errors)
    return result


def _body_text(record: Any) -> str:
    body = record.body
    if body.WhichOneof("value") == "string_value":
        return str(body.string_value)
    return str(_value(body)) if record.HasField("body") else ""


def _log_special(record: Any, seconds: Optional[float], name: str) -> Any:
    if name == "@name":
        if record.event_name:
            return record.event_name
        body = record.body
        return body.string_value if body.WhichOneof("value") == "string_value" else None
    if name == "@severity":
        return record.severity_text or None
    if name in ("@start_time", "@end_time"):
        return iso_utc(seconds)
    return None


def _span_special(span: Any, name: str) -> Any:
    if name == "@name":
        return span.name
    if name == "@start_time":
        return iso_utc(_seconds(span.start_time_unix_nano))
    if name == "@end_time":
        return iso_utc(_seconds(span.end_time_unix_nano))
    if name == "@status":
        code = span.status.code
        return _STATUS_NAMES[code] if 0 <= code < len(_STATUS_NAMES) else str(code)
    return None


LOGS = Signal(
    name="logs",
    path="/v1/logs",
    service="opentelemetry.proto.collector.logs.v1.LogsService",
    request=ExportLogsServiceRequest,
    response=ExportLogsServiceResponse,
    rejected_field="rejected_log_records",
    translate=_translate_logs,
)
TRACES = Signal(
    name="traces",
    path="/v1/traces",
    service="opentelemetry.proto.collector.trace.v1.TraceService",
    request=ExportTraceServiceRequest,
    response=ExportTraceServiceResponse,
    rejected_field="rejected_spans",
    translate=_translate_spans,
)

# OTLP/JSON writes trace and span ids as hex, where proto3 JSON expects base64.
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _fix_ids(item: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        value = item.get(name)
        if isinstance(value, str) and value:
            try:
                item[name] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise BadRequest(f"{name} {value[:40]!r} is not hex") from None


def _json_request(signal: Signal, body: bytes) -> Any:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("body is not a JSON object")
    outer, inner, items = (
        ("resourceLogs", "scopeLogs", "logRecords")
        if signal is LOGS
        else ("resourceSpans", "scopeSpans", "spans")
    )
    try:
        for resource in document.get(outer) or ():
            for scope in resource.get(inner) or ():
                for item in scope.get(items) or ():
                    _fix_ids(item)
                    for link in item.get("links") or ():
                        _fix_ids(link)
        return json_format.ParseDict(document, signal.request(), ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError) as exc:
        raise BadRequest(f"not an OTLP/JSON {signal.name} request: {exc}") from None


def decode(signal: Signal, body: bytes, json_encoding: bool = False) -> Any:
    """The request message from its protobuf (or OTLP/JSON) body; :class:`BadRequest` if not."""
    if json_encoding:
        return _json_request(signal, body)
    try:
        return signal.request.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadRequest(f"not a protobuf {signal.request.__name__}: {exc}") from None


# -- google.rpc.Status and RetryInfo, encoded by hand (no googleapis-common-protos needed)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def retry_info(seconds: float) -> bytes:
    """``google.rpc.RetryInfo{retry_delay: seconds}``."""
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    duration = b""
    if whole:
        duration += _varint(1 << 3) + _varint(whole)
    if nanos:
        duration += _varint(2 << 3) + _varint(nanos)
    return _field(1, duration)


_RETRY_INFO_TYPE = b"type.googleapis.com/google.rpc.RetryInfo"


def status_body(code: int, message: str, retry_after: Optional[float] = None) -> bytes:
    """``google.rpc.Status`` (gRPC code, message, RetryInfo detail), protobuf-encoded."""
    out = b""
    if code:
        out += _varint(1 << 3) + _varint(code)
    if message:
        out += _field(2, message.encode("utf-8"))
    if retry_after is not None:
        out += _field(3, _field(1, _RETRY_INFO_TYPE) + _field(2, retry_info(retry_after)))
    return out
