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
#: gzip members in one body (a sender writes one; thousands are an attack on time).
MAX_GZIP_MEMBERS = 64


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
    half each and wait for each other). Waiting calls are served in order, except
    that a caller (``peer``) already holding ``per_peer`` reservations waits for
    one of its own to end: one caller's many large calls cannot hold up another's
    small one for longer than ``per_peer`` of them take.
    """

    def __init__(self, capacity: int, per_peer: int = 1) -> None:
        self.capacity = capacity
        self.per_peer = per_peer
        self._used = 0
        self._room = threading.Condition()
        self._queue: deque[tuple[object, str]] = deque()
        self._held: dict[str, int] = {}  # reservations per peer

    @property
    def used(self) -> int:
        return self._used

    def _next(self) -> Optional[object]:
        """The first waiting ticket whose peer may take another reservation."""
        for ticket, peer in self._queue:
            if self._held.get(peer, 0) < self.per_peer:
                return ticket
        return None

    def acquire(self, size: int, deadline: float, peer: str = "") -> bool:
        """Reserve ``size`` bytes, waiting until ``deadline`` (``monotonic()``) for room."""
        if size > self.capacity:
            return False
        entry = (object(), peer)
        with self._room:
            self._queue.append(entry)
            try:
                while self._next() is not entry[0] or self._used + size > self.capacity:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        return False
                    self._room.wait(remaining)
                self._used += size
                self._held[peer] = self._held.get(peer, 0) + 1
                return True
            finally:
                self._queue.remove(entry)
                self._room.notify_all()

    def grow(self, size: int) -> bool:
        """Add ``size`` bytes to a reservation already held, if there is room now."""
        with self._room:
            if self._used + size > self.capacity:
                return False
            self._used += size
            return True

    def try_acquire(self, size: int) -> bool:
        """Reserve ``size`` bytes if there is room now (and nobody is waiting); no peer."""
        with self._room:
            if self._queue or self._used + size > self.capacity:
                return False
            self._used += size
            return True

    def release(self, size: int, peer: Optional[str] = None) -> None:
        """Give back ``size`` bytes; ``peer``: also end one reservation of that caller."""
        with self._room:
            self._used -= size
            if peer is not None:
                left = self._held.get(peer, 0) - 1
                if left > 0:
                    self._held[peer] = left
                else:
                    self._held.pop(peer, None)
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


def gunzip(data: bytes, limit: int, max_members: int = MAX_GZIP_MEMBERS) -> bytes:
    """Inflate gzip (one or more members), stopping as soon as the output passes ``limit``.

    Memory stays at ``limit`` plus one step however far the input would inflate;
    time stays linear in the input (it is fed in steps, never copied whole per
    member), and more than ``max_members`` members is refused.
    """
    out = bytearray()
    view = memoryview(data)
    at, members = 0, 0
    while at < len(view):
        members += 1
        if members > max_members:
            raise BadRequest(f"body has more than {max_members} gzip members")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while not inflater.eof:
                if at >= len(view):
                    raise BadRequest("body is truncated gzip")
                step = view[at : at + _INFLATE_STEP]
                at += len(step)
                pending: Any = step
                while pending:
                    out += inflater.decompress(pending, _INFLATE_STEP)
                    if len(out) > limit:
                        raise TooLarge(f"body decompresses to more than {limit} bytes")
                    pending = inflater.unconsumed_tail
                    if inflater.eof:
                        break
            at -= len(inflater.unused_data)  # the next member starts in this step
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None
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
