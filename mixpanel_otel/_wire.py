"""Mixpanel's wire facts: limits, operations, value normalisation, messages.

The one place that knows what Mixpanel accepts. Front ends build
:class:`GroupUpdate` objects through :func:`make_update`, which validates and
normalises on the caller's thread (cheap, no JSON); the worker turns them into
wire messages with :func:`wire_message`.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import math
import time as _time
import uuid
from collections.abc import Mapping
from typing import Any, Callable, Optional

from ._exceptions import MixpanelException

__all__ = [
    "ENDPOINTS",
    "endpoint_path",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES",
    "DEFAULT_BATCH_SIZE",
    "OPERATIONS",
    "GroupUpdate",
    "make_update",
    "normalize_properties",
    "wire_message",
]

#: Operations in the order a multi-operation record is split into messages.
OPERATIONS = ("$set_once", "$set", "$union", "$remove", "$unset")
ALL_OPERATIONS = frozenset((*OPERATIONS, "$delete"))
#: Keys of a record or message that are merged into the message as meta.
META_KEYS = ("$time", "$ip", "$ignore_time")

MAX_BATCH_MESSAGES = 2000
DEFAULT_BATCH_SIZE = 200  # what Mixpanel recommends
MAX_BATCH_BYTES = 2 * 1024 * 1024  # on the encoded request body
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_NAME_CHARS = 255
MAX_STRING_BYTES = 255
MAX_DEPTH = 3
#: How Mixpanel stores datetimes, and how the official SDK writes them (UTC, no zone).
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S"

#: SDK endpoint name -> URL path, as the official consumer protocol names them.
ENDPOINTS = {"events": "/track", "people": "/engage", "groups": "/groups", "imports": "/import"}


def endpoint_path(endpoint: str) -> str:
    """The path of an SDK consumer endpoint; raises as the SDK's consumers do."""
    path = ENDPOINTS.get(endpoint)
    if path is None:
        raise MixpanelException(
            f"No such endpoint {endpoint!r}. Valid endpoints are one of {list(ENDPOINTS)}"
        )
    return path


REGION_HOSTS = {"us": "api.mixpanel.com", "eu": "api-eu.mixpanel.com", "in": "api-in.mixpanel.com"}


class GroupUpdate:
    """One operation on one group profile, validated and normalised.

    ``payload`` is a fresh dict (list for ``$unset``) owned by the pipeline,
    so merging into it never touches the caller's objects.
    """

    __slots__ = (
        "group_key",
        "group_id",
        "op",
        "payload",
        "time",
        "meta",
        "size",
        "receipts",
        "index",
        "stands_for",
    )

    def __init__(
        self,
        group_key: str,
        group_id: str | int | float,
        op: str,
        payload: Any,
        time: float,
        meta: Optional[dict[str, Any]] = None,
        size: int = 0,
    ) -> None:
        self.group_key = group_key
        self.group_id = group_id
        self.op = op
        self.payload = payload
        self.time = time
        self.meta = meta
        self.size = size
        #: Receipts waiting on this update, one entry per submitted update merged into it.
        self.receipts: Optional[list[Any]] = None
        #: Identities already in this ``$union``'s lists, built by the first merge.
        self.index: Optional[dict[str, set[Any]]] = None
        #: How many updates this one answers for (merges and a ``$delete`` add theirs).
        self.stands_for = 1

    def __repr__(self) -> str:
        return f"GroupUpdate({self.group_key!r}, {self.group_id!r}, {self.op!r}, {self.payload!r})"


