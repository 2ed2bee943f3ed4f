"""The traits engine against a brute-force recomputation, with a fake clock."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixpanel_otel._delivery.consumer import Consumer
from mixpanel_otel._delivery.stats import TRAIT_COUNTERS
from mixpanel_otel._exceptions import MixpanelException
from mixpanel_otel._rules import AGGREGATES, Trait, load_all
from mixpanel_otel._traits.aggregates import distinct_key, nearest_rank
from mixpanel_otel._traits.engine import BUCKETS, TraitEngine
from mixpanel_otel._transport import Answer, Outcome

GROUPS = ("acme", "globex", "initech")
WINDOWS = {"10s": 10.0, "1m": 60.0, "lifetime": None}
KLL_RANK_ERROR = 0.0133  # kll_doubles_sketch.get_normalized_rank_error(200, False)
HLL_ERROR = 0.047  # hll_sketch.get_rel_err(True, True, 12, 3): three standard deviations


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _traits(window: str) -> list[Trait]:
    tables = []
    for aggregate in AGGREGATES:
        table = {
            "property": f"{aggregate}_{window}",
            "group_key": "company",
            "group_id": "tenant.id",
            "aggregate": aggregate,
            "window": window,
        }
        if aggregate != "count":
            table["of"] = "user" if aggregate in ("count_distinct", "first", "last") else "v"
        if aggregate in ("most_frequent", "distinct_values"):
            table["of"] = "tag"
        if aggregate == "distinct_values":
            table["limit"] = 3
        tables.append(table)
    return load_all({"trait": tables}).traits


def _in_window(trait: Trait, time: float, now: float) -> bool:
    if trait.window is None:
        return True
    width = trait.window / BUCKETS
    return int(time // width) > int(now // width) - BUCKETS


def _brute(trait: Trait, records: list[dict[str, Any]], group: str, now: float) -> Any:
    """The trait recomputed from every record seen by ``now``, the slow way."""
    rows = [
        r
        for r in records
        if r["group"] == group and r["arrival"] <= now and _in_window(trait, r["time"], now)
    ]
    values = [r[trait.of] for r in rows] if trait.of else []
    aggregate = trait.aggregate
    if aggregate == "count":
        return len(rows)
    if aggregate == "count_distinct":
        return len({distinct_key(v) for v in values})
    if aggregate == "sum":
        return sum(values)
    if aggregate == "distinct_values":
        latest: dict[Any, dict[str, Any]] = {}
        for r in sorted(rows, key=lambda r: (r["time"], r["seq"])):
            latest[_tag_identity(r["tag"])] = r
        newest_first = sorted(latest.values(), key=lambda r: (r["time"], r["seq"]), reverse=True)
        return [r["tag"] for r in newest_first[: trait.limit]]
    if not rows:
        return None
    if aggregate == "min":
        return min(values)
    if aggregate == "max":
        return max(values)
    if aggregate == "avg":
        return sum(values) / len(values)
    if aggregate == "first":
        return min(rows, key=lambda r: (r["time"], r["seq"]))[trait.of]
    if aggregate == "last":
        return max(rows, key=lambda r: (r["time"], r["seq"]))[trait.of]
    if aggregate == "most_frequent":
        counts: dict[Any, int] = {}
        for r in rows:
            counts[_tag_identity(r["tag"])] = counts.get(_tag_identity(r["tag"]), 0) + 1
        top = max(counts.values())
        tied = [r for r in rows if counts[_tag_identity(r["tag"])] == top]
        return max(tied, key=lambda r: (r["time"], r["seq"]))["tag"]
    return nearest_rank(sorted(values), int(aggregate[1:]) / 100)


def _tag_identity(value: Any) -> tuple[str, Any]:
    """Which values are one: true is not 1, "1" is not 1, 1 is 1.0."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    return ("string", value)


def _agrees(trait: Trait, got: Any, want: Any, values: list[float], exact: bool) -> bool:
    aggregate = trait.aggregate
    if aggregate == "count_distinct" and not exact:
        return abs(got - want) <= max(1.0, HLL_ERROR * want)
    if aggregate.startswith("p") and not exact and want is not None:
        # Within the sketch's rank error: some rank of ``got`` is near q.
        q, n = int(aggregate[1:]) / 100, len(values)
        below = sum(v < got for v in values) / n
        at_or_below = sum(v <= got for v in values) / n
        slack = KLL_RANK_ERROR * 3 + 1 / n
        return below - slack <= q <= at_or_below + slack
    if aggregate in ("most_frequent", "distinct_values"):
        return json.dumps(got) == json.dumps(want)  # type-strict: true is not 1
    if isinstance(want, float) or isinstance(got, float):
        return want is not None and got is not None and math.isclose(got, want, rel_tol=1e-9)
    return bool(got == want)


