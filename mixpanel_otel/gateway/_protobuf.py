"""Parsing an OTLP protobuf request record by record, refusing what is over a cap first.

Parsing a whole request in one call holds the interpreter for as long as the
body takes (a quarter of a second for 4 MiB of empty attributes, with 30
times its size in memory). Here the three outer levels (resources, scopes,
records) are read with a small wire reader, each record is parsed on its own,
and a record whose encoded size could be over a cap is counted on the wire
first, stopping at the cap: an oversized record costs microseconds and is
never parsed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

from ._limits import Limits, attribute_problem
from ._otlp import LOGS, BadRequest, Signal

__all__ = ["parse_request"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 32  # nested arrays / kvlists in one attribute value


class _Malformed(Exception):
    pass


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)``; a length-delimited value is a memoryview."""
    at, end = 0, len(data)
    while at < end:
        key, at = _varint(data, at)
        number, kind = key >> 3, key & 7
        value: Any
        if kind == _VARINT:
            value, at = _varint(data, at)
        elif kind == _LEN:
            size, at = _varint(data, at)
            if at + size > end:
                raise _Malformed("a field runs past the end of its message")
            value, at = data[at : at + size], at + size
        elif kind in (_I64, _I32):
            at += 8 if kind == _I64 else 4
            if at > end:
                raise _Malformed("truncated fixed-size field")
            value = None
        else:
            raise _Malformed(f"unsupported wire type {kind}")
        if number == 0:
            raise _Malformed("field number 0")
        yield number, kind, value


# Field numbers (opentelemetry-proto): where attributes sit, and how values nest.
_LOG_ATTRIBUTES = 6
_SPAN_ATTRIBUTES, _SPAN_EVENTS, _SPAN_LINKS = 9, 11, 13
_EVENT_ATTRIBUTES, _LINK_ATTRIBUTES = 3, 5
_KV_VALUE = 2
_ANY_ARRAY, _ANY_KVLIST = 5, 6
_LIST_VALUES = 1


class _Counter:
    """Counts attributes and values on the wire, stopping at the first cap passed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.values = 0

    def any_value(self, data: memoryview, depth: int) -> str:
        self.values += 1
        for number, kind, value in _fields(data):
            if kind == _LEN and number in (_ANY_ARRAY, _ANY_KVLIST):
                if depth >= _MAX_DEPTH:
                    return f"an attribute value nested more than {_MAX_DEPTH} deep"
                for item_number, item_kind, item in _fields(value):
                    if item_number != _LIST_VALUES or item_kind != _LEN:
                        continue
                    if number == _ANY_KVLIST:
                        problem = self.key_value(item, depth + 1)
                    else:
                        problem = self.any_value(item, depth + 1)
                    if problem:
                        return problem
            if self.values > self.limits.max_values:
                return (
                    f"more than {self.limits.max_values} attribute values "
                    "(nested arrays and kvlists included)"
                )
        return ""

    def key_value(self, data: memoryview, depth: int) -> str:
        for number, kind, value in _fields(data):
            if number == _KV_VALUE and kind == _LEN:
                return self.any_value(value, depth)
        self.values += 1
        return ""

    def attributes(self, data: memoryview, field: int, what: str) -> str:
        count = 0
        for number, kind, value in _fields(data):
            if number != field or kind != _LEN:
                continue
            count += 1
            if count > self.limits.max_attributes:
                return f"{what} has more than {self.limits.max_attributes} attributes"
            problem = self.key_value(value, 0)
            if problem:
                return f"{what} holds {problem}"
        return ""


def _record_on_the_wire(signal: Signal, data: memoryview, limits: Limits) -> str:
    """Why an encoded record is over a cap, or ``""``, without parsing it."""
    counter = _Counter(limits)
    if signal is LOGS:
        return counter.attributes(data, _LOG_ATTRIBUTES, "log record")
    problem = counter.attributes(data, _SPAN_ATTRIBUTES, "span")
    if problem:
        return problem
    for number, kind, value in _fields(data):
        if kind != _LEN:
            continue
        if number == _SPAN_EVENTS:
            problem = counter.attributes(value, _EVENT_ATTRIBUTES, "span event")
        elif number == _SPAN_LINKS:
            problem = counter.attributes(value, _LINK_ATTRIBUTES, "span link")
        if problem:
            return problem
    return ""


def _record_problem(signal: Signal, record: Any, limits: Limits) -> str:
    """Why a parsed (small) record has too many attributes, or ``""``."""
    what = "log record" if signal is LOGS else "span"
    problem = attribute_problem(record.attributes, what, limits, None)
    if problem or signal is LOGS:
        return problem
    for event in record.events:
        problem = attribute_problem(event.attributes, f"{what} event", limits, None)
        if problem:
            return problem
    for link in record.links:
        problem = attribute_problem(link.attributes, f"{what} link", limits, None)
        if problem:
            return problem
    return ""


def parse_request(signal: Signal, body: bytes, limits: Limits) -> tuple[Any, int, list[str]]:
    """``(request, records removed, reasons)`` from a protobuf body, within ``limits``.

    Too many records, or a resource over a cap: :class:`BadRequest`. A record
    over a cap is left out of the request (the caller reports it rejected).
    """
    try:
        return _parse(signal, memoryview(body), limits)
    except (_Malformed, DecodeError, ValueError) as exc:
        raise BadRequest(f"not a protobuf {signal.request.__name__}: {exc}") from None


def _parse(signal: Signal, body: memoryview, limits: Limits) -> tuple[Any, int, list[str]]:
    request = signal.request()
    if signal is LOGS:
        entries, scopes_field, records_field = request.resource_logs, "scope_logs", "log_records"
    else:
        entries, scopes_field, records_field = request.resource_spans, "scope_spans", "spans"
    small = 2 * limits.max_values  # a record this size cannot hold more values than the cap
    total = removed = 0
    reasons: list[str] = []
    for number, kind, resource_data in _fields(body):
        if number != 1 or kind != _LEN:
            continue
        entry = entries.add()
        for field, field_kind, value in _fields(resource_data):
            if field_kind != _LEN:
                continue
            if field == 1:  # resource
                if len(value) > small:
                    problem = _Counter(limits).attributes(value, 1, "a resource")
                    if problem:
                        raise BadRequest(problem)
                entry.resource.MergeFromString(bytes(value))
                problem = attribute_problem(entry.resource.attributes, "a resource", limits, None)
                if problem:
                    raise BadRequest(problem)
            elif field == 3:
                entry.schema_url = bytes(value).decode("utf-8")
            elif field == 2:
                scope = getattr(entry, scopes_field).add()
                records = getattr(scope, records_field)
                for item, item_kind, data in _fields(value):
                    if item_kind != _LEN:
                        continue
                    if item == 1:
                        scope.scope.MergeFromString(bytes(data))
                    elif item == 3:
                        scope.schema_url = bytes(data).decode("utf-8")
                    elif item == 2:
                        total += 1
                        if total > limits.max_records:
                            raise BadRequest(
                                f"more than {limits.max_records} {signal.name} records in one "
                                "request (send smaller batches)"
                            )
                        problem = ""
                        if len(data) > small:
                            problem = _record_on_the_wire(signal, data, limits)
                        if not problem:
                            record = records.add()
                            record.MergeFromString(bytes(data))
                            problem = _record_problem(signal, record, limits)
                            if problem:
                                del records[-1]
                        if problem:
                            removed += 1
                            if len(reasons) < 3:
                                reasons.append(problem)
    return request, removed, reasons
