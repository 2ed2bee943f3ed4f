"""The traits engine: per-group rolling windows, and which ``$set`` is due when.

No threads, no I/O; time comes from an injected clock. A record counts at
its own timestamp (one ahead of the clock counts as now). Each window is
cut into :data:`BUCKETS` buckets of ``window / BUCKETS`` seconds: at time
``now`` a window holds the buckets after ``floor(now / width) - BUCKETS``,
that is the last ``window`` seconds less at most one bucket. A record
already outside its window is ignored (counted as ``late``); a late record
inside it counts. ``lifetime`` is one bucket that never leaves.

Emission is scheduled on a monotonic clock, windows on the wall clock: a
wall clock that steps makes every group due again (within one interval),
and buckets the clock has not reached yet (after it stepped back) wait
outside the value until it does. A group's traits are recomputed when it is
*due*: when a record came in, and each time its oldest bucket leaves a window. Changed values go
out as one ``$set`` (and a ``$unset`` for a trait whose window emptied
that has no value, such as ``min``), at most once per ``interval`` seconds
per group. A group whose windows are all empty is forgotten once its last
values (``0`` for counts) went out, so a quiet group stops being re-sent.

Memory: at most ``max_groups`` groups; past that the least recently
observed one is evicted (its state is lost and its profile keeps the last
values sent until it is seen again).
"""

from __future__ import annotations

import heapq
import math
import threading
import time as _time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Callable, Optional

from .._delivery.stats import TRAIT_COUNTERS
from .._exceptions import MixpanelException
from .._rules import Trait
from .._wire import GroupUpdate, make_update
from .aggregates import Aggregator, make_aggregator, needs_sketches, require_sketches

__all__ = ["BUCKETS", "DEFAULT_EXACT_LIMIT", "DEFAULT_MAX_GROUPS", "TraitEngine"]

BUCKETS = 60
DEFAULT_MAX_GROUPS = 100_000
DEFAULT_EXACT_LIMIT = 256

GroupKey = tuple[str, str]  # (group_key, group_id)
_SETTLE_PER_LOCK = 64
_STEP = 1.0  # seconds the wall clock may drift from the monotonic one before it "stepped"
_UNSENT = object()


class _Group:
    """One group profile's trait state: buckets per trait, what was sent, when it is due."""

    __slots__ = ("key", "states", "sent", "sent_at", "due")

    def __init__(self, key: GroupKey) -> None:
        self.key = key
        # trait position -> [bucket, summary, bucket, summary, ...] in bucket order
        # (a flat list: a third of a dict's memory, and records mostly arrive in order)
        self.states: dict[int, list[Any]] = {}
        self.sent: dict[str, Any] = {}  # property -> value last emitted (None: unset)
        self.sent_at = -math.inf
        self.due: Optional[float] = None