record = st.fixed_dictionaries(
    {
        # Whole seconds hit the windows' edges often; fractions fall inside buckets.
        "advance": st.one_of(st.integers(0, 12), st.floats(0, 3), st.floats(0, 90)),
        "group": st.sampled_from(GROUPS),
        "offset": st.one_of(st.integers(-65, 1), st.floats(-100, 2)),  # late, or ahead
        "v": st.one_of(st.integers(-50, 50), st.floats(-1e3, 1e3, allow_nan=False)),
        "user": st.sampled_from(["u1", "u2", "u3", "u4", "u5", "u6", "u7"]),
        "tag": st.sampled_from([1, 1.0, True, "1", "a", "b", 2, False, 0]),
        "check": st.booleans(),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    window=st.sampled_from(sorted(WINDOWS)),
    exact_limit=st.sampled_from([2, 256]),
    stream=st.lists(record, min_size=1, max_size=60),
)
def test_engine_equals_brute_force_over_the_window(
    window: str, exact_limit: int, stream: list[dict[str, Any]]
) -> None:
    clock = Clock()
    traits = _traits(window)
    engine = TraitEngine(traits, interval=5.0, clock=clock, exact_limit=exact_limit)
    seen: list[dict[str, Any]] = []
    exact = exact_limit >= 60
    for seq, item in enumerate(stream):
        clock.now += item["advance"]
        time = min(clock.now + item["offset"], clock.now)  # ahead of the clock counts as now
        row = {**item, "time": time, "arrival": clock.now, "seq": seq}
        accepted = [
            engine.observe(engine.position(t), item["group"], clock.now + item["offset"], row[t.of])
            if t.of
            else engine.observe(engine.position(t), item["group"], clock.now + item["offset"])
            for t in traits
        ]
        assert len(set(accepted)) == 1  # the same record is late for all or for none
        if accepted[0]:
            seen.append(row)
        else:
            assert not _in_window(traits[0], time, clock.now)
        if item["check"]:
            for group in GROUPS:
                for trait in traits:
                    got = engine.value(trait, group)
                    want = _brute(trait, seen, group, clock.now)
                    values = [
                        r["v"]
                        for r in seen
                        if r["group"] == group and _in_window(trait, r["time"], clock.now)
                    ]
                    assert _agrees(trait, got, want, values, exact), (trait, group, got, want)
        engine.due()  # emission forgets quiet groups: values must not change by it


def test_a_window_keeps_the_last_window_less_at_most_one_bucket() -> None:
    clock = Clock(0.0)
    (trait,) = load_all(
        {
            "trait": [
                {
                    "property": "n",
                    "group_key": "c",
                    "group_id": "g",
                    "aggregate": "count",
                    "window": "60s",
                }
            ]
        }
    ).traits
    engine = TraitEngine([trait], clock=clock)
    engine.observe(0, "acme", 0.5)
    clock.now = 59.9
    assert engine.value(trait, "acme") == 1
    clock.now = 60.0  # the bucket [0, 1) has left
    assert engine.value(trait, "acme") == 0
    assert engine.observe(0, "acme", 0.5) is False  # older than the window: ignored
    assert engine.counts["traits_late"] == 1
    assert engine.observe(0, "acme", 1.0) is True  # late but inside: counted
    assert engine.value(trait, "acme") == 1


def _one(
    aggregate: str = "count", window: str = "60s", of: Optional[str] = None, **more: Any
) -> Trait:
    table: dict[str, Any] = {
        "property": "n",
        "group_key": "company",
        "group_id": "tenant",
        "aggregate": aggregate,
        "window": window,
        **more,
    }
    if of:
        table["of"] = of
    return load_all({"trait": [table]}).traits[0]


def _sets(updates: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(u.group_id, u.op, u.payload) for u in updates]


class TestEmission:
    def test_a_change_goes_out_at_most_once_per_interval_per_group(self) -> None:
        clock = Clock(1000.0)
        engine = TraitEngine([_one()], interval=10.0, clock=clock)
        engine.observe(0, "acme", 1000.0)
        assert _sets(engine.due()) == [("acme", "$set", {"n": 1})]
        engine.observe(0, "acme", 1000.0)
        engine.observe(0, "acme", 1000.0)
        clock.now = 1005.0
        assert engine.due() == []  # changed, but sent 5 s ago
        assert engine.next_due() == 1010.0
        clock.now = 1010.0
        assert _sets(engine.due()) == [("acme", "$set", {"n": 3})]
        clock.now = 1020.0
        assert engine.due() == []  # nothing changed: nothing sent

    def test_a_quiet_group_decays_to_zero_then_is_not_sent_again(self) -> None:
        clock = Clock(1000.0)
        engine = TraitEngine([_one()], interval=1.0, clock=clock)
        engine.observe(0, "acme", 1000.0)
        assert _sets(engine.due()) == [("acme", "$set", {"n": 1})]
        clock.now = engine.next_due() or 0  # the first bucket leaves the window
        assert clock.now == pytest.approx(1060.0)
        assert _sets(engine.due()) == [("acme", "$set", {"n": 0})]
        assert engine.next_due() is None
        assert engine.tracked() == 0
        clock.now += 3600
        assert engine.due() == []

    def test_a_window_that_empties_unsets_a_trait_without_a_value(self) -> None:
        clock = Clock(1000.0)
        engine = TraitEngine([_one("max", of="v")], interval=1.0, clock=clock)
        engine.observe(0, "acme", 1000.0, 7)
        assert _sets(engine.due()) == [("acme", "$set", {"n": 7})]
        clock.now = 1061.0
        assert _sets(engine.due()) == [("acme", "$unset", ["n"])]

    def test_traits_of_one_group_key_go_out_together_zeros_included(self) -> None:
        traits = load_all(
            {
                "trait": [
                    {
                        "property": "requests",
                        "group_key": "company",
                        "group_id": "t",
                        "aggregate": "count",
                        "window": "1h",
                    },
                    {
                        "property": "errors",
                        "group_key": "company",
                        "group_id": "t",
                        "aggregate": "count",
                        "window": "1h",
                        "when": {"@status": "ERROR"},
                    },
                ]
            }
        ).traits
        clock = Clock(1000.0)
        engine = TraitEngine(traits, clock=clock)
        engine.observe(0, "acme", 1000.0)
        assert _sets(engine.due()) == [("acme", "$set", {"requests": 1, "errors": 0})]

    def test_the_least_recently_observed_group_is_evicted_past_the_cap(self) -> None:
        clock = Clock(1000.0)
        engine = TraitEngine([_one(window="lifetime")], clock=clock, max_groups=2)
        for group in ("a", "b", "a", "c"):
            engine.observe(0, group, 1000.0)
        assert engine.tracked() == 2
        assert engine.counts["traits_evicted"] == 1
        trait = engine.traits[0]
        assert (engine.value(trait, "a"), engine.value(trait, "b"), engine.value(trait, "c")) == (
            2,
            0,
            1,
        )

    def test_a_record_ahead_of_the_clock_counts_as_now(self) -> None:
        clock = Clock(1000.0)
        engine = TraitEngine([_one("last", of="v")], clock=clock)
        engine.observe(0, "acme", 5000.0, "future")
        engine.observe(0, "acme", 999.0, "past")
        assert engine.value(engine.traits[0], "acme") == "future"


class _Accepting:
    """A transport that accepts every request (the test counts, it does not deliver)."""

    def post(self, path: str, body: str, auth: Any = None, timeout: Any = None) -> Answer:
        return Answer(Outcome.OK)


class TestStats:
    def test_late_records_evictions_and_emitted_updates_show_in_the_consumers_stats(
        self,
    ) -> None:
        clock = Clock(1000.0)
        consumer = Consumer(
            "unit-token",
            "memory://",
            transport=_Accepting(),
            clock=clock,
            threads=False,
            flush_on_sigterm=False,
        )
        zeros = dict.fromkeys(TRAIT_COUNTERS, 0)
        assert {key: consumer.stats()[key] for key in TRAIT_COUNTERS} == zeros  # no traits
        engine = TraitEngine([_one()], interval=1.0, clock=clock, max_groups=1)
        consumer.trait_engine = engine  # what the traits runtime does for a front end's traits
        engine.observe(0, "acme", 1000.0)
        assert engine.observe(0, "acme", 900.0) is False  # older than its 60 s window: late
        engine.observe(0, "globex", 999.0)  # past max_groups=1: acme is evicted
        consumer.enqueue(engine.due())
        assert consumer.flush(5.0)
        stats = consumer.stats()
        assert {key: stats[key] for key in TRAIT_COUNTERS} == {
            "traits_observed": 2,
            "traits_late": 1,
            "traits_evicted": 1,
            "traits_emitted": 1,  # globex's $set; acme's state left before it went out
        }
        assert stats["sent"] == 1
        engine.clear()  # in a forked child: from 0, like the consumer's own counters
        assert {key: consumer.stats()[key] for key in TRAIT_COUNTERS} == zeros


class TestState:
    def test_export_and_import_keep_every_aggregate(self) -> None:
        clock = Clock(1000.0)
        traits = _traits("1m")
        engine = TraitEngine(traits, clock=clock, exact_limit=2)
        for i in range(10):
            for trait in traits:
                engine.observe(
                    engine.position(trait), "acme", 1000.0 - i, f"u{i}" if trait.of == "user" else i
                )
        rows = engine.export_groups([("company", "acme")])
        other = TraitEngine(traits, clock=clock, exact_limit=2)
        for key, data in rows:
            other.import_group(key, __import__("json").loads(__import__("json").dumps(data)))
        for trait in traits:
            assert other.value(trait, "acme") == engine.value(trait, "acme"), trait

    def test_two_front_ends_share_a_trait_and_may_not_redefine_it(self) -> None:
        engine = TraitEngine([_one()])
        assert engine.add_traits([_one()]) == [0]
        with pytest.raises(MixpanelException, match="already computed differently"):
            engine.add_traits([_one(window="1h")])


BAD_TABLES = """
[[trait]]
property = "ok"
group_key = "company"
group_id = "tenant.id"
aggregate = "count"
window = "7d"

[[trait]]
property = "a"
group_key = "company"
group_id = "tenant.id"
aggregate = "median"
of = "x"
window = "7d"

[[trait]]
property = "b"
group_key = "company"
group_id = "tenant.id"
aggregate = "sum"
window = "1h"

[[trait]]
property = "c"
group_key = "company"
group_id = "tenant.id"
aggregate = "max"
of = "x"
window = "7 days"
"""


class TestTables:
    def test_each_bad_table_gives_one_line(self, tmp_path) -> None:
        path = tmp_path / "rules.toml"
        path.write_text(BAD_TABLES)
        with pytest.raises(MixpanelException) as caught:
            load_all(str(path))
        lines = str(caught.value).splitlines()
        assert lines == [
            "rules: trait 2, key 'aggregate': unknown aggregate 'median' (known: count, sum, "
            "min, max, avg, count_distinct, first, last, p50, p90, p95, p99, most_frequent, "
            "distinct_values)",
            "rules: trait 3, key 'of': missing: sum needs the attribute it aggregates",
            "rules: trait 4, key 'window': bad window '7 days' (expected <n>s, <n>m, <n>h, "
            '<n>d, e.g. "7d", or "lifetime")',
        ]

    def test_check_rules_prints_them_one_a_line(self, tmp_path) -> None:
        from mixpanel_otel._check import run_check

        path = tmp_path / "rules.toml"
        path.write_text(BAD_TABLES)
        check = run_check("token", "http://127.0.0.1:9", rules=str(path))
        failures = [line for line in check.lines if line.lstrip().startswith("FAIL  rules")]
        assert len(failures) == 3 and not check.ok
        assert "trait 3, key 'of'" in failures[1]

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ({"window": "0d"}, "bad window"),
            ({"window": "lifetime", "of": "x"}, "count counts records"),
            ({"group_id": ""}, "group_id.*non-empty"),
            ({"when": {"@nope": 1}}, "unknown '@nope'"),
            ({"every": "1d"}, "unknown key"),
            ({"limit": 5}, "only distinct_values takes a limit"),
            ({"aggregate": "distinct_values", "of": "x", "limit": 256}, "from 1 to 255"),
            ({"aggregate": "distinct_values", "of": "x", "limit": 0}, "from 1 to 255"),
            ({"when": {"x": {"gte": [1]}}}, "when.x.gte.*number or a string"),
            ({"when": {"x": {"in": 3}}}, "when.x.in.*list"),
            ({"when": {"x": {"exists": 1}}}, "exists takes true or false"),
            ({"when": {"x": {"like": "a"}}}, "unknown operator 'like'"),
        ],
    )
    def test_other_mistakes_are_named(self, table: dict[str, Any], message: str) -> None:
        base = {"property": "n", "group_key": "c", "group_id": "t", "aggregate": "count"}
        base["window"] = "1d"
        with pytest.raises(MixpanelException, match=message):
            load_all({"trait": [{**base, **table}]})

    def test_windows_and_a_property_kept_twice(self) -> None:
        base = {"group_key": "c", "group_id": "t", "aggregate": "count"}
        traits = load_all(
            {
                "trait": [
                    {"property": "a", "window": "90s", **base},
                    {"property": "b", "window": "2h", **base},
                    {"property": "c", "window": "lifetime", **base},
                ]
            }
        ).traits
        assert [t.window for t in traits] == [90.0, 7200.0, None]
        with pytest.raises(MixpanelException, match="is kept by trait 1"):
            load_all({"trait": [{"property": "a", "window": "1d", **base}] * 2})


