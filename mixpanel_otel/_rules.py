"""Rules: derive group updates from attributes a service already emits.

A rules file is TOML (``[[rule]]`` and ``[[trait]]`` tables) or a list of
dicts of the rule shape (or a dict ``{"rule": [...], "trait": [...]}``).
Everything is checked when loaded; each table with a mistake gives one line
naming the table (counted from 1, as a person reads the file) and the key.
"""

from __future__ import annotations

import json
import operator
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

from ._exceptions import ConfigurationError, MixpanelException

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "AGGREGATES",
    "RULES_ENV",
    "Rule",
    "Rules",
    "RulesSource",
    "SPECIALS",
    "Trait",
    "conditions_match",
    "load_all",
    "load_rules",
]

RULES_ENV = "MIXPANEL_OTEL_RULES"
#: What ``rules=`` accepts: a TOML path, a list of rule dicts, a dict of ``rule``
#: and ``trait`` lists, or None (the environment).
RulesSource = Union[None, str, "os.PathLike[str]", Sequence[Mapping[str, Any]], Mapping[str, Any]]

#: Values a rule can map besides attribute names (``@duration_ms``: spans only).
SPECIALS = frozenset(("@start_time", "@end_time", "@name", "@status", "@severity", "@duration_ms"))

#: What a ``[[trait]]`` can compute; every one but ``count`` needs ``of``.
AGGREGATES = (
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "count_distinct",
    "first",
    "last",
    "p50",
    "p90",
    "p95",
    "p99",
    "most_frequent",
    "distinct_values",
)
#: ``distinct_values`` keeps at most this many values (``limit``), most recent first.
DEFAULT_DISTINCT_LIMIT = 20
MAX_DISTINCT_LIMIT = 255
_NUMERIC = frozenset(("sum", "min", "max", "avg", "p50", "p90", "p95", "p99"))
_TRAIT_KEYS = frozenset(
    ("property", "group_key", "group_id", "aggregate", "of", "window", "when", "limit")
)
_WINDOW = re.compile(r"^([1-9][0-9]{0,8})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_OPERATIONS = {
    "set_once": "$set_once",
    "set": "$set",
    "union": "$union",
    "remove": "$remove",
}
_KEYS = frozenset(("group_key", "group_id", "when", "unset", *_OPERATIONS))


class Rule:
    """One checked rule: which group, when, and which properties from which attributes."""

    __slots__ = ("group_key", "group_id", "when", "conditions", "operations", "unset", "index")

    def __init__(
        self,
        group_key: str,
        group_id: str,
        when: dict[str, Any],
        operations: list[tuple[str, list[tuple[str, str]]]],
        unset: list[str],
        index: int,
        conditions: tuple[Condition, ...] = (),
    ) -> None:
        self.group_key = group_key
        self.group_id = group_id  # attribute naming the group
        self.when = when  # as written: attribute -> value, list of values or operators
        self.conditions = conditions  # the checked form of ``when``
        self.operations = operations  # [(op, [(property, source)])] in wire order
        self.unset = unset
        self.index = index  # 1 for the first rule

    def __repr__(self) -> str:
        return f"<Rule {self.index} {self.group_key}={self.group_id}>"


class Trait:
    """One checked ``[[trait]]``: which property of which group, computed how over which window.

    ``window`` is in seconds, None for ``lifetime``. ``signature`` names the
    computation (not the table's place in the file): state kept under it
    (in memory, shared by front ends, or on disk) is found again by it.
    """

    __slots__ = (
        "property",
        "group_key",
        "group_id",
        "aggregate",
        "of",
        "window",
        "when",
        "conditions",
        "limit",
        "index",
        "signature",
        "numeric",
    )

    def __init__(
        self,
        property: str,
        group_key: str,
        group_id: str,
        aggregate: str,
        of: Optional[str],
        window: Optional[float],
        when: dict[str, Any],
        index: int,
        conditions: tuple[Condition, ...] = (),
        limit: Optional[int] = None,
    ) -> None:
        self.property = property
        self.group_key = group_key
        self.group_id = group_id  # attribute naming the group
        self.aggregate = aggregate
        self.of = of  # attribute or @special aggregated; None for count
        self.window = window
        self.when = when
        self.conditions = conditions
        self.limit = limit  # distinct_values: how many values it keeps
        self.index = index  # 1 for the first trait
        self.numeric = aggregate in _NUMERIC
        self.signature = json.dumps(
            [property, group_key, group_id, aggregate, of, window, when]
            + ([limit] if limit is not None else []),
            sort_keys=True,
            default=str,
        )

    def __repr__(self) -> str:
        return f"<Trait {self.index} {self.property}={self.aggregate}>"


