"""Rules: derive group updates from attributes a service already emits.

A rules file is TOML (``[[rule]]`` tables) or a list of dicts of the same
shape. Rules are checked when loaded; a mistake names the rule (counted
from 1, as a person reads the file) and the key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Union

from ._exceptions import ConfigurationError, MixpanelException

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["RULES_ENV", "Rule", "RulesSource", "SPECIALS", "load_rules"]

RULES_ENV = "MIXPANEL_OTEL_RULES"
#: What ``rules=`` accepts: a TOML path, a list of rule dicts, or None (the environment).
RulesSource = Union[None, str, "os.PathLike[str]", Sequence[Mapping[str, Any]]]

#: Values a rule can map besides attribute names.
SPECIALS = frozenset(("@start_time", "@end_time", "@name", "@status", "@severity"))

_OPERATIONS = {
    "set_once": "$set_once",
    "set": "$set",
    "union": "$union",
    "remove": "$remove",
}
_KEYS = frozenset(("group_key", "group_id", "when", "unset", *_OPERATIONS))


class Rule:
    """One checked rule: which group, when, and which properties from which attributes."""

    __slots__ = ("group_key", "group_id", "when", "operations", "unset", "index")

    def __init__(
        self,
        group_key: str,
        group_id: str,
        when: dict[str, Any],
        operations: list[tuple[str, list[tuple[str, str]]]],
        unset: list[str],
        index: int,
    ) -> None:
        self.group_key = group_key
        self.group_id = group_id  # attribute naming the group
        self.when = when  # attribute -> required value (a list: any of)
        self.operations = operations  # [(op, [(property, source)])] in wire order
        self.unset = unset
        self.index = index  # 1 for the first rule

    def __repr__(self) -> str:
        return f"<Rule {self.index} {self.group_key}={self.group_id}>"


def _fail(index: int, key: str, problem: str) -> MixpanelException:
    return MixpanelException(f"rules: rule {index}, key {key!r}: {problem}")


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
    when = raw.get("when", {})
    if not isinstance(when, Mapping) or not all(isinstance(k, str) for k in when):
        raise _fail(index, "when", "must be a table of attribute = value")
    for name, value in when.items():
        if isinstance(value, Mapping):
            raise _fail(index, f"when.{name}", "must be a value or a list of values")
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
    return Rule(raw["group_key"], raw["group_id"], dict(when), operations, list(unset), index)


def load_rules(rules: RulesSource) -> list[Rule]:
    """Check rules given as a TOML path, a list of dicts, or None (``MIXPANEL_OTEL_RULES``).

    A problem raises :class:`MixpanelException`; one in the file the
    environment names raises :class:`ConfigurationError` with
    ``from_environment=True``, naming the variable.
    """
    if rules is None:
        path = os.environ.get(RULES_ENV, "").strip()
        if not path:
            return []
        try:
            return _load(path)
        except MixpanelException as exc:
            raise ConfigurationError(f"{RULES_ENV}: {exc}", from_environment=True) from None
    return _load(rules)


def _load(rules: Any) -> list[Rule]:
    if isinstance(rules, (str, os.PathLike)):
        path = os.fspath(rules)
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise MixpanelException(f"rules file {path!r}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MixpanelException(f"rules file {path!r} is not valid TOML: {exc}") from None
        unknown = sorted(set(document) - {"rule"})
        if unknown:
            raise MixpanelException(
                f"rules file {path!r}: unknown top-level key {unknown[0]!r} (use [[rule]] tables)"
            )
        rules = document.get("rule", [])
        if not isinstance(rules, list):
            raise MixpanelException(f"rules file {path!r}: 'rule' must be [[rule]] tables")
    if isinstance(rules, Mapping) or not isinstance(rules, Sequence):
        raise MixpanelException("rules must be a path to a TOML file or a list of dicts")
    return [_check_rule(index, raw) for index, raw in enumerate(rules, 1)]
