"""The gateway's memory budget: what one request, and all requests together, may cost.

A protobuf message costs far more in memory than on the wire (an empty
attribute is 2 bytes on the wire and about 56 in the parsed message), so
the bytes being decoded, parsed and translated at once are capped across
calls (:class:`Budget`), gzip is inflated only up to what the call reserved
(:func:`gunzip`), and each parsed request is checked against per-request
caps before any record is walked (:func:`check_request`).
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from time import monotonic
from typing import Any, Optional

from ._otlp import LOGS, BadRequest, Signal, TooLarge

__all__ = [
    "DEFAULT_MAX_ATTRIBUTES",
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "DEFAULT_MAX_RECORDS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "Budget",
    "Limits",
    "attribute_problem",
    "check_request",
    "record_problem",
    "gunzip",
]

#: Largest request, on the wire and decoded (the Collector's gRPC receiver default).
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: Decoded bytes being parsed and translated at once, across calls.
DEFAULT_MAX_INFLIGHT_BYTES = 8 * 1024 * 1024
#: Log records or spans in one request.
DEFAULT_MAX_RECORDS = 50_000
#: Attributes of one record, span event, link or resource (OTEL_ATTRIBUTE_COUNT_LIMIT's default).
DEFAULT_MAX_ATTRIBUTES = 128
#: Every value of one record (its events and links, nested arrays and kvlists included),
#: as a multiple of the attribute limit.
_VALUES_PER_ATTRIBUTE = 8
_INFLATE_STEP = 1 << 16


@dataclass(frozen=True)
class Limits:
    """Per-request caps (see the module docstring); every one is documented in docs/gateway.md."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_records: int = DEFAULT_MAX_RECORDS
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES

    @property
    def max_values(self) -> int:
        return self.max_attributes * _VALUES_PER_ATTRIBUTE


class Budget:
    """Bytes reserved by the calls in flight, never more than ``capacity`` at once.

    A call reserves what it will decode in one piece (so two calls never hold
    half each and wait for each other), first come first served (so a small
    call is not passed over forever by large ones), waiting until its deadline.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._room = threading.Condition()
        self._queue: deque[object] = deque()

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, size: int, deadline: float) -> bool:
        """Reserve ``size`` bytes, waiting until ``deadline`` (``monotonic()``) for room."""
        if size > self.capacity:
            return False
        ticket = object()
        with self._room:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._used + size > self.capacity:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        return False
                    self._room.wait(remaining)
                self._used += size
                return True
            finally:
                self._queue.remove(ticket)
                self._room.notify_all()

    def try_acquire(self, size: int) -> bool:
        """Reserve ``size`` bytes if there is room now (and nobody is waiting)."""
        with self._room:
            if self._queue or self._used + size > self.capacity:
                return False
            self._used += size
            return True

    def release(self, size: int) -> None:
        with self._room:
            self._used -= size
            self._room.notify_all()


def gzip_claim(data: bytes, limit: int) -> int:
    """What a gzip body says it decompresses to (its last ISIZE), capped at ``limit`` + 1.

    Only a claim: :func:`gunzip` never produces more than the bytes reserved
    for it, whatever the trailer says.
    """
    if len(data) < 18:
        return min(limit, 1024)
    (size,) = struct.unpack("<I", data[-4:])
    return min(int(size), limit + 1)


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip (one or more members), stopping as soon as the output passes ``limit``.

    Memory stays at ``limit`` plus one step however far the input would inflate.
    """
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending: Any = data
        try:
            while True:
                out += inflater.decompress(pending, _INFLATE_STEP)
                if len(out) > limit:
                    raise TooLarge(f"body decompresses to more than {limit} bytes")
                pending = inflater.unconsumed_tail
                if not pending:
                    break
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None
        if not inflater.eof:
            raise BadRequest("body is truncated gzip")
        data = inflater.unused_data
    return bytes(out)


def _values(any_value: Any, budget: int) -> int:
    """Values in ``any_value`` (itself and nested ones), counted up to ``budget``."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        total = 1
        for item in any_value.array_value.values:
            total += _values(item, budget - total)
            if total > budget:
                break
        return total
    if kind == "kvlist_value":
        total = 1
        for kv in any_value.kvlist_value.values:
            total += _values(kv.value, budget - total)
            if total > budget:
                break
        return total
    return 1


def attribute_problem(
    attributes: Any, what: str, limits: Limits, values: Optional[list[int]]
) -> str:
    """Why ``attributes`` are over a cap, or ``""``; ``values`` (a running count) walks them."""
    count = len(attributes)
    if count > limits.max_attributes:
        return f"{what} has {count} attributes (the limit is {limits.max_attributes})"
    if values is None:
        return ""
    for kv in attributes:
        values[0] += _values(kv.value, limits.max_values - values[0])
        if values[0] > limits.max_values:
            return (
                f"{what} holds more than {limits.max_values} attribute values "
                "(nested arrays and kvlists included)"
            )
    return ""


def record_problem(signal: Signal, record: Any, limits: Limits) -> str:
    """Why ``record`` is over a cap, or ``""``.

    Every value takes 2 bytes or more on the wire, so values are counted only
    in a record whose encoded size could hold more than the cap.
    """
    values = [0] if record.ByteSize() > 2 * limits.max_values else None
    what = "log record" if signal is LOGS else "span"
    problem = attribute_problem(record.attributes, what, limits, values)
    if problem or signal is LOGS:
        return problem
    for event in record.events:
        problem = attribute_problem(event.attributes, f"{what} event", limits, values)
        if problem:
            return problem
    for link in record.links:
        problem = attribute_problem(link.attributes, f"{what} link", limits, values)
        if problem:
            return problem
    return ""


def check_request(signal: Signal, request: Any, limits: Limits) -> tuple[int, list[str]]:
    """Enforce the per-request caps on a parsed request, before any record is walked.

    Too many records: :class:`BadRequest` (the sender should send smaller
    batches). A resource over a cap: :class:`BadRequest`. A record over a cap
    is removed from ``request``; returns how many were, and why.
    """
    if signal is LOGS:
        resources, scopes_field, records_field = request.resource_logs, "scope_logs", "log_records"
    else:
        resources, scopes_field, records_field = request.resource_spans, "scope_spans", "spans"
    total = 0
    removed = 0
    reasons: list[str] = []
    for resource_entry in resources:
        resource = resource_entry.resource
        values = [0] if resource.ByteSize() > 2 * limits.max_values else None
        problem = attribute_problem(resource.attributes, "a resource", limits, values)
        if problem:
            raise BadRequest(problem)
        for scope in getattr(resource_entry, scopes_field):
            records = getattr(scope, records_field)
            total += len(records)
            if total > limits.max_records:
                raise BadRequest(
                    f"more than {limits.max_records} {signal.name} records in one request "
                    "(send smaller batches)"
                )
            over = []
            for index, record in enumerate(records):
                problem = record_problem(signal, record, limits)
                if problem:
                    over.append(index)
                    if len(reasons) < 3:
                        reasons.append(problem)
            for index in reversed(over):
                del records[index]
            removed += len(over)
    return removed, reasons


def reserve_deadline(deadline: Optional[float], wait: float) -> float:
    """How long a call may wait for room in the budget: ``wait`` s, within its own deadline."""
    limit = monotonic() + wait
    return limit if deadline is None else min(limit, deadline)
