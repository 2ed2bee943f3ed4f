"""One translator for every front end: a record's attributes -> group updates.

A front end only turns its record into a flat attribute mapping (plus
resource attributes, a time and the ``@`` specials); this module reads the
record conventions (``group_key``/``group_id`` with ``$set``... keys), the
flat form (``mixpanel.group_key``, ``mixpanel.$set.<prop>``...) and the rules
from it. Nothing that no tag or rule names leaves the process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

__all__ = [
    "EVENT_NAME",
    "FLAT_GROUP_ID",
    "FLAT_GROUP_KEY",
    "FLAT_PREFIX",
    "NoOperation",
    "Special",
    "Translator",
    "from_flat",
    "from_rule",
    "from_tags",
]

FLAT_PREFIX = "mixpanel."
EVENT_NAME = "mixpanel.group"  # a span event carrying one more update in the flat form
FLAT_GROUP_KEY = "mixpanel.group_key"
FLAT_GROUP_ID = "mixpanel.group_id"
_FLAT_OP_PREFIX = "mixpanel.$"
_PROPERTY_OPS = frozenset(("$set", "$set_once", "$union", "$remove"))

#: Gives a record's ``@`` values (``@name``, ``@start_time``...) by name; None when it has none.
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
    # Unrolled: a comprehension over the six names costs twice as much, on every logging call.
    operations = {}
    if "$set" in attributes:
        operations["$set"] = attributes["$set"]
    if "$set_once" in attributes:
        operations["$set_once"] = attributes["$set_once"]
    if "$union" in attributes:
        operations["$union"] = attributes["$union"]
    if "$remove" in attributes:
        operations["$remove"] = attributes["$remove"]
    if "$unset" in attributes:
        operations["$unset"] = attributes["$unset"]
    if "$delete" in attributes:
        operations["$delete"] = attributes["$delete"]
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
    """Reads the record conventions, the flat form and rules from attribute mappings.

    What to read is decided once, here: without rules :attr:`translate` is
    :meth:`tags` alone. Problems never raise: each bad part of a record adds
    a reason to ``errors`` (its other parts are kept); group tags without an
    operation add one to ``ignored``.

    Args:
        rules: checked rules (:func:`~mixpanel_otel._rules.load_rules`).
        counter: counts strings cut to Mixpanel's limit (the consumer's).
        traits: the computed traits each record is also counted for, if any.
    """

    #: ``translate(attributes, time, resource, special, errors, ignored)``: every
    #: update a record asks for. ``resource`` holds attributes a rule reads when
    #: the record lacks them; ``special`` gives the ``@`` values a rule maps.
    translate: Callable[
        [Mapping[str, Any], float, Mapping[str, Any], Special, list[str], list[str]],
        list[GroupUpdate],
    ]

    def __init__(
        self,
        rules: Optional[Sequence[Rule]] = None,
        counter: Optional[Truncations] = None,
        traits: Optional[TraitFeed] = None,
    ) -> None:
        self.rules = tuple(rules or ())
        self.counter = counter
        self.traits = traits
        #: Whether a record is read whole (resource, specials): rules or traits need it.
        self.reads_records = bool(self.rules) or traits is not None
        self.translate = self._with_rules if self.reads_records else self._tags_only

    def tags(
        self, attributes: Mapping[str, Any], time: float, errors: list[str], ignored: list[str]
    ) -> list[GroupUpdate]:
        """The updates the record conventions and the flat form ask for, no rules
        (a ``mixpanel.group`` span event is read so)."""
        updates: list[GroupUpdate]
        if "group_id" in attributes or "group_key" in attributes:
            try:
                updates = from_tags(attributes, time, self.counter, errors)
            except NoOperation as exc:
                ignored.append(str(exc))
                updates = []
            except MixpanelException as exc:
                errors.append(str(exc))
                updates = []
        else:
            updates = []
        # Literal names, not FLAT_GROUP_*: this runs on every logging call.
        if "mixpanel.group_key" in attributes or "mixpanel.group_id" in attributes:
            try:
                updates = updates + from_flat(attributes, time, self.counter, errors)
            except NoOperation as exc:
                ignored.append(str(exc))
            except MixpanelException as exc:
                errors.append(str(exc))
        return updates

    def _tags_only(
        self,
        attributes: Mapping[str, Any],
        time: float,
        resource: Mapping[str, Any],
        special: Special,
        errors: list[str],
        ignored: list[str],
    ) -> list[GroupUpdate]:
        return self.tags(attributes, time, errors, ignored)

    def _with_rules(
        self,
        attributes: Mapping[str, Any],
        time: float,
        resource: Mapping[str, Any],
        special: Special,
        errors: list[str],
        ignored: list[str],
    ) -> list[GroupUpdate]:
        updates = self.tags(attributes, time, errors, ignored)
        counter = self.counter
        for rule in self.rules:
            try:
                updates += from_rule(rule, attributes, resource, time, special, counter, errors)
            except MixpanelException as exc:
                errors.append(f"rule {rule.index}: {exc}")
        if self.traits is not None:
            self.traits.observe(attributes, resource, time, special, errors)
        return updates


def from_flat(
    attributes: Mapping[str, Any],
    time: float,
    counter: Optional[Truncations] = None,
    errors: Optional[list[str]] = None,
) -> list[GroupUpdate]:
    """The flat form of span attributes and span events (``mixpanel.$set.plan``...)."""
    group_key = attributes.get(FLAT_GROUP_KEY)
    group_id = attributes.get(FLAT_GROUP_ID)
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
            raise _half_tagged(FLAT_GROUP_KEY, group_key, FLAT_GROUP_ID, op)
        raise NoOperation("group tags without an operation")
    if not operations:
        raise NoOperation("group tags without an operation")
    return group_updates(group_key, group_id, operations, meta, time, counter, errors)


def from_rule(
    rule: Rule,
    attributes: Mapping[str, Any],
    resource: Mapping[str, Any],
    time: float,
    special: Special,
    counter: Optional[Truncations],
    errors: list[str],
) -> list[GroupUpdate]:
    """What one rule derives from a record: nothing unless the record (or its
    resource) names the group and every ``when`` matches. A property whose
    value is bad is left out, with its reason in ``errors``."""

    def lookup(name: str) -> Any:
        value = attributes.get(name)
        if value is None:
            value = resource.get(name)
        return _unwrap(value)

    group_id = lookup(rule.group_id)
    if group_id is None:
        return []
    for name, test in rule.conditions:
        if not test(special(name) if name[0] == "@" else lookup(name)):
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
    dropped: list[str] = []
    updates = group_updates(rule.group_key, group_id, operations, None, time, counter, dropped)
    errors.extend(f"rule {rule.index}: {reason}" for reason in dropped)
    return updates
