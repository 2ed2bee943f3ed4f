"""What each aggregate keeps per time bucket, how buckets merge, and how they are stored.

A *summary* is one bucket's state for one trait of one group. Every
aggregate is mergeable, so a window is the merge of its buckets:

- ``count``, ``sum``: a number; ``min``, ``max``: the extreme; ``avg``: ``[sum, n]``;
- ``first``, ``last``: ``(time, seq, value)`` (``seq``, the arrival order, breaks ties);
- ``count_distinct``: the exact set of values up to ``exact_limit`` per bucket,
  then an HLL sketch (Apache DataSketches, ``lg_k`` 12);
- ``p50``...``p99``: the exact values up to ``exact_limit`` per bucket, then a KLL
  sketch (``k`` 200); a window of exact buckets gives the exact nearest-rank value;
- ``most_frequent``: value -> ``[count, time, seq, value]`` (the latest breaks ties);
- ``distinct_values``: value -> ``(time, seq, value)`` of its latest record, the
  ``limit`` most recent per bucket (enough: a value not among its bucket's
  ``limit`` most recent is not among the window's).

Sketches come from the ``traits`` extra (``datasketches``), imported when first needed.
"""

from __future__ import annotations

import base64
import json
import math
from array import array
from collections.abc import Iterable
from typing import Any, Optional

from .._exceptions import MixpanelException

__all__ = [
    "HLL_LG_K",
    "KLL_K",
    "Aggregator",
    "distinct_key",
    "SKETCHES_EXTRA",
    "make_aggregator",
    "nearest_rank",
    "needs_sketches",
    "require_sketches",
    "sketches_missing",
    "value_key",
]

HLL_LG_K = 12  # 4096 registers: ~1.6 % relative standard error, about 2.5 KB
KLL_K = 200  # ~1.3 % normalized rank error (99 % confidence), a few KB


SKETCHES_EXTRA = (
    "count_distinct and percentile traits need the 'traits' extra: "
    "pip install 'mixpanel-otel[traits]'"
)


def require_sketches() -> Any:
    """The ``datasketches`` module, or a clear error naming the extra to install."""
    try:
        import datasketches
    except ImportError:
        raise MixpanelException(SKETCHES_EXTRA) from None
    return datasketches


def sketches_missing() -> bool:
    """Whether the ``traits`` extra (``datasketches``) cannot be imported."""
    try:
        require_sketches()
    except MixpanelException:
        return True
    return False


def value_key(value: Any) -> Any:
    """How ``most_frequent`` and ``distinct_values`` tell values apart: type-strict
    (``true`` is not ``1``, ``"1"`` is not ``1``) except that ``1`` is ``1.0``."""
    kind = type(value)
    if kind is bool:
        return ("bool", value)
    if kind is float and value.is_integer():
        return int(value)
    return value


def distinct_key(value: Any) -> str:
    """What ``count_distinct`` compares: a string as it is, anything else as JSON."""
    return value if type(value) is str else json.dumps(value, sort_keys=True, default=str)


