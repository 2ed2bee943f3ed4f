"""This process's part in trait state shared by the processes of a host.

Every process logs the records it counted (:meth:`SharedState.log_later`
from the application's thread, :meth:`SharedState.log_pending` from the
timer's; the gateway :meth:`SharedState.commit` before it answers). The one
process holding the store's lock aggregates: it starts from the saved state
(:meth:`SharedState.lead`), reads the log into its engine, and saves the
groups with the log position they include. At exit, a process whose
aggregator is ending too takes over to send the last values.
"""

from __future__ import annotations

import time as _time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .engine import TraitEngine
from .store import Batch, TraitStore

__all__ = ["Observations", "SharedState"]

#: A record's observations: (record time, [(trait position, group id, value)]).
Observations = tuple[float, list[tuple[int, str, Any]]]


class SharedState:
    """The shared log and the aggregator's role, for one engine."""

    def __init__(self, store: TraitStore, engine: TraitEngine) -> None:
        self.store = store
        self.engine = engine
        self._pending: deque[Observations] = deque()
        self._cursor = 0  # the last logged batch read into the engine

    @property
    def leading(self) -> bool:
        return self.store.leading

    # -- logging -----------------------------------------------------------------------

    def log_later(self, time: float, items: list[tuple[int, str, Any]]) -> None:
        """Queue one record's observations (the application's thread: no I/O)."""
        self._pending.append((time, items))

    def log_pending(self) -> None:
        """Log what is queued, in one transaction."""
        held = []
        while self._pending:
            held.append(self._pending.popleft())
        if not held:
            return
        try:
            self.store.append(self._batch(held))
        except Exception:
            self._pending.extendleft(reversed(held))  # tried again next tick
            raise

    def commit(self, held: list[Observations], digest: str, window: float, now: float) -> bool:
        """Log a gateway call's observations, durably; False when a call with the same
        ``digest`` was logged within ``window`` seconds (then nothing is)."""
        return self.store.append(self._batch(held), digest, window, now)

    def _batch(self, held: Iterable[Observations]) -> Batch:
        """Observations in the log's form: trait signatures, not this engine's positions."""
        traits = self.engine.traits
        return [
            (time, [(traits[position].signature, group, value) for position, group, value in items])
            for time, items in held
        ]

    # -- aggregating -------------------------------------------------------------------

    def lead(self) -> bool:
        """Whether this process aggregates (taking the lock if it is free: then the
        engine starts again from the saved state)."""
        if self.store.leading:
            return True
        if not self.store.try_lead():
            return False
        self._take_over()
        return True

    def _take_over(self) -> None:
        engine = self.engine
        engine.release()
        engine.track_changes = True
        self._cursor, groups = self.store.load()
        for key, data in groups:
            engine.import_group(key, data)
        engine.changed.clear()
        engine.forgotten.clear()
        self.store.set_leader_exiting(False)

    def read_log(self) -> None:
        """Count what every process logged since the last read."""
        positions = self.engine.signature_positions()
        while True:
            batches = self.store.read_after(self._cursor)
            if not batches:
                return
            for number, batch in batches:
                for time, observations in batch:
                    items = [
                        (positions[signature], group_id, value)
                        for signature, group_id, value in observations
                        if signature in positions
                    ]
                    if items:
                        self.engine.observe_many(time, items)
                self._cursor = number

    def save(self, unconfirmed: dict[tuple[str, str], set[str]]) -> None:
        """Save the changed groups (``unconfirmed`` values as unsent) and the log
        position they include."""
        engine = self.engine
        changed, engine.changed = engine.changed, set()
        forgotten, engine.forgotten = engine.forgotten, set()
        self.store.save(self._cursor, engine.export_groups(changed, unconfirmed), forgotten)

    # -- exit ----------------------------------------------------------------------------

    def ending(self) -> None:
        """This aggregator ends: processes ending after it take over."""
        self.store.set_leader_exiting(True)

    def lead_at_exit(self, deadline: float) -> bool:
        """Whether this process sends the final values: it aggregates, or takes over
        from an aggregator that ends too (False: the living aggregator will)."""
        if self.store.leading:
            return True
        self.log_pending()
        if not self.store.try_lead():
            if not self.store.leader_exiting():
                return False  # the aggregator lives on and reads what we logged
            while not self.store.try_lead():
                if _time.monotonic() >= deadline or not self.store.leader_exiting():
                    return False  # it is logged: the (next) aggregator counts it
                _time.sleep(0.02)
        self._take_over()
        return True

    def resign(self) -> None:
        self.store.resign()

    def abandon(self) -> None:
        """In a forked child: the parent's connection and lock stay the parent's."""
        self._pending.clear()
        self.store.abandon()