class TestStore:
    def test_saved_groups_and_the_cursor_come_back_and_the_log_after_it(self, tmp_path) -> None:
        from mixpanel_otel._traits.store import TraitStore

        clock = Clock(1000.0)
        traits = _traits("1m")
        engine = TraitEngine(traits, clock=clock)
        store = TraitStore(str(tmp_path), "token\nhost")
        sig = traits[0].signature  # count
        assert store.append([(999.0, [(sig, "a", None)]), (999.0, [(sig, "b", None)])])
        assert store.append([(999.0, [(sig, "a", None)])])
        ((first, batch), (second, _)) = store.read_after(0)
        assert first < second and batch == [
            [999.0, [[sig, "a", None]]],
            [999.0, [[sig, "b", None]]],
        ]
        for _, observations in batch:
            engine.observe_many(999.0, [(0, observations[0][1], None)])
        store.save(first, engine.export_groups([("company", "a"), ("company", "b")]), [])
        assert [number for number, _ in store.read_after(0)] == [second]  # included: deleted
        cursor, groups = TraitStore(str(tmp_path), "token\nhost").load()
        assert cursor == first and sorted(key for key, _ in groups) == [
            ("company", "a"),
            ("company", "b"),
        ]
        assert TraitStore(str(tmp_path), "other\nhost").load() == (0, [])

    def test_one_aggregator_at_a_time_and_a_resent_digest_counts_once(self, tmp_path) -> None:
        from mixpanel_otel._traits.store import TraitStore

        one, two = TraitStore(str(tmp_path), "s"), TraitStore(str(tmp_path), "s")
        assert one.try_lead() and not two.try_lead()
        one.resign()
        assert two.try_lead() and not one.try_lead()
        batch = [(1.0, [("sig", "a", None)])]
        assert one.append(batch, "digest", 600.0, now=1000.0)
        assert not two.append(batch, "digest", 600.0, now=1599.0)  # within the window
        assert two.append(batch, "digest", 600.0, now=1601.0)  # past it: a new call
        assert len(one.read_after(0)) == 2


