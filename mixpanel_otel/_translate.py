"""One translator for every front end: a record's attributes -> group updates.

A front end only turns its record into a flat attribute mapping (plus
resource attributes, a time and the ``@`` specials); this module reads the
record conventions (``group_key``/``group_id`` with ``$set``... keys), the
flat form (``mixpanel.group_key``, ``mixpanel.$set.<prop>``...) and the rules
from it. Nothing that no tag or rule names leaves the process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._exceptions import MixpanelException
from ._rules import Rule
from ._wire import (
    META_KEYS,
    GroupUpdate,
    Truncations,
    group_updates,
    make_update,
)

if TYPE_CHECKING:
    from ._traits import TraitFeed

__all__ = ["EVENT_NAME", "FLAT_PREFIX", "NoOperation", "Translator", "from_tags"]

FLAT_PREFIX = "mixpanel."
EVENT_NAME = "mixpanel.group"  # a span event carrying one more update in the flat form
_FLAT_GROUP_KEY = "mixpanel.group_key"
_FLAT_GROUP_ID = "mixpanel.group_id"
_FLAT_OP_PREFIX = "mixpanel.$"
_PROPERTY_OPS = frozenset(("$set", "$set_once", "$union", "$remove"))
_TAG_OPERATIONS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")  # likeliest first
_EMPTY: Mapping[str, Any] = {}

Special = Callable[[str], Any]


class NoOperation(MixpanelException):
    """Group tags without any operation: context bound for later records
    (structlog ``bind()``, contextvars, a ``LoggerAdapter``). Counted as
    ``ignored``, not an error."""


def _unwrap(value: Any) -> Any:
    """HTTP header capture gives ``("acme",)``: read a one-element sequence as its element."""
    if type(value) in (tuple, list) and len(value) == 1:
        return value[0]
    return value


def _no_special(name: str) -> Any:
    return None


def _half_tagged(key_name: str, group_key: Any, id_name: str, op: str) -> MixpanelException:
    missing = key_name if group_key is None else id_name
    return MixpanelException(f"{op} without {missing} (a group update needs both tags)")


def from_tags(
    attributes: Mapping[str, Any],
    time: float,
    counter: Optional[Truncations] = None,
    errors: Optional[list[str]] = None,
) -> list[GroupUpdate]:
    """The record conventions: ``group_key``, ``group_id``, ``$set``... keys (the hot path).

    A record with neither tag is not a group record: ``[]``. Raises
    :class:`NoOperation` for tags without an operation and
    :class:`MixpanelException` for an operation next to only one tag (or a
    tag that is None). With ``errors``, a bad operation is reported there and
    the record's good operations are kept.
    """
    group_key = attributes.get("group_key")
    group_id = attributes.get("group_id")
    operations = {op: attributes[op] for op in _TAG_OPERATIONS if op in attributes}
    if group_key is None or group_id is None:
        if operations:
            raise _half_tagged("group_key", group_key, "group_id", next(iter(operations)))
        if "group_key" in attributes or "group_id" in attributes:
            raise NoOperation("group tags without an operation")
        return []  # not a group record: not an error
    if not operations:
        raise NoOperation("group tags without an operation")
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
    return group_updates(group_key, group_id, operations, meta, time, counter, errors)


class Translator:
    """Reads tags, the flat form and rules from attribute mappings; hands each
    record to the traits, if any (``traits``, with the rules)."""

    def __init__(
        self, rules: Optional[list[Rule]] = None, traits: Optional[TraitFeed] = None
    ) -> None:
        self.rules = list(rules or ())
        self.traits = traits

    def translate(
        self,
        attributes: Mapping[str, Any],
        time: float,
        resource: Mapping[str, Any] = _EMPTY,
        special: Special = _no_special,
        counter: Optional[Truncations] = None,
        errors: Optional[list[str]] = None,
        apply_rules: bool = True,
        ignored: Optional[list[str]] = None,
    ) -> list[GroupUpdate]:
        """All updates a record asks for. Problems go to ``errors`` (a reason each),
        group tags without an operation to ``ignored``; a bad part of a record
        never costs its other parts. With no ``errors`` list, a problem raises."""
        updates: list[GroupUpdate] = []
        parts: list[tuple[str, Callable[[], list[GroupUpdate]]]] = []
        if "group_id" in attributes or "group_key" in attributes:
            parts.append(("", lambda: from_tags(attributes, time, counter, errors)))
        if _FLAT_GROUP_KEY in attributes or _FLAT_GROUP_ID in attributes:
            parts.append(("", lambda: self.from_flat(attributes, time, counter, errors)))
        for part_label, part in parts:
            self._guard(part, updates, errors, ignored, part_label)
        for rule in self.rules if apply_rules else ():
            self._guard(
                lambda rule=rule: self._from_rule(  # type: ignore[misc]
                    rule, attributes, resource, time, special, counter, errors
                ),
                updates,
                errors,
                ignored,
                f"rule {rule.index}: ",
            )
        if self.traits is not None and apply_rules:
            try:
                self.traits.observe(attributes, resource, time, special, errors)
            except MixpanelException as exc:
                if errors is None:
                    raise
                errors.append(str(exc))
        return updates

    @staticmethod
    def _guard(
        part: Callable[[], list[GroupUpdate]],
        updates: list[GroupUpdate],
        errors: Optional[list[str]],
        ignored: Optional[list[str]],
        label: str,
    ) -> None:
        try:
            updates.extend(part())
        except NoOperation as exc:
            if ignored is not None:
                ignored.append(str(exc))
        except MixpanelException as exc:
            if errors is None:
                raise
            errors.append(f"{label}{exc}")

    @staticmethod
    def from_flat(
        attributes: Mapping[str, Any],
        time: float,
        counter: Optional[Truncations] = None,
        errors: Optional[list[str]] = None,
    ) -> list[GroupUpdate]:
        """The flat form of span attributes and span events (``mixpanel.$set.plan``...)."""
        group_key = attributes.get(_FLAT_GROUP_KEY)
        group_id = attributes.get(_FLAT_GROUP_ID)
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
        if group_key is None or group_id is None:
            if operations:
                op = FLAT_PREFIX + next(iter(operations))
                raise _half_tagged(_FLAT_GROUP_KEY, group_key, _FLAT_GROUP_ID, op)
            raise NoOperation("group tags without an operation")
        if not operations:
            raise NoOperation("group tags without an operation")
        return group_updates(group_key, group_id, operations, meta, time, counter, errors)

    @staticmethod
    def _from_rule(
        rule: Rule,
        attributes: Mapping[str, Any],
        resource: Mapping[str, Any],
        time: float,
        special: Special,
        counter: Optional[Truncations],
        errors: Optional[list[str]] = None,
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
            value = special(name) if name[0] == "@" else lookup(name)
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
        if errors is None:
            return group_updates(rule.group_key, group_id, operations, None, time, counter)
        dropped: list[str] = []
        updates = group_updates(rule.group_key, group_id, operations, None, time, counter, dropped)
        errors.extend(f"rule {rule.index}: {reason}" for reason in dropped)
        return updates
