"""The one path from a front end's records to group updates: read, translate, report.

Every front end (stdlib handler, structlog processor, span and log
exporters, the gateway's OTLP receiver) hands its records to a
:class:`Walker`. An :class:`Adapter` says how to read one kind of record:
its attributes, resource attributes, time, ``@`` specials and
``mixpanel.group`` span events. The walker does the rest the same way for
all of them: translate, count and warn about bad records, and enqueue.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, TypeVar

from ._wire import GroupUpdate, iso_utc

if TYPE_CHECKING:
    from ._frontend import FrontEnd

__all__ = ["EMPTY", "Adapter", "Event", "Ingested", "Walker"]

R = TypeVar("R")
#: A ``mixpanel.group`` span event: its attributes and time (seconds).
Event = tuple[Mapping[str, Any], float]
EMPTY: Mapping[str, Any] = {}
_MAX_REASONS = 5  # reasons kept per batch, for the gateway's partial-success answer


class Adapter(Generic[R]):
    """How to read one kind of record. Stateless; one instance per kind.

    ``attributes`` and ``time`` are required; the rest default to what a
    record without them has. ``has_events`` is True when :meth:`events` can
    yield anything (so the walker skips the call for other kinds).
    """

    has_events = False

    def attributes(self, record: R) -> Mapping[str, Any]:
        """The record's attributes (``extra`` of a stdlib record, a span's attributes)."""
        raise NotImplementedError

    def skip(self, record: R) -> bool:
        """True for a record no front end may read: the package's own logging."""
        return False

    def time(self, record: R) -> float:
        """When the record happened, in seconds since the epoch (updates carry it)."""
        raise NotImplementedError

    def resource(self, record: R) -> Mapping[str, Any]:
        """Attributes of what produced the record (``service.name``...), read by rules."""
        return EMPTY

    def special(self, record: R, name: str, time: float) -> Any:
        """The ``@`` value ``name`` (:data:`~mixpanel_otel._rules.SPECIALS`), None if
        the record has none. ``time`` is :meth:`time`'s answer; by default it is
        both ``@start_time`` and ``@end_time``."""
        if name == "@start_time" or name == "@end_time":
            return iso_utc(time)
        return None

    def events(self, record: R, time: float) -> Iterable[Event]:
        """The record's ``mixpanel.group`` span events, each one more update."""
        return ()

    def describe(self, record: R) -> str:
        """The record, for a warning a person reads (``span 'checkout' (trace ...)``)."""
        raise NotImplementedError


@dataclass
class Ingested:
    """What a batch of records produced."""

    records: int = 0
    updates: list[GroupUpdate] = field(default_factory=list)
    rejected: int = 0  # records with invalid group data
    reasons: list[str] = field(default_factory=list)  # the first few, naming the record

    def reject(self, what: str, errors: list[str]) -> None:
        self.rejected += 1
        if len(self.reasons) < _MAX_REASONS:
            self.reasons.append(f"{what}: {'; '.join(errors)}")


class Walker(Generic[R]):
    """Reads records of one kind through a front end's translator.

    How a record is read is decided once, here: without rules and span
    events, only the tags and the flat form are looked at, and the resource
    and specials are never built.

    Args:
        front: the translator, consumer and bad-record reporting.
        adapter: how to read this kind of record.
    """

    def __init__(self, front: FrontEnd, adapter: Adapter[R]) -> None:
        self.front = front
        self.adapter = adapter
        self._tags = front.translator.tags
        tags_only = not front.translator.reads_records and not adapter.has_events
        self._read: Callable[[R, Optional[Ingested]], list[GroupUpdate]] = (
            self._make_read_tags() if tags_only else self._read_all
        )
        #: Translate, report and enqueue one record (a logging call). Never raises.
        self.ingest_one: Callable[[R], None] = self._make_ingest_one()

    def _make_ingest_one(self) -> Callable[[R], None]:
        read, enqueue, failed = self._read, self.front.consumer.enqueue, self._failed

        def ingest_one(record: R) -> None:
            try:
                updates = read(record, None)
                if updates:
                    enqueue(updates)
            except Exception as exc:  # never raise into the application's logging call
                failed(record, exc, None)

        return ingest_one

    def _make_read_tags(self) -> Callable[[R, Optional[Ingested]], list[GroupUpdate]]:
        """The reader for tags and the flat form only: the path of every logging call,
        so a record without a group tag costs four dict lookups (names bound here)."""
        adapter = self.adapter
        attributes_of, skip, time_of = adapter.attributes, adapter.skip, adapter.time
        tags, report = self._tags, self._report

        def read_tags(record: R, result: Optional[Ingested]) -> list[GroupUpdate]:
            attributes = attributes_of(record)
            if not (  # literal names (FLAT_GROUP_ID...): this runs on every logging call
                "group_id" in attributes
                or "group_key" in attributes
                or "mixpanel.group_id" in attributes
                or "mixpanel.group_key" in attributes
            ) or skip(record):
                return []
            errors: list[str] = []
            ignored: list[str] = []
            updates = tags(attributes, time_of(record), errors, ignored)
            if errors or ignored:
                report(record, errors, ignored, result)
            return updates

        return read_tags

    def ingest(self, records: Iterable[R]) -> Ingested:
        """Translate, report and enqueue a batch (an export); what it produced."""
        result = self.read(records)
        if result.updates:
            self.front.consumer.enqueue(result.updates)
        return result

    def read(self, records: Iterable[R]) -> Ingested:
        """Translate and report a batch without enqueueing it (for a caller that
        submits the updates itself and waits for them: the gateway)."""
        result = Ingested()
        updates = result.updates
        read = self._read
        for record in records:
            result.records += 1
            try:
                updates += read(record, result)
            except Exception as exc:  # one broken record never costs the others
                self._failed(record, exc, result)
        return result

    def _read_all(self, record: R, result: Optional[Ingested]) -> list[GroupUpdate]:
        adapter = self.adapter
        if adapter.skip(record):
            return []
        attributes = adapter.attributes(record)
        time = adapter.time(record)
        resource = adapter.resource(record)
        special = partial(adapter.special, record, time=time)
        # Every record is read here once (attributes, resource, time, specials); the
        # translator also counts it for the computed traits (``Translator.traits``,
        # which rule out the tags-only path in __init__ too).
        errors: list[str] = []
        ignored: list[str] = []
        updates = self.front.translator.translate(
            attributes, time, resource, special, errors, ignored
        )
        if adapter.has_events:
            tags = self._tags
            for event_attributes, event_time in adapter.events(record, time):
                updates += tags(event_attributes, event_time, errors, ignored)
        if errors or ignored:
            self._report(record, errors, ignored, result)
        return updates

    def _report(
        self, record: R, errors: list[str], ignored: list[str], result: Optional[Ingested]
    ) -> None:
        front = self.front
        if ignored:
            front.report_ignored(len(ignored))
        if errors:
            what = self.adapter.describe(record)
            front.report_invalid(what, errors)
            if result is not None:
                result.reject(what, errors)

    def _failed(self, record: R, exc: Exception, result: Optional[Ingested]) -> None:
        try:
            what = self.adapter.describe(record)
        except Exception:
            what = f"a record of type {type(record).__name__}"
        self.front.report_invalid(what, [repr(exc)])
        if result is not None:
            result.reject(what, [repr(exc)])