def test_the_final_emission_sends_every_change_however_recent() -> None:
    clock = Clock(1000.0)
    engine = TraitEngine([_one()], interval=60.0, clock=clock)
    engine.observe(0, "acme", 1000.0)
    assert _sets(engine.due()) == [("acme", "$set", {"n": 1})]
    engine.observe(0, "acme", 1000.0)
    clock.now = 1001.0
    assert engine.due() == []
    assert _sets(engine.due(final=True)) == [("acme", "$set", {"n": 2})]


def test_a_rules_when_can_test_an_at_special() -> None:
    from mixpanel_otel._translate import from_rule

    (rule,) = load_all(
        {
            "rule": [
                {
                    "group_key": "company",
                    "group_id": "tenant",
                    "when": {"@status": "ERROR"},
                    "set": {"failed": "@name"},
                }
            ]
        }
    ).rules
    specials = {"@status": "ERROR", "@name": "checkout"}
    updates = from_rule(rule, {"tenant": "acme"}, {}, 1.0, specials.get, None, [])
    assert [(u.op, u.payload) for u in updates] == [("$set", {"failed": "checkout"})]
    specials["@status"] = "OK"
    assert from_rule(rule, {"tenant": "acme"}, {}, 1.0, specials.get, None, []) == []


def _identity(value: Any) -> Any:
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, str):
        return ("string", value)
    return ("other", repr(value))