class TraitEngine:
    """Computes traits for many groups and says which updates are due.

    Args:
        interval: least seconds between two emissions for one group (``trait_interval``).
        clock: wall-clock seconds (``time.time``): record times and windows.
        monotonic: seconds for scheduling emission (``time.monotonic``; the fake
            ``clock`` when a test passes one and no ``monotonic``).
        max_groups: groups tracked at once; the least recently observed is evicted past it.
        exact_limit: values a bucket keeps exactly before a sketch takes over
            (``count_distinct`` and percentiles).
    """

    def __init__(
        self,
        traits: Iterable[Trait] = (),
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = _time.time,
        monotonic: Optional[Callable[[], float]] = None,
        max_groups: int = DEFAULT_MAX_GROUPS,
        exact_limit: int = DEFAULT_EXACT_LIMIT,
    ) -> None:
        self.interval = interval
        self.clock = clock
        if monotonic is None:
            monotonic = _time.monotonic if clock is _time.time else clock
        self.monotonic = monotonic
        self._offset = clock() - monotonic()  # wall minus monotonic; changes when the wall steps
        self.max_groups = max_groups
        self.exact_limit = exact_limit
        self.traits: list[Trait] = []
        self._aggregators: list[Aggregator] = []
        self._widths: list[Optional[float]] = []
        self._plan: list[tuple[str, Optional[float], Any]] = []  # (group key, width, add)
        self._positions: dict[str, int] = {}  # signature -> position
        self._by_group_key: dict[str, list[int]] = {}
        self._groups: OrderedDict[GroupKey, _Group] = OrderedDict()
        self._heap: list[tuple[float, int, GroupKey]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.track_changes = False  # set by a store: it saves what changed
        self.changed: set[GroupKey] = set()  # groups changed since the state was last saved
        self.forgotten: set[GroupKey] = set()  # groups dropped since then
        #: What became of records and groups; the consumer's ``stats()`` reports them.
        self.counts = dict.fromkeys(TRAIT_COUNTERS, 0)
        self.add_traits(traits)

    # -- traits ----------------------------------------------------------------------

    def add_traits(self, traits: Iterable[Trait]) -> list[int]:
        """Track ``traits`` (one already tracked, by signature, is shared); their positions.

        Raises :class:`MixpanelException` when a trait would keep a property
        another trait already keeps, or needs sketches that are not installed.
        """
        positions = []
        with self._lock:
            for trait in traits:
                position = self._positions.get(trait.signature)
                if position is None:
                    for other in self.traits:
                        if (other.group_key, other.property) == (trait.group_key, trait.property):
                            raise MixpanelException(
                                f"trait {trait.index}: {trait.property!r} of {trait.group_key!r} "
                                "is already computed differently by another front end's rules"
                            )
                    if needs_sketches(trait.aggregate):
                        require_sketches()
                    position = len(self.traits)
                    self.traits.append(trait)
                    aggregator = make_aggregator(trait.aggregate, self.exact_limit, trait.limit)
                    width = None if trait.window is None else trait.window / BUCKETS
                    self._aggregators.append(aggregator)
                    self._widths.append(width)
                    self._plan.append((trait.group_key, width, aggregator.add))
                    self._positions[trait.signature] = position
                    self._by_group_key.setdefault(trait.group_key, []).append(position)
                positions.append(position)
        return positions

    def position(self, trait: Trait) -> int:
        return self._positions[trait.signature]

    # -- records ---------------------------------------------------------------------

    def observe(self, position: int, group_id: str, time: float, value: Any = None) -> bool:
        """Count ``value`` at ``time`` for the group; False when older than the window."""
        return self.observe_many(time, [(position, group_id, value)]) == 1

    def record(self, time: float, items: list[tuple[int, str, Any]]) -> None:
        """Count one record's observations (what a :class:`TraitFeed` hands over)."""
        self.observe_many(time, items)

    def observe_many(self, time: float, items: Iterable[tuple[int, str, Any]]) -> int:
        """Count one record for several traits: ``(position, group_id, value)`` each.

        One clock reading and one lock for the record; how many were in their window.
        """
        now = self.clock()
        mono = now - self._offset  # the monotonic clock, near enough to schedule by
        if time > now:
            time = now
        counted = 0
        plan, groups, track = self._plan, self._groups, self.track_changes
        with self._lock:
            seq = self._seq
            last_key: Optional[GroupKey] = None
            group: Any = None
            for position, group_id, value in items:
                group_key, width, add = plan[position]
                if width is None:
                    bucket = 0
                else:
                    bucket = int(time // width)
                    if bucket <= int(now // width) - BUCKETS:
                        self.counts["traits_late"] += 1
                        continue
                if last_key is None or group_id != last_key[1] or group_key != last_key[0]:
                    key = (group_key, group_id)
                    last_key = key
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = _Group(key)
                        if len(groups) > self.max_groups:
                            self._evict()
                    else:
                        groups.move_to_end(key)
                    if track:
                        self.changed.add(key)
                    due = group.sent_at + self.interval
                    if due < mono:
                        due = mono
                    if group.due is None or group.due > due:
                        self._schedule(group, due)
                buckets = group.states.get(position)
                if buckets is None:
                    buckets = group.states[position] = []
                elif width is not None and len(buckets) > 4 * BUCKETS:
                    self._expire(buckets, int(now // width) - BUCKETS)
                seq += 1
                if not buckets or buckets[-2] < bucket:
                    buckets += (bucket, add(None, value, time, seq))
                elif buckets[-2] == bucket:
                    buckets[-1] = add(buckets[-1], value, time, seq)
                else:
                    _add_late(buckets, bucket, add, value, time, seq)
                counted += 1
            self._seq = seq
            self.counts["traits_observed"] += counted
        return counted

    def _evict(self) -> None:
        key, _ = self._groups.popitem(last=False)
        self.counts["traits_evicted"] += 1
        if self.track_changes:
            self.changed.discard(key)
            self.forgotten.add(key)

    def _schedule(self, group: _Group, at: float) -> None:
        group.due = at
        heapq.heappush(self._heap, (at, id(group), group.key))

    @staticmethod
    def _expire(buckets: list[Any], last_out: int) -> None:
        """Drop the buckets at or before ``last_out`` (the list is in bucket order)."""
        end = 0
        while end < len(buckets) and buckets[end] <= last_out:
            end += 2
        if end:
            del buckets[:end]

    # -- values ----------------------------------------------------------------------

    def _values(self, group: _Group, now: float) -> dict[str, Any]:
        """Every trait of the group's key at ``now``, dropping buckets that left their window
        (buckets after ``now``, from before the wall clock stepped back, wait)."""
        values = {}
        for position in self._by_group_key.get(group.key[0], ()):
            buckets = group.states.get(position)
            aggregator = self._aggregators[position]
            width = self._widths[position]
            summaries = buckets[1::2] if buckets else ()
            if buckets and width is not None:
                current = int(now // width)
                self._expire(buckets, current - BUCKETS)
                if buckets and buckets[-2] > current:
                    summaries = [
                        summary
                        for bucket, summary in zip(buckets[::2], buckets[1::2])
                        if bucket <= current
                    ]
                else:
                    summaries = buckets[1::2]
            if summaries:
                values[self.traits[position].property] = aggregator.result(summaries)
            else:
                if not buckets:
                    group.states.pop(position, None)
                values[self.traits[position].property] = aggregator.empty
        return values

    def value(self, trait: Trait, group_id: str, now: Optional[float] = None) -> Any:
        """The trait's value for one group now (for tests and ``check``)."""
        now = self.clock() if now is None else now
        with self._lock:
            group = self._groups.get((trait.group_key, group_id))
            if group is None:
                return self._aggregators[self.position(trait)].empty
            return self._values(group, now)[trait.property]

    def _next_expiry(self, group: _Group, now: float) -> Optional[float]:
        """When (wall clock) the group's oldest bucket leaves its window, or a bucket the
        clock has not reached yet enters it (None: nothing will change by itself)."""
        soonest: Optional[float] = None
        for position, buckets in group.states.items():
            width = self._widths[position]
            if width is None or not buckets:
                continue
            at = (buckets[0] + BUCKETS) * width
            if buckets[-2] * width > now:
                waiting = min(b for b in buckets[::2] if b * width > now)
                at = min(at, waiting * width)
            if soonest is None or at < soonest:
                soonest = at
        return soonest

    # -- emission --------------------------------------------------------------------

    def next_due(self) -> Optional[float]:
        """When :meth:`due` next has work (None: no group is due ever)."""
        with self._lock:
            while self._heap:
                at, _, key = self._heap[0]
                group = self._groups.get(key)
                if group is not None and group.due == at:
                    return at
                heapq.heappop(self._heap)
        return None

    def due(self, final: bool = False) -> list[GroupUpdate]:
        """The updates due now: changed traits of the groups whose time has come.

        ``final`` (the process is about to stop): every changed trait, however
        recently its group was sent.
        """
        now, mono = self.clock(), self.monotonic()
        updates: list[GroupUpdate] = []
        stepped = abs(now - mono - self._offset) > _STEP
        if final or stepped:
            self._offset = now - mono
            with self._lock:
                for scheduled in self._groups.values():
                    # Due now (at exit) or within an interval (the wall clock stepped,
                    # so the expiries scheduled by it are wrong); old heap entries go stale.
                    if final:
                        self._schedule(scheduled, mono)
                    elif scheduled.due is not None or scheduled.states:
                        self._schedule(scheduled, max(mono, scheduled.sent_at + self.interval))
        more = True
        while more:  # a few groups per hold of the lock: records are not kept waiting
            with self._lock:
                for _ in range(_SETTLE_PER_LOCK):
                    more = bool(self._heap) and self._heap[0][0] <= mono
                    if not more:
                        break
                    at, _, key = heapq.heappop(self._heap)
                    group = self._groups.get(key)
                    if group is None or group.due != at:
                        continue
                    group.due = None
                    self._settle(group, now, mono, updates, final)
        with self._lock:
            self.counts["traits_emitted"] += len(updates)
        return updates

    def _settle(
        self, group: _Group, now: float, mono: float, updates: list[GroupUpdate], final: bool
    ) -> None:
        values = self._values(group, now)
        sent = group.sent
        changed = {p: v for p, v in values.items() if not _same(sent.get(p, _UNSENT), v)}
        to_set = {p: v for p, v in changed.items() if v is not None}
        to_unset = [p for p, v in changed.items() if v is None and sent.get(p) is not None]
        ready = group.sent_at + self.interval
        if (to_set or to_unset) and mono < ready and not final:
            self._schedule(group, ready)  # changed, but sent too recently
            return
        if to_set or to_unset:
            group_key, group_id = group.key
            if to_set:
                updates.append(make_update(group_key, group_id, "$set", to_set, now))
            if to_unset:
                updates.append(make_update(group_key, group_id, "$unset", to_unset, now))
            sent.update(changed)
            group.sent_at = mono
            if self.track_changes:
                self.changed.add(group.key)
        expiry = self._next_expiry(group, now)
        if expiry is not None:
            at = mono + max(0.0, expiry - now)
            self._schedule(group, max(at, group.sent_at + self.interval))
        elif not group.states:
            # Every window is empty and its values went out: forget the group.
            del self._groups[group.key]
            if self.track_changes:
                self.changed.discard(group.key)
                self.forgotten.add(group.key)

    def unsend(self, updates: Iterable[GroupUpdate]) -> None:
        """``updates`` were not delivered (nor spooled): what they set counts as unsent,
        so it goes out again (within an interval) unless a newer value replaced it."""
        mono = self.monotonic()
        with self._lock:
            for update in updates:
                group = self._groups.get((update.group_key, str(update.group_id)))
                if group is None:
                    continue
                properties = (
                    update.payload if update.op == "$set" else dict.fromkeys(update.payload)
                )
                for prop, value in properties.items():
                    if prop in group.sent and _same(group.sent[prop], value):
                        del group.sent[prop]
                if self.track_changes:
                    self.changed.add(group.key)
                if group.due is None or group.due > group.sent_at + self.interval:
                    self._schedule(group, max(mono, group.sent_at + self.interval))

    # -- state (for the store) -------------------------------------------------------

    def tracked(self) -> int:
        return len(self._groups)

    def snapshot(self) -> dict[str, int]:
        """The counters now (:data:`~mixpanel_otel._delivery.stats.TRAIT_COUNTERS`)."""
        with self._lock:
            return dict(self.counts)

    def export_groups(
        self, keys: Iterable[GroupKey], unconfirmed: Optional[dict[GroupKey, set[str]]] = None
    ) -> list[tuple[GroupKey, dict[str, Any]]]:
        """The stored form of the given groups (those still tracked). Values in
        ``unconfirmed`` (handed over, not yet delivered or spooled) are stored as unsent."""
        rows = []
        unconfirmed = unconfirmed or {}
        wall_minus_mono = self.clock() - self.monotonic()
        with self._lock:
            for key in keys:
                group = self._groups.get(key)
                if group is None:
                    continue
                states = {
                    self.traits[position].signature: [
                        [bucket, self._aggregators[position].encode(summary)]
                        for bucket, summary in zip(buckets[::2], buckets[1::2])
                    ]
                    for position, buckets in group.states.items()
                }
                pending = unconfirmed.get(key, ())
                sent = {p: v for p, v in group.sent.items() if p not in pending}
                sent_at = group.sent_at + wall_minus_mono if group.sent_at > -math.inf else None
                rows.append((key, {"sent": sent, "sent_at": sent_at, "states": states}))
        return rows

    def import_group(self, key: GroupKey, data: dict[str, Any]) -> None:
        """Restore one stored group (states of traits no longer defined are dropped);
        it is due at once, so what changed while the process was down goes out."""
        now, mono = self.clock(), self.monotonic()
        with self._lock:
            group = _Group(key)
            group.sent = dict(data.get("sent") or {})
            sent_at = data.get("sent_at")  # wall clock on disk, monotonic in memory
            group.sent_at = -math.inf if sent_at is None else mono - max(0.0, now - sent_at)
            for signature, buckets in (data.get("states") or {}).items():
                position = self._positions.get(signature)
                if position is None:
                    continue
                aggregator = self._aggregators[position]
                state: list[Any] = []
                for bucket, summary in sorted(buckets, key=lambda pair: int(pair[0])):
                    state += (int(bucket), aggregator.decode(summary))
                group.states[position] = state
                if aggregator.name in ("first", "last"):
                    self._seq = max([self._seq, *(s[1] for s in state[1::2])])
            if key in self._groups:
                del self._groups[key]
            self._groups[key] = group
            if len(self._groups) > self.max_groups:
                self._evict()
            self._schedule(group, max(mono, group.sent_at + self.interval))

    def release(self) -> None:
        """Drop every group's state (at exit, once it is saved and sent; or when another
        process aggregates the shared state)."""
        with self._lock:
            self._groups.clear()
            self._heap.clear()
            self.changed.clear()
            self.forgotten.clear()

    def signature_positions(self) -> dict[str, int]:
        """Trait signature -> position, for observations logged by other processes."""
        return dict(self._positions)

    def clear(self) -> None:
        """Forget every group (a forked child starts empty; its parent's lock may be held)."""
        self._lock = threading.Lock()
        self._groups.clear()
        self._heap.clear()
        self.changed.clear()
        self.forgotten.clear()
        self.counts = dict.fromkeys(TRAIT_COUNTERS, 0)  # from 0, like the consumer's


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (``1 == 1.0 == True`` would hide a change of type)."""
    return a is b or (type(a) is type(b) and a == b)


def _add_late(buckets: list[Any], bucket: int, add: Any, value: Any, time: float, seq: int) -> None:
    """A record for a bucket before the newest: find it (or its place) from the end."""
    index = len(buckets) - 2
    while index >= 0 and buckets[index] > bucket:
        index -= 2
    if index >= 0 and buckets[index] == bucket:
        buckets[index + 1] = add(buckets[index + 1], value, time, seq)
    else:
        buckets[index + 2 : index + 2] = [bucket, add(None, value, time, seq)]
