"""One Export call, whatever the protocol: decode, translate, submit, wait, answer.

The HTTP and gRPC servers only move bytes; this module decides the answer.
An Export succeeds only once every update it produced is delivered to
Mixpanel or written to the spool (the consumer's receipt says so). Refused
or not settled in time: the retryable answer. Records the translator refused
and updates Mixpanel refused for good: partial success, not retried.
"""

from __future__ import annotations

import enum
import hashlib
import threading
from dataclasses import dataclass, replace
from time import monotonic
from typing import Callable, Optional

from .._delivery import Consumer
from .._frontend import FrontEnd
from .._records import Ingested
from .._traits import TraitFeed, held_observations
from ._limits import Budget, Limits, check_request, gunzip, gzip_claim, reserve_deadline
from ._otlp import BadRequest, Signal, TooLarge, decode, json_values
from ._protobuf import parse_request
from ._security import Policy

__all__ = ["PROTOCOLS", "Answer", "Call", "Ingest", "Outcome", "json_cost"]

#: Time kept back from a gRPC deadline to send the answer before it expires.
_DEADLINE_MARGIN = 0.2
_DEFAULT_RETRY_AFTER = 1.0
DEFAULT_DEDUPE_WINDOW = 600.0


class _NoRoom(Exception):
    """No room in the memory budget before the call's deadline."""


class Outcome(enum.Enum):
    """How an Export call ends; each protocol maps it to its own status."""

    OK = "ok"  # everything delivered or spooled (maybe with rejected records)
    INVALID = "invalid"  # not an OTLP request: HTTP 400, gRPC INVALID_ARGUMENT
    TOO_LARGE = "too_large"  # body over the limit: HTTP 413, gRPC RESOURCE_EXHAUSTED
    UNAVAILABLE = "unavailable"  # retry later: HTTP 503, gRPC UNAVAILABLE
    OVERLOADED = "overloaded"  # over a bound, retry later: HTTP 429, gRPC RESOURCE_EXHAUSTED
    STOPPING = "stopping"  # shutting down: HTTP 503, gRPC UNAVAILABLE


PROTOCOLS = ("http", "grpc")
#: What one JSON value costs parsed (a dict or list, then its protobuf message), in
#: budget bytes: the budget counts protobuf bytes, which parse to up to ~30 times their size.
_JSON_VALUE_COST = 4


def json_cost(body: bytes) -> int:
    """The budget an OTLP/JSON body takes: its size, or what its values cost if more."""
    return max(len(body), json_values(body) * _JSON_VALUE_COST)