def _brute_operator(op: str, operand: Any, value: Any) -> bool:
    """The ``when`` operators, the slow and obvious way."""
    present = value is not None
    if op == "eq":
        return present and _identity(value) == _identity(operand)
    if op == "ne":
        return not (present and _identity(value) == _identity(operand))
    if op == "in":
        return present and _identity(value) in [_identity(x) for x in operand]
    if op == "not_in":
        return not (present and _identity(value) in [_identity(x) for x in operand])
    if op == "exists":
        return present is operand
    if op == "contains":
        if isinstance(value, str):
            return isinstance(operand, str) and operand in value
        if isinstance(value, (list, tuple)):
            return _identity(operand) in [_identity(x) for x in value]
        return False
    kinds = {"string"} if isinstance(operand, str) else {"number"}
    if not present or _identity(value)[0] not in kinds:
        return False
    return {
        "gt": value > operand,
        "gte": value >= operand,
        "lt": value < operand,
        "lte": value <= operand,
    }[op]


scalars = st.one_of(
    st.sampled_from([0, 1, 1.0, 2, 500, 499.5, True, False, "1", "a", "ab", "b", ""]),
    st.integers(-3, 600),
)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(
        ["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains"]
    ),
    operand=st.one_of(scalars, st.lists(scalars, max_size=4), st.booleans()),
    value=st.one_of(st.none(), scalars, st.lists(scalars, min_size=2, max_size=3)),
    plain=st.booleans(),
)
def test_when_operators_equal_brute_force(op: str, operand: Any, value: Any, plain: bool) -> None:
    table = {"group_key": "c", "group_id": "t", "set": {"p": "x"}}
    if plain and op in ("eq", "in"):
        when: Any = operand  # a plain value means eq, a list in
        op = "in" if isinstance(operand, list) else "eq"
    else:
        when = {op: operand}
    try:
        (rule,) = load_all({"rule": [{**table, "when": {"x": when}}]}).rules
    except MixpanelException:
        return  # an operand that does not suit the operator (checked in TestTables)
    ((name, test),) = rule.conditions
    assert name == "x"
    assert test(value) is _brute_operator(op, operand, value), (op, operand, value)