class Rules(NamedTuple):
    """Everything a rules file holds."""

    rules: list[Rule]
    traits: list[Trait]


def _fail(index: int, key: str, problem: str, kind: str = "rule") -> MixpanelException:
    return MixpanelException(f"rules: {kind} {index}, key {key!r}: {problem}")


#: A checked ``when`` entry: the attribute (or ``@special``) read, and the test of its value.
Condition = tuple[str, Callable[[Any], bool]]

_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains")
_SCALARS = (str, int, float, bool)
_ORDER = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def same_value(a: Any, b: Any) -> bool:
    """Type-strict equality: ``true`` is not ``1``, ``"1"`` is not ``1``, ``1`` is ``1.0``."""
    kind_a, kind_b = type(a), type(b)
    if kind_a is bool or kind_b is bool:
        return kind_a is kind_b and a == b
    if kind_a in (int, float) and kind_b in (int, float):
        return bool(a == b)
    if kind_a in (list, tuple) and kind_b in (list, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return kind_a is kind_b and bool(a == b)


def _orderable(value: Any, bound: Any) -> bool:
    """Numbers compare with numbers, strings with strings; nothing else is ordered."""
    if type(bound) is str:
        return type(value) is str
    return type(value) in (int, float)


def _contains(value: Any, part: Any) -> bool:
    if type(value) is str:
        return type(part) is str and part in value
    if type(value) in (list, tuple):
        return any(same_value(item, part) for item in value)
    return False


def _test(op: str, operand: Any) -> Callable[[Any], bool]:
    """The test ``op`` makes of a value read from a record (None: the record has none)."""
    if op == "eq":
        return lambda value: same_value(value, operand)
    if op == "ne":
        return lambda value: not same_value(value, operand)
    if op == "in":
        return lambda value: any(same_value(value, item) for item in operand)
    if op == "not_in":
        return lambda value: not any(same_value(value, item) for item in operand)
    if op == "exists":
        return lambda value: (value is not None) is operand
    if op == "contains":
        return lambda value: _contains(value, operand)
    compare: Callable[[Any, Any], Any] = _ORDER[op]
    return lambda value: _orderable(value, operand) and bool(compare(value, operand))


def _operand_problem(op: str, operand: Any) -> Optional[str]:
    """Why ``operand`` does not suit ``op`` (None: it does)."""
    if op in ("in", "not_in"):
        if not isinstance(operand, list) or not all(type(x) in _SCALARS for x in operand):
            return f"{op} takes a list of strings, numbers or booleans"
    elif op == "exists":
        if type(operand) is not bool:
            return "exists takes true or false"
    elif op in ("gt", "gte", "lt", "lte"):
        if type(operand) not in (int, float, str):
            return f"{op} takes a number or a string"
    elif type(operand) not in _SCALARS:
        return f"{op} takes a string, number or boolean"
    return None


def _all_of(tests: list[Callable[[Any], bool]]) -> Callable[[Any], bool]:
    if len(tests) == 1:
        return tests[0]
    return lambda value: all(test(value) for test in tests)


def _check_when(
    index: int, raw: Mapping[str, Any], kind: str
) -> tuple[dict[str, Any], tuple[Condition, ...]]:
    """The ``when`` table as written, and its conditions: a plain value means ``eq``,
    a list ``in``, a table of operators all of them."""
    when = raw.get("when", {})
    if not isinstance(when, Mapping) or not all(isinstance(k, str) for k in when):
        raise _fail(index, "when", "must be a table of attribute = value", kind)
    conditions: list[Condition] = []
    for name, value in when.items():
        if name.startswith("@") and name not in SPECIALS:
            raise _fail(
                index,
                f"when.{name}",
                f"unknown {name!r} (known: {', '.join(sorted(SPECIALS))})",
                kind,
            )
        if isinstance(value, Mapping):
            operators = dict(value)
        elif isinstance(value, list):
            operators = {"in": value}
        else:
            operators = {"eq": value}
        if not operators:
            raise _fail(index, f"when.{name}", "an empty table of operators", kind)
        tests = []
        for op, operand in operators.items():
            if op not in _OPERATORS:
                raise _fail(
                    index,
                    f"when.{name}",
                    "must be a value or a list of values, or a table of operators "
                    f"({', '.join(_OPERATORS)}): unknown operator {op!r}",
                    kind,
                )
            problem = _operand_problem(op, operand)
            if problem:
                raise _fail(index, f"when.{name}.{op}", problem, kind)
            tests.append(_test(op, list(operand) if isinstance(operand, list) else operand))
        conditions.append((name, _all_of(tests)))
    return dict(when), tuple(conditions)


def conditions_match(conditions: tuple[Condition, ...], read: Callable[[str], Any]) -> bool:
    """Whether every condition holds for the values ``read`` gives."""
    return all(test(read(name)) for name, test in conditions)


def parse_window(text: Any) -> Optional[float]:
    """``"7d"`` -> 604800.0, ``"lifetime"`` -> None; raise ValueError otherwise."""
    if text == "lifetime":
        return None
    match = _WINDOW.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f'bad window {text!r} (expected <n>s, <n>m, <n>h, <n>d, e.g. "7d", or "lifetime")'
        )
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _check_trait(index: int, raw: Any) -> Trait:
    kind = "trait"
    if not isinstance(raw, Mapping):
        raise MixpanelException(f"rules: trait {index} is not a table but {type(raw).__name__}")
    unknown = sorted(set(raw) - _TRAIT_KEYS)
    if unknown:
        raise _fail(
            index,
            unknown[0],
            f"unknown key (expected one of {', '.join(sorted(_TRAIT_KEYS))})",
            kind,
        )
    for key in ("property", "group_key", "group_id"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise _fail(index, key, "must be a non-empty string", kind)
    if len(raw["property"]) > 255:
        raise _fail(index, "property", "property name over 255 characters", kind)
    aggregate = raw.get("aggregate")
    if aggregate not in AGGREGATES:
        raise _fail(
            index,
            "aggregate",
            f"unknown aggregate {aggregate!r} (known: {', '.join(AGGREGATES)})",
            kind,
        )
    of = raw.get("of")
    if aggregate == "count":
        if of is not None:
            raise _fail(index, "of", "count counts records: it takes no 'of'", kind)
    elif not isinstance(of, str) or not of:
        raise _fail(index, "of", f"missing: {aggregate} needs the attribute it aggregates", kind)
    elif of.startswith("@") and of not in SPECIALS:
        raise _fail(index, "of", f"unknown {of!r} (known: {', '.join(sorted(SPECIALS))})", kind)
    if "window" not in raw:
        raise _fail(index, "window", 'missing (<n>s, <n>m, <n>h, <n>d, or "lifetime")', kind)
    try:
        window = parse_window(raw["window"])
    except ValueError as exc:
        raise _fail(index, "window", str(exc), kind) from None
    when, conditions = _check_when(index, raw, kind)
    limit = _check_limit(index, raw, aggregate)
    return Trait(
        raw["property"],
        raw["group_key"],
        raw["group_id"],
        aggregate,
        of,
        window,
        when,
        index,
        conditions,
        limit,
    )


def _check_limit(index: int, raw: Mapping[str, Any], aggregate: str) -> Optional[int]:
    """``distinct_values``' ``limit`` (default 20, at most 255); no other aggregate takes one."""
    if aggregate != "distinct_values":
        if "limit" in raw:
            raise _fail(index, "limit", "only distinct_values takes a limit", "trait")
        return None
    limit = raw.get("limit", DEFAULT_DISTINCT_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_DISTINCT_LIMIT:
        raise _fail(
            index, "limit", f"must be a whole number from 1 to {MAX_DISTINCT_LIMIT}", "trait"
        )
    return limit


def _check_rule(index: int, raw: Any) -> Rule:
    if not isinstance(raw, Mapping):
        raise MixpanelException(f"rules: rule {index} is not a table but {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(index, unknown[0], f"unknown key (expected one of {', '.join(sorted(_KEYS))})")
    for key in ("group_key", "group_id"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise _fail(index, key, "must be a non-empty string")
    when, conditions = _check_when(index, raw, "rule")
    operations = []
    for key, op in _OPERATIONS.items():
        mapping = raw.get(key)
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping) or not mapping:
            raise _fail(index, key, "must be a non-empty table of property = attribute")
        pairs = []
        for prop, source in mapping.items():
            if not isinstance(source, str) or not source:
                raise _fail(index, f"{key}.{prop}", "must name an attribute or @special")
            if source.startswith("@") and source not in SPECIALS:
                raise _fail(
                    index,
                    f"{key}.{prop}",
                    f"unknown {source!r} (known: {', '.join(sorted(SPECIALS))})",
                )
            if len(prop) > 255:
                raise _fail(index, f"{key}.{prop[:20]}...", "property name over 255 characters")
            pairs.append((prop, source))
        operations.append((op, pairs))
    unset = raw.get("unset", [])
    if isinstance(unset, str) or not isinstance(unset, Sequence):
        raise _fail(index, "unset", "must be a list of property names")
    if not all(isinstance(name, str) and name for name in unset):
        raise _fail(index, "unset", "must be a list of non-empty property names")
    if not operations and not unset:
        raise _fail(index, "set", "the rule updates nothing (no set/set_once/union/remove/unset)")
    return Rule(raw["group_key"], raw["group_id"], when, operations, list(unset), index, conditions)


def load_rules(rules: RulesSource) -> list[Rule]:
    """The ``[[rule]]`` tables of :func:`load_all`."""
    return load_all(rules).rules


def load_all(rules: RulesSource) -> Rules:
    """Check rules and traits given as a TOML path, a list of rule dicts, a dict of
    ``rule`` and ``trait`` lists, or None (``MIXPANEL_OTEL_RULES``).

    Problems raise one :class:`MixpanelException`, a line per bad table; one
    in the file the environment names raises :class:`ConfigurationError`
    with ``from_environment=True``, naming the variable.
    """
    if rules is None:
        path = os.environ.get(RULES_ENV, "").strip()
        if not path:
            return Rules([], [])
        try:
            return _load(path)
        except MixpanelException as exc:
            raise ConfigurationError(f"{RULES_ENV}: {exc}", from_environment=True) from None
    return _load(rules)


_NOT_RULES = (
    "rules must be a path to a TOML file or a list of dicts (or a dict of 'rule' and 'trait' lists)"
)


def _load(source: Any) -> Rules:
    where = "rules"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        where = f"rules file {path!r}"
        try:
            with open(path, "rb") as handle:
                source = tomllib.load(handle)
        except OSError as exc:
            raise MixpanelException(f"{where}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MixpanelException(f"{where} is not valid TOML: {exc}") from None
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - {"rule", "trait"})
        if unknown and where == "rules":
            raise MixpanelException(_NOT_RULES)
        if unknown:
            raise MixpanelException(
                f"{where}: unknown top-level key {unknown[0]!r} (use [[rule]] and [[trait]] tables)"
            )
        rule_tables, trait_tables = source.get("rule", []), source.get("trait", [])
        for name, tables in (("rule", rule_tables), ("trait", trait_tables)):
            if not isinstance(tables, list):
                raise MixpanelException(f"{where}: {name!r} must be [[{name}]] tables")
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rule_tables, trait_tables = source, []
    else:
        raise MixpanelException(_NOT_RULES)
    problems: list[str] = []
    found_rules: list[Rule] = []
    found_traits: list[Trait] = []
    for index, raw in enumerate(rule_tables, 1):
        try:
            found_rules.append(_check_rule(index, raw))
        except MixpanelException as exc:
            problems.append(str(exc))
    by_property: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(trait_tables, 1):
        try:
            trait = _check_trait(index, raw)
        except MixpanelException as exc:
            problems.append(str(exc))
            continue
        other = by_property.setdefault((trait.group_key, trait.property), index)
        if other != index:
            problems.append(
                str(
                    _fail(
                        index,
                        "property",
                        f"{trait.property!r} of {trait.group_key!r} is kept by trait {other}",
                        "trait",
                    )
                )
            )
            continue
        found_traits.append(trait)
    if problems:
        raise MixpanelException("\n".join(problems))
    return Rules(found_rules, found_traits)
