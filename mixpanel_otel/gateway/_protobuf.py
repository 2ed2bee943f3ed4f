"""Parsing an OTLP protobuf request record by record, refusing what is over a cap first.

Parsing a whole request in one call holds the interpreter for as long as the
body takes (a quarter of a second for 4 MiB of empty attributes, with 30
times its size in memory). Here the three outer levels (resources, scopes,
records) are read with a small wire reader; records are parsed in runs of at
most ``_RUN_BYTES`` (one short call each), and a record whose encoded size
could be over a cap is counted on the wire first, stopping at the cap: an
oversized record costs microseconds and is never parsed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

from ._limits import Limits, attribute_problem, record_problem
from ._otlp import LOGS, BadRequest, Signal

__all__ = ["parse_request"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 32  # nested arrays / kvlists in one attribute value
_RUN_BYTES = 64 * 1024  # encoded records parsed in one call


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
    for number, kind, value, _, _ in _spans(data):
        yield number, kind, value


def _spans(data: memoryview) -> Iterator[tuple[int, int, Any, int, int]]:
    """As :func:`_fields`, with the offsets where each field's encoding starts and ends."""
    at, end = 0, len(data)
    while at < end:
        start = at
        key = data[at]
        if key < 0x80:  # the usual one-byte key, without a call
            at += 1
        else:
            key, at = _varint(data, at)
        number, kind = key >> 3, key & 7
        value: Any
        if kind == _VARINT:
            value, at = _varint(data, at)
        elif kind == _LEN:
            # Lengths of one or two bytes (under 16 KiB), without a call.
            if at + 1 < end and data[at] < 0x80:
                size, at = data[at], at + 1
            elif at + 1 < end and data[at + 1] < 0x80:
                size, at = (data[at] & 0x7F) | data[at + 1] << 7, at + 2
            else:
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
        yield number, kind, value, start, at


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


def _parse_scope(
    signal: Signal, data: memoryview, scope: Any, records_field: str, limits: Limits, before: int
) -> tuple[int, list[str]]:
    """Fill ``scope`` from its encoding; ``(records found, why each one left out was)``."""
    records = getattr(scope, records_field)
    # Every attribute or value takes 2 bytes or more on the wire, so a record of
    # `tiny` bytes cannot be over a cap, and one of `small` bytes can only have too
    # many attributes (counted once parsed); a larger one is counted on the wire.
    tiny = 2 * limits.max_attributes
    small = 2 * limits.max_values
    found = 0
    problems: list[str] = []
    run: list[memoryview] = []
    run_bytes = 0
    check: list[int] = []  # positions in the run of records to count once parsed

    def parse_run() -> None:
        # The run is a ScopeLogs / ScopeSpans fragment holding only records: merging
        # it appends them, as a parse of the whole message would.
        first = len(records)
        scope.MergeFromString(b"".join(run))
        for position in reversed(check):
            problem = record_problem(signal, records[first + position], limits)
            if problem:
                del records[first + position]
                problems.append(problem)
        run.clear()
        check.clear()

    for item, item_kind, value, start, end in _spans(data):
        if item_kind != _LEN:
            continue
        if item == 1:
            scope.scope.MergeFromString(bytes(value))
        elif item == 3:
            scope.schema_url = bytes(value).decode("utf-8")
        elif item == 2:
            found += 1
            if before + found > limits.max_records:
                raise BadRequest(
                    f"more than {limits.max_records} {signal.name} records in one request "
                    "(send smaller batches)"
                )
            if len(value) > small:
                problem = _record_on_the_wire(signal, value, limits)
                if problem:
                    problems.append(problem)
                    continue
            elif len(value) > tiny:
                check.append(len(run))
            run.append(data[start:end])  # the record's whole field: key, length, bytes
            run_bytes += end - start
            if run_bytes >= _RUN_BYTES:
                parse_run()
                run_bytes = 0
    if run:
        parse_run()
    return found, problems


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
                found, problems = _parse_scope(signal, value, scope, records_field, limits, total)
                total += found
                removed += len(problems)
                reasons += problems[: max(0, 3 - len(reasons))]
    return request, removed, reasons
