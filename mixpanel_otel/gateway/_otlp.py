"""OTLP requests in, translated group updates out; OTLP answers back.

Decodes ``ExportLogsServiceRequest`` / ``ExportTraceServiceRequest`` from
protobuf or OTLP/JSON, reads their log records and spans (adapters for the
front ends' one :class:`~mixpanel_otel._records.Walker`), and encodes the
responses (partial success) and error bodies (``google.rpc.Status``).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
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

from .._records import Adapter, Event
from .._translate import EVENT_NAME
from .._wire import iso_utc

__all__ = [
    "LOGS",
    "TRACES",
    "BadRequest",
    "OtlpLogRecords",
    "OtlpSpans",
    "Signal",
    "TooLarge",
    "decode",
    "json_values",
    "retry_info",
    "status_body",
]

#: An OTLP record beside its resource's attributes (converted once per resource).
Item = tuple[Mapping[str, Any], Any]
_STATUS_NAMES = ("UNSET", "OK", "ERROR")  # trace.v1.Status.StatusCode, as the SDK names them


class BadRequest(Exception):
    """The request body is not a valid OTLP message of the expected kind."""


class TooLarge(BadRequest):
    """The request body (or what it decompresses to) is over the gateway's limit."""


@dataclass(frozen=True)
class Signal:
    """One OTLP signal: its messages, how to read its records, how to answer."""

    name: str  # "logs" / "traces"
    path: str  # HTTP path
    service: str  # gRPC service
    request: Any
    response: Any
    rejected_field: str
    adapter: Adapter[Item]  # how the walker reads one of its records
    records: Callable[[Any], Iterator[Item]]  # a request's records, each beside its resource

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
    attributes = {}
    for kv in key_values:
        value = kv.value
        # Most values are strings: read in line, a quarter faster than a call each.
        if value.WhichOneof("value") == "string_value":
            attributes[kv.key] = value.string_value
        else:
            attributes[kv.key] = _value(value)
    return attributes


def _seconds(nanos: int) -> Optional[float]:
    return nanos / 1e9 if nanos else None


def _log_records(request: Any) -> Iterator[Item]:
    for resource_logs in request.resource_logs:
        resource = _attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                yield resource, record


def _spans(request: Any) -> Iterator[Item]:
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield resource, span


class OtlpLogRecords(Adapter[Item]):
    """Reads an OTLP ``LogRecord`` (protobuf) beside its resource."""

    def attributes(self, record: Item) -> Mapping[str, Any]:
        return _attributes(record[1].attributes)

    def time(self, record: Item) -> float:
        log = record[1]
        return _seconds(log.time_unix_nano or log.observed_time_unix_nano) or time.time()

    def resource(self, record: Item) -> Mapping[str, Any]:
        return record[0]

    def special(self, record: Item, name: str, time: float) -> Any:
        log = record[1]
        if name == "@name":
            if log.event_name:
                return log.event_name
            body = log.body
            return body.string_value if body.WhichOneof("value") == "string_value" else None
        if name == "@severity":
            return log.severity_text or None
        return super().special(record, name, time)

    def describe(self, record: Item) -> str:
        return f"log record {_body_text(record[1])[:60]!r}"


class OtlpSpans(Adapter[Item]):
    """Reads an OTLP ``Span`` (protobuf) beside its resource; its time is its end."""

    has_events = True

    def attributes(self, record: Item) -> Mapping[str, Any]:
        return _attributes(record[1].attributes)

    def time(self, record: Item) -> float:
        span = record[1]
        return _seconds(span.end_time_unix_nano or span.start_time_unix_nano) or time.time()

    def resource(self, record: Item) -> Mapping[str, Any]:
        return record[0]

    def special(self, record: Item, name: str, time: float) -> Any:
        span = record[1]
        if name == "@name":
            return span.name
        if name == "@start_time":
            return iso_utc(_seconds(span.start_time_unix_nano))
        if name == "@end_time":
            return iso_utc(_seconds(span.end_time_unix_nano))
        if name == "@status":
            code = span.status.code
            return _STATUS_NAMES[code] if 0 <= code < len(_STATUS_NAMES) else str(code)
        if name == "@duration_ms" and span.start_time_unix_nano and span.end_time_unix_nano:
            return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
        return None

    def events(self, record: Item, time: float) -> Iterator[Event]:
        for event in record[1].events:
            if event.name == EVENT_NAME:
                yield _attributes(event.attributes), _seconds(event.time_unix_nano) or time

    def describe(self, record: Item) -> str:
        span = record[1]
        return f"span {span.name!r} (trace {span.trace_id.hex() or '?'})"


def _body_text(record: Any) -> str:
    body = record.body
    if body.WhichOneof("value") == "string_value":
        return str(body.string_value)
    return str(_value(body)) if record.HasField("body") else ""


LOGS = Signal(
    name="logs",
    path="/v1/logs",
    service="opentelemetry.proto.collector.logs.v1.LogsService",
    request=ExportLogsServiceRequest,
    response=ExportLogsServiceResponse,
    rejected_field="rejected_log_records",
    adapter=OtlpLogRecords(),
    records=_log_records,
)
TRACES = Signal(
    name="traces",
    path="/v1/traces",
    service="opentelemetry.proto.collector.trace.v1.TraceService",
    request=ExportTraceServiceRequest,
    response=ExportTraceServiceResponse,
    rejected_field="rejected_spans",
    adapter=OtlpSpans(),
    records=_spans,
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


def json_values(body: bytes) -> int:
    """An upper bound on the JSON values in ``body``, counted at C speed before parsing.

    Parsing costs per value (a dict, a list, a string), not per byte: ``[{},{},...]``
    costs about 70 times its size.
    """
    return body.count(b"{") + body.count(b"[") + body.count(b",") + 1


def _json_request(signal: Signal, body: bytes, max_records: Optional[int] = None) -> Any:
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
        total = 0
        for resource in document.get(outer) or ():
            for scope in resource.get(inner) or ():
                records = scope.get(items) or ()
                total += len(records)
                if max_records is not None and total > max_records:
                    raise BadRequest(
                        f"more than {max_records} {signal.name} records in one request "
                        "(send smaller batches)"
                    )
                for item in records:
                    _fix_ids(item)
                    for link in item.get("links") or ():
                        _fix_ids(link)
        return json_format.ParseDict(document, signal.request(), ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError) as exc:
        raise BadRequest(f"not an OTLP/JSON {signal.name} request: {exc}") from None


def decode(
    signal: Signal, body: bytes, json_encoding: bool = False, max_records: Optional[int] = None
) -> Any:
    """The request message from its protobuf (or OTLP/JSON) body; :class:`BadRequest` if not.

    ``max_records``: an OTLP/JSON request with more is refused before it is converted.
    """
    if json_encoding:
        return _json_request(signal, body, max_records)
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