class Call:
    """One Export call as the listener sees it: protocol, caller, and its received bytes.

    ``on_release`` runs once (from whichever thread), when the body is parsed or the
    call ends: the listener stops counting the body's bytes as held.
    """

    def __init__(
        self,
        protocol: str = "http",
        peer: str = "",
        on_release: Optional[Callable[[], None]] = None,
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self._on_release = on_release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    rejected: int = 0  # records reported as partial success
    message: str = ""
    retry_after: Optional[float] = None


class Ingest:
    """Runs Export calls against one front end (consumer + translator); counts outcomes.

    Args:
        front: the translator and bad-record reporting.
        consumer: the front end's consumer (a real one: it hands out receipts).
        ack_timeout: longest wait for a submission to settle before answering retryable.
        max_concurrent: Export calls handled at once per protocol; more are answered
            "overloaded" at once, before their body is decoded.
        limits: the per-request caps.
        budget: decoded bytes being parsed and translated across calls
            (``--max-inflight-bytes``); a call waits for room up to ``ack_timeout``.
        policy: the operations and group keys forwarded; others are rejected records.
        dedupe_window: seconds within which a call resent with the same content is
            not counted again by the computed traits (``--dedupe-window``).
    """

    def __init__(
        self,
        front: FrontEnd,
        consumer: Consumer,
        ack_timeout: float,
        max_concurrent: int,
        limits: Optional[Limits] = None,
        budget: Optional[Budget] = None,
        policy: Optional[Policy] = None,
        dedupe_window: float = DEFAULT_DEDUPE_WINDOW,
    ) -> None:
        self.front = front
        self.dedupe_window = dedupe_window
        self.consumer = consumer
        self.ack_timeout = ack_timeout
        self.limits = limits or Limits()
        self.budget = budget or Budget(2 * self.limits.max_request_bytes)
        self.policy = policy or Policy()
        # Per protocol, as --max-concurrent says: a flood on one port leaves the other's.
        self._slots = {name: threading.BoundedSemaphore(max_concurrent) for name in PROTOCOLS}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self.stopping = False
        self._counts = dict.fromkeys(
            (
                "requests",
                "records",
                "updates",
                "accepted",
                "rejected_records",
                "failed_updates",
                "invalid_requests",
                "unavailable",
                "overloaded",
                "unauthenticated",
                "refused_by_policy",
                "over_limits",
            ),
            0,
        )

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "in_flight": self._active, "inflight_bytes": self.budget.used}

    def count(self, **counts: int) -> None:
        """Add to the counters ``/health`` shows (the listeners count refused callers here)."""
        self._count(**counts)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, number in counts.items():
                self._counts[name] += number

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no Export call is in flight (at most ``timeout`` s)."""
        deadline = monotonic() + timeout
        with self._idle:
            while self._active:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def export(
        self,
        signal: Signal,
        body: bytes,
        json_encoding: bool = False,
        deadline: Optional[float] = None,
        gzip: bool = False,
        *,
        call: Optional[Call] = None,
    ) -> Answer:
        """Handle one Export call whose (already received) body is ``body``.

        ``gzip``: the body is gzip-compressed. ``deadline`` is the caller's own
        (``monotonic()`` time), if it has one. ``call``: its protocol and caller,
        and what to do once its body is no longer held.
        """
        call = call or Call()
        try:
            answer = self._admitted(signal, body, json_encoding, deadline, gzip, call)
        finally:
            call.release()
        if answer.message:  # an upstream may echo the Mixpanel token in its error text
            answer = replace(answer, message=self.scrub(answer.message))
        return answer

    def scrub(self, text: str) -> str:
        """``text`` without the Mixpanel token: for every text that leaves the process."""
        return self.consumer.parts.reporter.scrub(text)

    def _admitted(
        self,
        signal: Signal,
        body: bytes,
        json_encoding: bool,
        deadline: Optional[float],
        gzip: bool,
        call: Call,
    ) -> Answer:
        if self.stopping:
            return Answer(Outcome.STOPPING, message="the gateway is shutting down")
        slots = self._slots[call.protocol]
        if not slots.acquire(blocking=False):
            self._count(requests=1, overloaded=1)
            return Answer(
                Outcome.OVERLOADED,
                message="too many Export calls in flight",
                retry_after=_DEFAULT_RETRY_AFTER,
            )
        with self._lock:
            self._active += 1
            self._counts["requests"] += 1
        try:
            return self._export(signal, body, json_encoding, deadline, gzip, call)
        except BadRequest as exc:
            self._count(invalid_requests=1)
            outcome = Outcome.TOO_LARGE if isinstance(exc, TooLarge) else Outcome.INVALID
            return Answer(outcome, message=str(exc))
        except RecursionError:
            self._count(invalid_requests=1)
            return Answer(Outcome.INVALID, message="the request is nested too deeply")
        finally:
            slots.release()
            with self._lock:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def _decoded(
        self,
        signal: Signal,
        body: bytes,
        json_encoding: bool,
        gzip: bool,
        deadline: float,
        call: Call,
    ) -> tuple[Ingested, int, list[str], str]:
        """Decompress, parse, check and translate ``body`` within the memory budget.

        What is reserved is what the work will cost, before it starts: the
        decoded size (a gzip body's claim, grown while inflating if there is
        room), and for OTLP/JSON what its values will cost once parsed. Also the
        digest of its content (a resent call has the same).
        """
        limit = self.limits.max_request_bytes
        size = max(gzip_claim(body, limit), len(body)) if gzip else len(body)
        if size > limit:
            raise TooLarge(f"body decompresses to more than {limit} bytes")
        if json_encoding and not gzip:
            size = max(size, json_cost(body))
        budget = self.budget
        if size > budget.capacity:
            raise TooLarge(
                f"the request would take more than --max-inflight-bytes to parse "
                f"(send smaller batches{'' if not json_encoding else ', or protobuf'})"
            )
        if not budget.acquire(size, deadline, call.peer):
            raise _NoRoom
        held = size
        try:
            if gzip:
                try:
                    body = gunzip(body, size)
                except TooLarge:
                    if size >= limit:
                        raise
                    # The size trailer understated it: grow to the limit if there is room.
                    if not budget.grow(limit - size):
                        raise _NoRoom from None
                    held = limit
                    body = gunzip(body, limit)
                if json_encoding:
                    cost = json_cost(body)
                    if cost > held and not (cost <= budget.capacity and budget.grow(cost - held)):
                        raise _NoRoom
                    held = max(held, cost)
            digest = hashlib.sha256(signal.name.encode() + b"\0" + body).hexdigest()
            if json_encoding:
                request = decode(signal, body, True, self.limits.max_records)
                removed, reasons = check_request(signal, request, self.limits)
            else:
                request, removed, reasons = parse_request(signal, body, self.limits)
            del body
            call.release()  # the body is parsed: its bytes are no longer held
            result = self.front.walker(signal.adapter).read(signal.records(request))
            return result, removed, reasons, digest
        finally:
            budget.release(held, call.peer)

    def _export(
        self,
        signal: Signal,
        body: bytes,
        json_encoding: bool,
        deadline: Optional[float],
        gzip: bool,
        call: Call,
    ) -> Answer:
        try:
            with held_observations() as traits:  # counted once the call is acknowledged
                result, removed, over, digest = self._decoded(
                    signal,
                    body,
                    json_encoding,
                    gzip,
                    reserve_deadline(deadline, self.ack_timeout),
                    call,
                )
        except _NoRoom:
            self._count(overloaded=1)
            return Answer(
                Outcome.OVERLOADED,
                message="the gateway's memory budget is in use (--max-inflight-bytes)",
                retry_after=_DEFAULT_RETRY_AFTER,
            )
        records = result.records + removed
        self._count(records=records, over_limits=removed)
        rejected, reasons = result.rejected + removed, list(result.reasons)
        if result.rejected:
            reasons.insert(0, f"{result.rejected} {signal.name} record(s) with invalid group data")
        if removed:
            reasons.append(f"{removed} {signal.name} record(s) over a limit: {'; '.join(over)}")
        updates, refused, why = self.policy.split(result.updates)
        if refused:
            self._count(refused_by_policy=refused)
            rejected = min(records, rejected + refused)
            reasons.append(f"{refused} update(s) refused by the gateway's policy: {'; '.join(why)}")
        self._count(updates=len(updates))
        if updates:
            receipt = self.consumer.submit(updates)
            if receipt.refused:
                return self._retry(receipt.retry_after, "; ".join(receipt.errors), overloaded=True)
            timeout = self.ack_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - monotonic() - _DEADLINE_MARGIN)
            if not receipt.wait(max(0.0, timeout)):
                return self._retry(
                    receipt.retry_after,
                    f"{len(updates)} update(s) not delivered within {timeout:.1f} s"
                    + (f": {'; '.join(receipt.errors)}" if receipt.errors else ""),
                )
            if receipt.dropped:
                return self._retry(
                    receipt.retry_after,
                    f"{receipt.dropped} update(s) dropped: {'; '.join(receipt.errors)}",
                )
            if receipt.failed:
                self._count(failed_updates=receipt.failed)
                rejected = min(records, rejected + receipt.failed)
                reasons.append(
                    f"{receipt.failed} update(s) refused by Mixpanel: {'; '.join(receipt.errors)}"
                )
        try:  # durable before the answer; a call resent within the window counts once
            TraitFeed.commit(traits, digest, self.dedupe_window)
        except Exception as exc:
            return self._retry(None, f"the call's trait observations were not saved: {exc!r}")
        self._count(accepted=1, rejected_records=rejected)
        return Answer(Outcome.OK, rejected=rejected, message="; ".join(reasons))

    def _retry(
        self, retry_after: Optional[float], message: str, overloaded: bool = False
    ) -> Answer:
        # Over the bound while delivery works: 429; delivery failing: 503.
        if overloaded and not self.consumer.failing:
            self._count(overloaded=1)
            outcome = Outcome.OVERLOADED
        else:
            self._count(unavailable=1)
            outcome = Outcome.UNAVAILABLE
        return Answer(outcome, message=message, retry_after=retry_after or _DEFAULT_RETRY_AFTER)