def test_when_equality_is_type_strict_in_rules_and_traits() -> None:
    from mixpanel_otel._translate import from_rule

    (rule,) = load_all(
        {"rule": [{"group_key": "c", "group_id": "t", "when": {"ok": True}, "set": {"p": "x"}}]}
    ).rules
    read = {"t": "acme", "x": 1}
    assert from_rule(rule, {**read, "ok": 1}, {}, 1.0, dict().get, None, []) == []
    assert len(from_rule(rule, {**read, "ok": True}, {}, 1.0, dict().get, None, [])) == 1
    trait = _one(when={"http.status_code": {"gte": 500}, "tier": 1})
    engine = TraitEngine([trait], clock=Clock(1000.0))
    from mixpanel_otel._traits.runtime import TraitFeed

    feed = TraitFeed([trait], engine, [0])
    for status, tier in [(500, 1.0), (503, 1), (404, 1), (500, True), ("500", 1), (None, 1)]:
        feed.observe(
            {"tenant": "acme", "http.status_code": status, "tier": tier}, {}, 999.0, dict().get, []
        )
    assert engine.value(trait, "acme") == 2


def test_after_the_wall_clock_steps_back_an_hour_values_are_right_within_one_interval() -> None:
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    trait = _one(window="10m")
    engine = TraitEngine([trait], interval=10.0, clock=wall, monotonic=mono)

    def tick(seconds: float) -> list[Any]:
        wall.now += seconds
        mono.now += seconds
        return _sets(engine.due())

    stamps = [wall.now - 5, wall.now - 3, wall.now - 1]
    for stamp in stamps:
        engine.observe(0, "acme", stamp)
    assert tick(0) == [("acme", "$set", {"n": 3})]
    wall.now -= 3600  # the wall clock steps back; the monotonic one does not
    new_stamps = [wall.now + 1, wall.now + 2]
    for stamp in new_stamps:
        engine.observe(0, "acme", stamp)
    # Within one trait_interval, the value counts the records the new clock stamped
    # in its window (those stamped ahead of it wait until the clock reaches them).
    sent = tick(2) + tick(8)
    assert sent[-1] == ("acme", "$set", {"n": 2}), sent
    # The window still slides: the new records leave it ten minutes later.
    for _ in range(70):
        sent += tick(10)
    assert sent[-1] == ("acme", "$set", {"n": 0}), sent[-3:]
