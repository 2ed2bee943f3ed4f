"""Mixpanel's group profile semantics, written once.

JSON value identity, applying one operation to a profile, and merging two
updates of the same operation. The consumer's buffer (coalescing), the local
sink (stored profiles) and :mod:`mixpanel_otel.testing` all use this module,
so coalescing can never give a profile that sending one by one would not.

Identity is JSON's, not Python's: ``True`` is not ``1``, ``1`` is not ``1.0``
and ``[1]`` is not ``[True]``, at any depth.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, Optional

__all__ = [
    "apply_operation",
    "identity",
    "merge_payload",
    "profile_identity",
    "touches",
]

JSONDict = dict[str, Any]

# Tags that keep values of different JSON types apart in an identity.
_NULL, _BOOL, _INT, _FLOAT, _LIST, _OBJECT = range(6)


def identity(value: Any) -> Hashable:
    """A hashable identity for a JSON value, equal exactly when the JSON is equal."""
    kind = type(value)
    if kind is str:
        return str(value)  # strings stand for themselves; every other kind is a tuple
    if kind is bool:
        return (_BOOL, value)
    if kind is int:
        return (_INT, value)
    if kind is float:
        return (_FLOAT, repr(value))  # repr keeps -0.0 apart from 0.0, as JSON does
    if value is None:
        return (_NULL,)
    if kind is list or kind is tuple:
        return (_LIST, tuple(map(identity, value)))
    if isinstance(value, dict):
        return (_OBJECT, tuple(sorted((str(k), identity(v)) for k, v in value.items())))
    return (kind.__name__, repr(value))  # not JSON; never equal to a JSON value


def profile_identity(profile: Optional[JSONDict]) -> Hashable:
    """Identity of a whole profile (None for no profile), for comparing results."""
    return None if profile is None else identity(profile)


def touches(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two payloads (property dicts or name lists) name a common property."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)  # type: ignore[arg-type]
    return any(name in large for name in small)


def apply_operation(profile: Optional[JSONDict], op: str, payload: Any) -> Optional[JSONDict]:
    """The profile after one operation, as Mixpanel applies it; None is no profile.

    Returns a new dict and leaves ``profile`` alone. ``$remove`` and ``$unset``
    never create a profile; ``$union`` onto a scalar makes it a list first.
    """
    if op == "$delete":
        return None
    if profile is None and op in ("$remove", "$unset"):
        return None
    new = dict(profile) if profile is not None else {}
    if op == "$set":
        new.update(payload)
    elif op == "$set_once":
        for name, value in payload.items():
            new.setdefault(name, value)
    elif op == "$union":
        for name, values in payload.items():
            current = new.get(name, [])
            merged = list(current) if isinstance(current, list) else [current]
            seen = set(map(identity, merged))
            for value in values:
                key = identity(value)
                if key not in seen:
                    seen.add(key)
                    merged.append(value)
            new[name] = merged
    elif op == "$remove":
        for name, value in payload.items():
            current = new.get(name)
            if isinstance(current, list):
                key = identity(value)
                new[name] = [v for v in current if identity(v) != key]
    elif op == "$unset":
        for name in payload:
            new.pop(name, None)
    else:
        raise ValueError(f"unknown operation {op!r}")
    return new


def merge_payload(
    op: str, target: Any, source: Any, index: Optional[dict[str, set[Hashable]]] = None
) -> bool:
    """Merge ``source`` into the earlier ``target`` of the same operation, in place.

    True when merged: applying ``target`` alone then gives what applying both
    in order gives. ``$remove`` takes one value per property, so it merges only
    properties ``target`` does not name; ``$delete`` never merges. For
    ``$union``, ``index`` caches the identities already in ``target``'s lists
    so a long run of merges stays linear in the values added.
    """
    if op == "$set":
        target.update(source)
    elif op == "$set_once":
        for name, value in source.items():
            target.setdefault(name, value)
    elif op == "$union":
        if index is None:
            index = {}
        for name, values in source.items():
            current = target.get(name)
            if current is None:
                current = target[name] = []
            seen = index.get(name)
            if seen is None:
                seen = index[name] = set(map(identity, current))
            for value in values:
                key = identity(value)
                if key not in seen:
                    seen.add(key)
                    current.append(value)
    elif op == "$remove":
        if touches(target, source):
            return False
        target.update(source)
    elif op == "$unset":
        present = set(target)
        target.extend(name for name in source if name not in present)
    else:
        return False
    return True