def nearest_rank(ordered: Any, q: float) -> Any:
    """The smallest value with at least ``q`` of the values at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _fill(sketch: Any, values: Iterable[Any]) -> Any:
    """``sketch`` updated with every value: a sketch made from exact values (a bucket's
    that outgrew ``exact_limit``, or a window's exact buckets merged with sketched ones)."""
    for value in values:
        sketch.update(value)
    return sketch


class Aggregator:
    """One aggregate: add a value to a bucket, merge buckets into a value, store a bucket."""

    name = ""
    empty: Any = None  # the value of a window without records

    def __init__(self, exact_limit: int) -> None:
        self.exact_limit = exact_limit

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        raise NotImplementedError

    def result(self, summaries: Iterable[Any]) -> Any:
        raise NotImplementedError

    def encode(self, summary: Any) -> Any:
        return summary

    def decode(self, data: Any) -> Any:
        return data


class Count(Aggregator):
    name = "count"
    empty = 0

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        return (summary or 0) + 1

    def result(self, summaries: Iterable[Any]) -> Any:
        return sum(summaries)


class Sum(Count):
    name = "sum"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        return value if summary is None else summary + value


class Min(Aggregator):
    name = "min"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        return value if summary is None or value < summary else summary

    def result(self, summaries: Iterable[Any]) -> Any:
        return min(summaries, default=None)


class Max(Aggregator):
    name = "max"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        return value if summary is None or value > summary else summary

    def result(self, summaries: Iterable[Any]) -> Any:
        return max(summaries, default=None)


class Avg(Aggregator):
    name = "avg"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        if summary is None:
            return [value, 1]
        summary[0] += value
        summary[1] += 1
        return summary

    def result(self, summaries: Iterable[Any]) -> Any:
        total, count = 0.0, 0
        for part_total, part_count in summaries:
            total += part_total
            count += part_count
        return total / count if count else None


class First(Aggregator):
    name = "first"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        entry = (time, seq, value)
        return entry if summary is None or entry[:2] < summary[:2] else summary

    def result(self, summaries: Iterable[Any]) -> Any:
        best = min(summaries, key=lambda s: s[:2], default=None)
        return None if best is None else best[2]

    def encode(self, summary: Any) -> Any:
        return list(summary)

    def decode(self, data: Any) -> Any:
        return tuple(data)


class Last(First):
    name = "last"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        entry = (time, seq, value)
        return entry if summary is None or entry[:2] > summary[:2] else summary

    def result(self, summaries: Iterable[Any]) -> Any:
        best = max(summaries, key=lambda s: s[:2], default=None)
        return None if best is None else best[2]


class CountDistinct(Aggregator):
    """An exact set per bucket up to ``exact_limit`` values, then an HLL sketch."""

    name = "count_distinct"
    empty = 0

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        key = distinct_key(value)
        if summary is None:
            return key  # one value: the key alone (a set costs 200 bytes more)
        if type(summary) is str:
            if key == summary:
                return summary
            summary = {summary}
        if type(summary) is set:
            summary.add(key)
            if len(summary) <= self.exact_limit:
                return summary
            return _fill(require_sketches().hll_sketch(HLL_LG_K), summary)
        summary.update(key)
        return summary

    def result(self, summaries: Iterable[Any]) -> Any:
        exact: set[str] = set()
        sketches = []
        for summary in summaries:
            if type(summary) is str:
                exact.add(summary)
            elif type(summary) is set:
                exact |= summary
            else:
                sketches.append(summary)
        if not sketches:
            return len(exact)
        ds = require_sketches()
        union = ds.hll_union(HLL_LG_K)
        for sketch in sketches:
            union.update(sketch)
        if exact:
            union.update(_fill(ds.hll_sketch(HLL_LG_K), exact))
        return int(round(union.get_estimate()))

    def encode(self, summary: Any) -> Any:
        if type(summary) is str:
            return [summary]
        if type(summary) is set:
            return sorted(summary)
        return {"hll": base64.b64encode(summary.serialize_compact()).decode("ascii")}

    def decode(self, data: Any) -> Any:
        if isinstance(data, list):
            return set(data)
        return require_sketches().hll_sketch.deserialize(base64.b64decode(data["hll"]))


class Percentile(Aggregator):
    """The exact values per bucket up to ``exact_limit``, then a KLL sketch."""

    def __init__(self, exact_limit: int, q: float) -> None:
        super().__init__(exact_limit)
        self.q = q
        self.name = f"p{round(q * 100)}"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        if summary is None:
            return float(value)  # one value: the number alone (an array costs 48 bytes more)
        if type(summary) is float:
            summary = array("d", (summary,))
        if type(summary) is array:
            summary.append(value)
            if len(summary) <= self.exact_limit:
                return summary
            return _fill(require_sketches().kll_doubles_sketch(KLL_K), summary)
        summary.update(value)
        return summary

    def result(self, summaries: Iterable[Any]) -> Any:
        exact: list[float] = []
        sketches = []
        for summary in summaries:
            if type(summary) is float:
                exact.append(summary)
            elif type(summary) is array:
                exact.extend(summary)
            else:
                sketches.append(summary)
        if not sketches:
            return nearest_rank(sorted(exact), self.q) if exact else None
        merged = require_sketches().kll_doubles_sketch(KLL_K)
        for sketch in sketches:
            merged.merge(sketch)
        return _fill(merged, exact).get_quantile(self.q, True)

    def encode(self, summary: Any) -> Any:
        if type(summary) is float:
            return [summary]
        if type(summary) is array:
            return summary.tolist()
        return {"kll": base64.b64encode(summary.serialize()).decode("ascii")}

    def decode(self, data: Any) -> Any:
        if isinstance(data, list):
            return array("d", data)
        return require_sketches().kll_doubles_sketch.deserialize(base64.b64decode(data["kll"]))


class MostFrequent(Aggregator):
    """Counts per value; the most frequent value of the window, the latest on a tie."""

    name = "most_frequent"

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        key = value_key(value)
        if summary is None:
            return {key: [1, time, seq, value]}
        entry = summary.get(key)
        if entry is None:
            summary[key] = [1, time, seq, value]
        else:
            entry[0] += 1
            if (time, seq) > (entry[1], entry[2]):
                entry[1:] = [time, seq, value]
        return summary

    def result(self, summaries: Iterable[Any]) -> Any:
        merged: dict[Any, list[Any]] = {}
        for summary in summaries:
            for key, (count, time, seq, value) in summary.items():
                entry = merged.get(key)
                if entry is None:
                    merged[key] = [count, time, seq, value]
                else:
                    entry[0] += count
                    if (time, seq) > (entry[1], entry[2]):
                        entry[1:] = [time, seq, value]
        if not merged:
            return None
        return max(merged.values(), key=lambda entry: (entry[0], entry[1], entry[2]))[3]

    def encode(self, summary: Any) -> Any:
        return list(summary.values())

    def decode(self, data: Any) -> Any:
        return {value_key(entry[3]): list(entry) for entry in data}


class DistinctValues(Aggregator):
    """The distinct values of the window, most recent first, at most ``limit``."""

    name = "distinct_values"

    def __init__(self, exact_limit: int, limit: int) -> None:
        super().__init__(exact_limit)
        self.limit = limit
        self.empty = []

    def add(self, summary: Any, value: Any, time: float, seq: int) -> Any:
        if summary is None:
            summary = {}
        key = value_key(value)
        entry = summary.get(key)
        if entry is None or (time, seq) > entry[:2]:
            summary[key] = (time, seq, value)
            if len(summary) > 2 * self.limit:
                self._trim(summary)
        return summary

    def _trim(self, summary: dict[Any, Any]) -> None:
        keep = sorted(summary.items(), key=lambda item: item[1][:2], reverse=True)[: self.limit]
        summary.clear()
        summary.update(keep)

    def result(self, summaries: Iterable[Any]) -> Any:
        latest: dict[Any, tuple[float, int, Any]] = {}
        for summary in summaries:
            for key, entry in summary.items():
                seen = latest.get(key)
                if seen is None or entry[:2] > seen[:2]:
                    latest[key] = entry
        ordered = sorted(latest.values(), key=lambda entry: entry[:2], reverse=True)
        return [entry[2] for entry in ordered[: self.limit]]

    def encode(self, summary: Any) -> Any:
        return [list(entry) for entry in summary.values()]

    def decode(self, data: Any) -> Any:
        return {value_key(entry[2]): tuple(entry) for entry in data}


_SIMPLE: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (Count, Sum, Min, Max, Avg, First, Last, CountDistinct, MostFrequent)
}


def make_aggregator(name: str, exact_limit: int, limit: Optional[int] = None) -> Aggregator:
    """The aggregator for ``name`` (one of ``_rules.AGGREGATES``); ``limit`` is
    ``distinct_values``'."""
    if name == "distinct_values":
        return DistinctValues(exact_limit, limit or 20)
    if name.startswith("p"):
        return Percentile(exact_limit, int(name[1:]) / 100)
    return _SIMPLE[name](exact_limit)


def needs_sketches(name: str) -> bool:
    """Whether ``name`` may need a sketch (and so the ``traits`` extra)."""
    return name == "count_distinct" or name.startswith("p")
