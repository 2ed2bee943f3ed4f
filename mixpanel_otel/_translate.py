"""One translator for every front end: a record's attributes -> group updates.

A front end only turns its record into a flat attribute mapping (plus
resource attributes, a time and the ``@`` specials); this module reads the
record conventions (``group_key``/``group_id`` with ``$set``... keys), the
flat form (``mixpanel.group_key``, ``mixpanel.$set.<prop>``...) and the rules
from it. Nothing that no tag or rule names leaves the process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from ._exceptions import MixpanelException
from ._rules import Rule
from ._wire import (
    META_KEYS,
    GroupUpdate,
    Truncations,
    group_updates,
    make_update,
)

__all__ = ["Translator", "FLAT_PREFIX", "EVENT_NAME"]

FLAT_PREFIX = "mixpanel."
EVENT_NAME = "mixpanel.group"  # a span event carrying one more update in the flat form
_FLAT_GROUP_KEY = "mixpanel.group_key"
_FLAT_GROUP_ID = "mixpanel.group_id"
_FLAT_OP_PREFIX = "mixpanel.$"
_PROPERTY_OPS = frozenset(("$set", "$set_once", "$union", "$remove"))
_TAG_OPERATIONS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")  # likeliest first
_EMPTY: Mapping = {}

Special = Callable[[str], Any]


def _unwrap(value: Any) -> Any:
    """HTTP header capture gives ``("acme",)``: read a one-element sequence as its element."""
    if type(value) in (tuple, list) and len(value) == 1:
        return value[0]
    return value


def _no_special(name: str) -> Any:
    return None


def from_tags(attributes: Mapping, time: float, counter=None) -> list[GroupUpdate]:
    """The record conventions: ``group_key``, ``group_id``, ``$set``... keys (the hot path)."""
    group_key = attributes.get("group_key")
    group_id = attributes.get("group_id")
    if group_key is None or group_id is None:
        return []  # not a group record: not an error
    operations = {op: attributes[op] for op in _TAG_OPERATIONS if op in attributes}
    if (
        len(operations) == 1
        and "$time" not in attributes
        and "$ip" not in attributes
        and "$ignore_time" not in attributes
    ):
        # The usual record: one operation, no meta.
        ((op, payload),) = operations.items()
        return [make_update(group_key, group_id, op, payload, time, None, counter)]
    meta = {key: attributes[key] for key in META_KEYS if key in attributes}
    return group_updates(group_key, group_id, operations, meta, time, counter)


class Translator:
    """Reads tags, the flat form and rules from attribute mappings."""

    def __init__(self, rules: Optional[list[Rule]] = None) -> None:
        self.rules = list(rules or ())

    def translate(
        self,
        attributes: Mapping,
        time: float,
        resource: Mapping = _EMPTY,
        special: Special = _no_special,
        counter: Optional[Truncations] = None,
        errors: Optional[list] = None,
        apply_rules: bool = True,
    ) -> list[GroupUpdate]:
        """All updates a record asks for. Problems go to ``errors`` (a reason each);
        a bad part of a record never costs its other parts."""
        updates: list[GroupUpdate] = []
        if "group_id" in attributes:
            self._guard(from_tags, (attributes, time, counter), updates, errors, "")
        if _FLAT_GROUP_KEY in attributes or _FLAT_GROUP_ID in attributes:
            self._guard(self.from_flat, (attributes, time, counter), updates, errors, "")
        for rule in self.rules if apply_rules else ():
            self._guard(
                self._from_rule,
                (rule, attributes, resource, time, special, counter),
                updates,
                errors,
                f"rule {rule.index}: ",
            )
        return updates

    @staticmethod
    def _guard(function, args, updates: list, errors: Optional[list], label: str) -> None:
        try:
            updates.extend(function(*args))
        except MixpanelException as exc:
            if errors is None:
                raise
            errors.append(f"{label}{exc}")

    @staticmethod
    def from_flat(attributes: Mapping, time: float, counter=None) -> list[GroupUpdate]:
        """The flat form of span attributes and span events (``mixpanel.$set.plan``...)."""
        group_key = attributes.get(_FLAT_GROUP_KEY)
        group_id = attributes.get(_FLAT_GROUP_ID)
        if group_key is None or group_id is None:
            return []
        operations: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for name, value in attributes.items():
            if not name.startswith(_FLAT_OP_PREFIX):
                continue
            op, dot, prop = name[len(FLAT_PREFIX) :].partition(".")
            if op in _PROPERTY_OPS and prop:
                operations.setdefault(op, {})[prop] = value
            elif dot:
                raise MixpanelException(f"unknown attribute {name!r}")
            elif op == "$unset":
                operations[op] = value
            elif op == "$delete":
                if value:
                    operations[op] = ""
            elif op in META_KEYS:
                meta[op] = value
            else:
                raise MixpanelException(f"unknown attribute {name!r}")
        return group_updates(group_key, group_id, operations, meta, time, counter)

    @staticmethod
    def _from_rule(
        rule: Rule, attributes: Mapping, resource: Mapping, time: float, special: Special, counter
    ) -> list[GroupUpdate]:
        def lookup(name: str) -> Any:
            value = attributes.get(name)
            if value is None:
                value = resource.get(name)
            return _unwrap(value)

        group_id = lookup(rule.group_id)
        if group_id is None:
            return []
        for name, expected in rule.when.items():
            value = lookup(name)
            if value != expected and not (type(expected) is list and value in expected):
                return []
        operations: dict[str, Any] = {}
        for op, pairs in rule.operations:
            properties = {}
            for prop, source in pairs:
                value = special(source) if source[0] == "@" else lookup(source)
                if value is not None:
                    properties[prop] = value
            if properties:
                operations[op] = properties
        if rule.unset:
            operations["$unset"] = rule.unset
        if not operations:
            return []
        return group_updates(rule.group_key, group_id, operations, None, time, counter)