class Truncations:
    """Counts strings cut to Mixpanel's 255-byte limit (shared with stats)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _truncate(value: str, counter: Optional[Truncations]) -> str:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_STRING_BYTES:
        return value
    if counter is not None:
        counter.count += 1
    return data[:MAX_STRING_BYTES].decode("utf-8", "ignore")


def iso_utc(seconds: Optional[float]) -> Optional[str]:
    """A timestamp in seconds as Mixpanel stores datetimes (``2024-01-02T03:04:05``, UTC)."""
    if seconds is None:
        return None
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime(DATETIME_FORMAT)


def normalize_value(value: Any, counter: Optional[Truncations] = None, depth: int = 0) -> Any:
    """Return ``value`` in a JSON-ready form Mixpanel stores, or raise.

    datetime/date -> ISO 8601 (``%Y-%m-%dT%H:%M:%S``, as the official SDK
    writes them), Decimal -> number, UUID -> str, set/tuple -> list, strings
    over 255 bytes cut at a UTF-8 boundary.
    """
    tp = type(value)
    if tp is str:
        # 63 chars can never exceed 255 bytes; skip the encode for them.
        return value if len(value) <= 63 else _truncate(value, counter)
    if tp is int or tp is bool or value is None:
        return value
    if tp is float:
        if value != value or value in (math.inf, -math.inf):
            raise MixpanelException(f"{value!r} is not a valid JSON number")
        return value
    if isinstance(value, str):
        return normalize_value(str(value), counter, depth)
    if isinstance(value, int):  # int and bool subclasses (IntEnum, numpy bools do not apply)
        return bool(value) if isinstance(value, bool) else int(value)
    if isinstance(value, float):
        return normalize_value(float(value), counter, depth)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return value.strftime(DATETIME_FORMAT)
    if isinstance(value, _dt.date):
        return value.strftime("%Y-%m-%dT00:00:00")
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise MixpanelException(f"{value!r} is not a valid JSON number")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if depth >= MAX_DEPTH:
        raise MixpanelException(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return normalize_properties(value, counter, depth + 1)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [normalize_value(v, counter, depth + 1) for v in value]
    raise MixpanelException(f"value of type {tp.__name__} is not JSON serializable")


def normalize_properties(
    properties: Any, counter: Optional[Truncations] = None, depth: int = 0
) -> dict[str, Any]:
    """Validate a property mapping and return a normalised copy."""
    result: dict[str, Any] = _properties(properties, counter, depth)[0]
    return result


def _properties(properties: Any, counter: Optional[Truncations], depth: int = 0) -> tuple[Any, int]:
    """``(normalised copy, approximate size)``; the hot path of every front end."""
    if type(properties) is not dict and not isinstance(properties, Mapping):
        raise MixpanelException(f"properties must be a dict, not {type(properties).__name__}")
    out = {}
    size = 96
    for name, value in properties.items():
        if type(name) is not str or len(name) > MAX_NAME_CHARS:
            if type(name) is not str:
                raise MixpanelException(f"property name {name!r} is not a string")
            raise MixpanelException(
                f"property name {name[:40]!r}... is over {MAX_NAME_CHARS} characters"
            )
        tp = type(value)
        # Plain str/int/bool/None need no work; everything else goes the long way.
        if tp is str:
            if len(value) > 63:
                value = _truncate(value, counter)
            size += 40 + (len(value) if value.isascii() else 12 * len(value))
        elif tp is int or tp is bool or value is None:
            size += 40
        else:
            try:
                value = normalize_value(value, counter, depth)
            except MixpanelException as exc:
                raise MixpanelException(f"property {name!r}: {exc}") from None
            size += 40 + (approx_size(value) if type(value) in (list, dict) else 0)
        out[name] = value
    return out, size


def _normalize_union(properties: Any, counter: Optional[Truncations]) -> tuple[Any, int]:
    out, size = _properties(properties, counter)
    for name, value in out.items():
        if type(value) is not list:
            out[name] = [value]  # a scalar is wrapped, as the record conventions say
    return out, size


def _normalize_unset(names: Any, counter: Optional[Truncations]) -> tuple[Any, int]:
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise MixpanelException(
            f"$unset takes a list of property names, not {type(names).__name__}"
        )
    if not names:
        raise MixpanelException("$unset needs at least one property name")
    out = []
    for name in names:
        if type(name) is not str or not name:
            raise MixpanelException(f"$unset property name {name!r} is not a non-empty string")
        if len(name) > MAX_NAME_CHARS:
            raise MixpanelException(f"$unset property name is over {MAX_NAME_CHARS} characters")
        out.append(name)
    return out, 96 + sum(map(len, out))


def _normalize_delete(value: Any, counter: Optional[Truncations]) -> tuple[Any, int]:
    return "", 96  # the value is ignored by Mixpanel; the official SDK sends ""


# op -> normaliser returning (payload, approximate size)
_NORMALIZERS: dict[str, Callable[[Any, Optional[Truncations]], tuple[Any, int]]] = {
    "$set": _properties,
    "$set_once": _properties,
    "$union": _normalize_union,
    "$remove": _properties,
    "$unset": _normalize_unset,
    "$delete": _normalize_delete,
}


def check_group(group_key: Any, group_id: Any) -> Any:
    """Return ``group_id`` as sent (a UUID as its str), or raise unless the pair
    names a group profile Mixpanel accepts."""
    if isinstance(group_id, uuid.UUID):
        group_id = str(group_id)
    if not isinstance(group_key, str) or not group_key:
        raise MixpanelException(f"group_key must be a non-empty string, not {group_key!r:.40}")
    if isinstance(group_id, str):
        if not group_id:
            raise MixpanelException("group_id must be a non-empty string or a number")
    elif isinstance(group_id, bool) or not isinstance(group_id, (int, float)):
        raise MixpanelException(
            f"group_id must be a string or a number, not {type(group_id).__name__}"
        )
    elif group_id != group_id or group_id in (math.inf, -math.inf):
        raise MixpanelException(f"group_id {group_id!r} is not a valid number")
    return group_id


def group_id_key(group_id: Any) -> str:
    """The form Mixpanel keys a profile by: 42, 42.0 and "42" name the same group."""
    if isinstance(group_id, str):
        return group_id
    if isinstance(group_id, float) and group_id.is_integer():
        return str(int(group_id))
    return str(group_id)


def normalize_meta(meta: Any) -> Optional[dict[str, Any]]:
    if not meta:
        return None
    if not isinstance(meta, Mapping):
        raise MixpanelException(f"meta must be a dict, not {type(meta).__name__}")
    out = {}
    for key, value in meta.items():
        if key == "$time":
            if type(value) is bool or not isinstance(value, (int, float)):
                raise MixpanelException("meta $time must be a number of seconds")
            if value != value or value in (math.inf, -math.inf):
                raise MixpanelException("meta $time is not a valid number")
        out[key] = normalize_value(value)
    return out


def make_update(
    group_key: Any,
    group_id: Any,
    op: str,
    payload: Any,
    time: float,
    meta: Optional[dict[str, Any]] = None,
    counter: Optional[Truncations] = None,
) -> GroupUpdate:
    """Validate and normalise one operation; raise :class:`MixpanelException`."""
    if type(group_key) is not str or not group_key or type(group_id) is not str or not group_id:
        group_id = check_group(group_key, group_id)  # the slow path: UUID, or name the problem
    normalizer = _NORMALIZERS.get(op)
    if normalizer is None:
        raise MixpanelException(f"unknown operation {op!r}")
    try:
        payload, size = normalizer(payload, counter)
    except MixpanelException as exc:
        raise MixpanelException(f"{op}: {exc}") from None
    return GroupUpdate(group_key, group_id, op, payload, time, meta, size)


def approx_size(payload: Any) -> int:
    """A cheap estimate of an update's memory and wire size, for ``max_pending`` bytes."""
    size = 96
    for item in payload.items() if type(payload) is dict else enumerate(payload or ()):
        value = item[1]
        tp = type(value)
        if tp is str:
            size += 32 + (len(value) if value.isascii() else 12 * len(value))
        elif tp is list or tp is dict:
            size += 32 + approx_size(value)
        else:
            size += 32
    return size


