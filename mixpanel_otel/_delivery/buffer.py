"""The coalescing buffer: pending group updates, per group, in order.

A *group* is one profile, ``(group_key, group_id)``. Its *pending* updates
are the ones not yet taken for sending, kept in arrival order. A new update
*merges* into the group's latest pending update of the same operation when
nothing pending after that one touches the same properties (nor is a
``$delete``), under the rules of :mod:`mixpanel_otel._semantics`; a
``$delete`` supersedes everything pending for its group. Sending what is
left, in order, then gives every profile exactly the state that sending
every update would.

No threads, no I/O, no lock: the consumer owns one and holds its lock.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from operator import attrgetter
from typing import Any, Optional

from .._semantics import merge_payload, touches
from .._wire import GroupUpdate, approx_size, group_id_key

__all__ = ["MERGE_CAP", "Buffer", "GroupKey", "group_of"]

GroupKey = tuple[str, str]

#: A merge stops growing an update past this estimate (bytes of JSON, an
#: over-estimate): a new message starts, well under Mixpanel's 1 MB message
#: limit and its 256 KB limit on one list or object.
MERGE_CAP = 200_000


def group_of(update: GroupUpdate) -> GroupKey:
    """The profile an update is for; 42, 42.0 and "42" name the same group."""
    gid = update.group_id
    return (update.group_key, gid if type(gid) is str else group_id_key(gid))


_size = attrgetter("size")


def _value_size(value: Any) -> int:
    kind = type(value)
    if kind is str:
        return 32 + (len(value) if value.isascii() else 12 * len(value))
    if kind is list or kind is dict:
        return 32 + approx_size(value)
    return 32


class Buffer:
    """Pending updates per group; groups in the order their oldest update arrived."""

    def __init__(self, merge_cap: int = MERGE_CAP) -> None:
        self.merge_cap = merge_cap
        self._groups: dict[GroupKey, list[GroupUpdate]] = {}
        self.count = 0  # pending updates (after merges)
        self.bytes = 0  # their estimated size

    def __len__(self) -> int:
        return self.count

    def coalesce(self, update: GroupUpdate) -> int:
        """Fold ``update`` into what is pending for its group, if it can be.

        Returns how many updates no longer need a message of their own: 0
        when ``update`` needs a new entry (:meth:`append`), 1 when it merged,
        and for a ``$delete`` the number of pending updates it superseded
        (it then takes their place).
        """
        pending = self._groups.get(group_of(update))
        return self._fold(pending, update) if pending else 0

    def add(self, update: GroupUpdate) -> int:
        """:meth:`coalesce`, else :meth:`append`, with no bound (the inbox's path);
        what :meth:`coalesce` returns."""
        key = group_of(update)
        pending = self._groups.get(key)
        if pending:
            merged = self._fold(pending, update)
            if merged:
                return merged
            pending.append(update)
        else:
            self._groups[key] = [update]
        self.count += 1
        self.bytes += update.size
        return 0

    def _fold(self, pending: list[GroupUpdate], update: GroupUpdate) -> int:
        op = update.op
        if op == "$delete":
            superseded = len(pending)
            for old in pending:
                self.bytes -= old.size
                update.stands_for += old.stands_for
                _pass_receipts(old, update)
            pending[:] = [update]
            self.count += 1 - superseded
            self.bytes += update.size
            return superseded
        payload = update.payload
        for old in reversed(pending):
            if old.op == op and old.meta == update.meta:
                if old.size + update.size > self.merge_cap:
                    return 0
                growth = _merge(old, update)
                if growth is None:
                    return 0
                old.size += growth
                self.bytes += growth
                old.time = update.time
                old.stands_for += update.stands_for
                _pass_receipts(update, old)
                return 1
            if old.op == "$delete" or touches(old.payload, payload):
                return 0
        return 0

    def append(self, update: GroupUpdate) -> None:
        """Add ``update`` as a new pending entry (after :meth:`coalesce` said 0)."""
        key = group_of(update)
        pending = self._groups.get(key)
        if pending is None:
            self._groups[key] = [update]
        else:
            pending.append(update)
        self.count += 1
        self.bytes += update.size

    def take(
        self,
        limit: int,
        busy: Container[GroupKey] = (),
        groups: Optional[set[GroupKey]] = None,
    ) -> list[GroupUpdate]:
        """Up to ``limit`` updates for sending, oldest groups first, each group's in order
        (``groups``, if given, gets the groups they are for).

        Groups in ``busy`` (an earlier message of theirs is still in flight)
        are left for later, so a group's messages are never sent out of order.
        """
        batch: list[GroupUpdate] = []
        extend = batch.extend
        emptied: list[GroupKey] = []
        room = limit
        for key, pending in self._groups.items():
            if key in busy:
                continue
            count = len(pending)
            if count <= room:
                extend(pending)
                emptied.append(key)
                room -= count
                if not room:
                    break
            else:
                extend(pending[:room])
                del pending[:room]
                if groups is not None:
                    groups.add(key)
                break
        for key in emptied:
            del self._groups[key]
        if groups is not None:
            groups.update(emptied)
        self.count -= len(batch)
        self.bytes -= sum(map(_size, batch))
        return batch

    def take_all(self) -> list[GroupUpdate]:
        """Everything pending, group by group, each in order (for the spool)."""
        batch = [update for pending in self._groups.values() for update in pending]
        self._groups.clear()
        self.count = self.bytes = 0
        return batch

    def restore(self, updates: list[GroupUpdate]) -> None:
        """Put taken updates back in front of their groups' pending ones, in order."""
        for update in reversed(updates):
            key = group_of(update)
            pending = self._groups.get(key)
            if pending is None:
                self._groups[key] = [update]
            else:
                pending.insert(0, update)
        self.count += len(updates)
        self.bytes += sum(update.size for update in updates)

    def __iter__(self) -> Iterator[GroupUpdate]:
        for pending in self._groups.values():
            yield from pending


def _merge(into: GroupUpdate, new: GroupUpdate) -> Optional[int]:
    """Merge ``new`` into ``into``; the estimated growth in bytes, or None if it cannot."""
    op, target, source = into.op, into.payload, new.payload
    if op == "$set":
        growth = sum(
            _value_size(value) - (_value_size(target[name]) if name in target else -8 - len(name))
            for name, value in source.items()
        )
    elif op in ("$set_once", "$remove"):
        growth = sum(
            8 + len(name) + _value_size(value)
            for name, value in source.items()
            if name not in target
        )
    elif op == "$union":
        before = {name: len(target.get(name, ())) for name in source}
        if into.index is None:
            into.index = {}
        merge_payload(op, target, source, into.index)
        return sum(
            8 + len(name) + sum(map(_value_size, target[name][length:]))
            for name, length in before.items()
        )
    elif op == "$unset":
        growth = sum(4 + len(name) for name in source if name not in target)
    else:
        return None
    if not merge_payload(op, target, source, None):
        return None
    return growth


def _pass_receipts(source: GroupUpdate, target: GroupUpdate) -> None:
    """``target`` now answers for ``source``: its receipts settle with ``target``."""
    if source.receipts:
        if target.receipts is None:
            target.receipts = []
        target.receipts.extend(source.receipts)
        source.receipts = None