def wire_message(token: str, update: GroupUpdate) -> dict[str, Any]:
    """The message the official SDK would send for ``update``, key for key."""
    message = {
        "$token": token,
        "$time": update.time,
        "$group_key": update.group_key,
        "$group_id": update.group_id,
        update.op: update.payload,
    }
    if update.meta:
        message.update(update.meta)
    return message


_MESSAGE_FIELDS = frozenset(("$token", "$time", "$group_key", "$group_id")) | ALL_OPERATIONS


def group_updates(
    group_key: Any,
    group_id: Any,
    operations: Mapping[str, Any],
    meta: Optional[Mapping[str, Any]],
    time: Optional[float],
    counter: Optional[Truncations] = None,
    errors: Optional[list[str]] = None,
) -> list[GroupUpdate]:
    """One group's operations as updates: ``$delete`` alone, else one per operation.

    Mixpanel applies one operation a message, so several are sent as several,
    in the order ``$set_once, $set, $union, $remove, $unset``. A ``$time`` in
    ``meta`` is the updates' time. With an ``errors`` list, a bad operation
    adds its reason there and the good ones are still returned; without,
    it raises.
    """
    meta = normalize_meta(meta)
    if meta and "$time" in meta:
        time = meta.pop("$time")
        meta = meta or None
    if time is None:
        time = _time.time()
    if "$delete" in operations:
        return [make_update(group_key, group_id, "$delete", "", time, meta, counter)]
    if errors is None:
        updates = [
            make_update(group_key, group_id, op, operations[op], time, meta, counter)
            for op in OPERATIONS
            if op in operations
        ]
    else:
        group_id = check_group(group_key, group_id)  # a wrong group fails every operation
        updates, failed = [], len(errors)
        for op in OPERATIONS:
            if op in operations:
                try:
                    updates.append(
                        make_update(group_key, group_id, op, operations[op], time, meta, counter)
                    )
                except MixpanelException as exc:
                    errors.append(str(exc))
        if len(errors) > failed:
            return updates
    if not updates:
        raise MixpanelException(
            "no operation ($set, $set_once, $union, $remove, $unset or $delete)"
        )
    return updates


def updates_from_message(
    message: Any,
    meta: Optional[Mapping[str, Any]] = None,
    time: Optional[float] = None,
    counter: Optional[Truncations] = None,
) -> list[GroupUpdate]:
    """Split a ``group_update``-style message (``$group_key``, ``$group_id``,
    operations, meta) into updates, as :func:`group_updates` does."""
    if not isinstance(message, Mapping):
        raise MixpanelException(f"message must be a dict, not {type(message).__name__}")
    for key in ("$group_key", "$group_id"):
        if key not in message:
            raise MixpanelException(f"message has no {key}")
    extra = {k: v for k, v in message.items() if k not in _MESSAGE_FIELDS}
    if meta:
        extra.update(meta)
    if "$time" in message and "$time" not in extra:
        extra["$time"] = message["$time"]
    operations = {op: message[op] for op in ALL_OPERATIONS if op in message}
    return group_updates(
        message["$group_key"], message["$group_id"], operations, extra, time, counter
    )
