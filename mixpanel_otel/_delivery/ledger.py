"""The ledger: everything the consumer holds, under one lock.

Callers append updates to the *inbox* (a deque: no lock, no I/O) while the
consumer has room; whoever takes the lock next moves the inbox into the
coalescing buffer. Past the bounds a caller adds under the lock and, as
admission decides (:mod:`.admission`), waits for room or overflows.
Workers take jobs (:meth:`Ledger.next_job`) and hand back their results
(:meth:`Ledger.finish`). :class:`~.dispatch.Dispatch` decides which
job goes next; the ledger adds the lock, the inbox and the waiting.

One lock, two conditions on it: workers wait on ``_work`` (one is woken per
job that becomes due), callers wait on ``_change`` (room, or everything
finished; all are woken when a job finishes).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Optional, Protocol

from .._wire import GroupUpdate
from .dispatch import Dispatch, settle_receipts
from .jobs import Job, Kind, Lane
from .receipts import Fate
from .sender import Result
from .stats import Stats

__all__ = ["Ledger", "Pace"]


class Pace(Protocol):
    """What the ledger asks of the lifecycle when handing out jobs."""

    @property
    def stopped(self) -> bool: ...  # workers end

    @property
    def urgent(self) -> bool: ...  # send partial batches now (flush, exit, after SIGTERM)

    @property
    def paused_until(self) -> float: ...  # a 429 pauses every request until then


class Ledger:
    """Inbox, buffer, lanes, jobs in flight and their counts; the one lock."""

    def __init__(
        self,
        stats: Stats,
        *,
        batch_size: int,
        max_pending: int,
        max_pending_bytes: int,
        max_in_flight: int,
        flush_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self._stats = stats
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_in_flight = max_in_flight
        self.flush_interval = flush_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._change = threading.Condition(self._lock)
        self._inbox: deque[GroupUpdate] = deque()
        self._inbox_bytes = 0
        self._wake_at = max(1, batch_size // 2)
        self._spill_room = max(64, max_pending // 4)  # overflow waiting for a spill job
        self._dispatch = Dispatch(batch_size)
        self._next_tick = clock() + flush_interval
        self.held = 0  # pending + in flight, read without the lock by the hot path
        self.held_bytes = 0

    # -- callers ---------------------------------------------------------------------

    def offer(self, updates: list[GroupUpdate], size: int) -> bool:
        """Append to the inbox without the lock when there is room; False when there is not."""
        inbox = self._inbox
        waiting = len(inbox)
        if (
            waiting < self.batch_size
            and self.held + waiting < self.max_pending
            and self.held_bytes + self._inbox_bytes + size < self.max_pending_bytes
        ):
            inbox.extend(updates)
            self._inbox_bytes += size  # not atomic; a rough figure, reset by every move
            if waiting < self._wake_at <= len(inbox):  # crossed: half a batch waits
                with self._lock:
                    self._work.notify()
            return True
        return False

    def add(self, updates: list[GroupUpdate], bounded: bool = True) -> int:
        """Add updates in order under the lock, merging where they can; returns how
        many went in before one found no room. ``bounded=False``: all go in, now."""
        with self._lock:
            self._move_inbox()
            room = self._room if bounded else _always
            added = coalesced = 0
            for update in updates:
                merged = self._dispatch.add(update, room)
                if merged < 0:
                    break
                added += 1
                coalesced += merged
            self._stats.add("enqueued", added)
            if coalesced:
                self._stats.add("coalesced", coalesced)
            self._count()
            if not bounded:
                self._dispatch.partial = True
                self._work.notify()
        return added

    def wait_for_room(self, timeout: float, spill: bool = False) -> None:
        """Unless there is room now (for updates, or for overflow waiting to spill),
        wait until a job finishes or is taken, at most ``timeout`` s; meanwhile the
        workers send partial batches."""
        with self._lock:
            if spill and len(self._dispatch.to_spill) < self._spill_room:
                return
            if not spill and self._room():
                return
            self._dispatch.partial = True
            self._work.notify()
            self._change.wait(max(0.0, timeout))

    def add_sdk(self, key: tuple[Any, ...], new_lane: Callable[[], Lane], text: str) -> bool:
        """Queue an SDK message in its lane; False when the consumer is full."""
        with self._lock:
            if not self._room():
                return False
            lane = self._dispatch.add_sdk(key, new_lane, text)
            self._stats.add("enqueued")
            self._count()
            if len(lane.queue) >= self.batch_size:
                self._work.notify()
        return True

    def to_spill(self, updates: list[GroupUpdate], patient: bool) -> int:
        """Queue overflow for a spill job; returns how many were taken. A ``patient``
        caller leaves room for a few batches only (then waits); the rest are taken
        while under ``max_pending_bytes`` waiting, since the writer is only slow."""
        with self._lock:
            dispatch = self._dispatch
            count = self._spill_room - len(dispatch.to_spill) if patient else len(updates)
            room = self.max_pending_bytes - dispatch.to_spill_bytes
            taken = 0
            for update in updates[: max(0, count)]:
                room -= update.size
                if room < 0:
                    break
                taken += 1
            dispatch.add_to_spill(updates[:taken])
            self._count()
            self._work.notify()
        return taken

    # -- workers ---------------------------------------------------------------------

    def next_job(self, pace: Pace, spool: bool, block: bool = True) -> Optional[Job]:
        """The next job due. Blocking (a worker): waits for one, None once stopped.
        Not blocking (a flush with no worker): None when none is due now."""
        dispatch = self._dispatch
        with self._lock:
            while True:
                if block and pace.stopped:
                    return None
                self._move_inbox()
                now = self._clock()
                if now >= self._next_tick:
                    dispatch.partial = True
                paused = pace.paused_until > now
                job = dispatch.pick(spool, 0 if paused else self.max_in_flight)
                if job is not None:
                    self._count()
                    if job.kind is Kind.SPILL:
                        self._change.notify_all()  # room for more overflow
                    if dispatch.due():
                        self._work.notify()  # more may be due: pass it on
                    return job
                if dispatch.partial and not dispatch.pending():
                    dispatch.partial = pace.urgent
                    self._next_tick = now + self.flush_interval
                if not block:
                    return None
                if paused:
                    timeout = pace.paused_until - now
                elif dispatch.partial:  # the rest is in flight: a finish wakes us
                    timeout = self.flush_interval
                else:
                    timeout = self._next_tick - now
                self._work.wait(min(max(0.001, timeout), self.flush_interval))

    def finish(
        self, job: Job, result: Optional[Result], spool_rows: Optional[int] = None
    ) -> list[GroupUpdate]:
        """A job is done: account for its result (a spill job: ``spool_rows`` None when
        the spool kept nothing). Returns the updates neither spool nor memory keeps."""
        lost: list[GroupUpdate] = []
        with self._lock:
            if spool_rows is not None:
                self._dispatch.spool_rows = spool_rows
            if result is None:  # a spill job
                kept = spool_rows is not None
                lost = self._dispatch.finish_spill(job, kept, self.max_pending)
            else:
                self._dispatch.finish(job, result)
            self._count()
            self._work.notify()  # a group or lane is free again
            self._change.notify_all()
        return lost

    # -- flush and exit --------------------------------------------------------------

    def empty(self) -> bool:
        """Nothing held in memory and nothing left in the spool."""
        with self._lock:
            return not (self._inbox or self._dispatch.held or self._dispatch.spool_rows)

    def wait_for_change(self, timeout: float) -> None:
        """Wait until a job finishes (or ``timeout`` s)."""
        with self._lock:
            if self._inbox or self._dispatch.held or self._dispatch.spool_rows:
                self._change.wait(timeout)

    def hurry(self) -> None:
        """Send partial batches now and wake everyone (a flush, an exit, a stop)."""
        with self._lock:
            self._dispatch.partial = True
            self._work.notify_all()
            self._change.notify_all()

    def settle(self, updates: list[GroupUpdate], fate: Fate, reason: str = "") -> None:
        """Settle the receipts of updates that leave outside a job (dropped, spooled at exit)."""
        with self._lock:
            settle_receipts(updates, fate, reason)

    def set_spool_rows(self, rows: int) -> None:
        with self._lock:
            self._dispatch.spool_rows = rows
            self._work.notify()
            self._change.notify_all()

    def take_all(self) -> tuple[list[GroupUpdate], list[GroupUpdate], list[str]]:
        """At the exit deadline: everything held, for the spool (see
        :meth:`.Dispatch.take_all`); jobs still out are abandoned."""
        with self._lock:
            self._move_inbox()
            taken = self._dispatch.take_all()
            self._count()
            self._change.notify_all()
        return taken

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            self._move_inbox()
            dispatch = self._dispatch
            return {
                "pending": dispatch.held,
                "pending_bytes": dispatch.held_bytes,
                "in_flight": len(dispatch.jobs),
                "spool_rows": dispatch.spool_rows,
            }

    def quiescent(self, timeout: float) -> bool:
        """Whether the lock can be taken within ``timeout`` s."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def hold(self) -> None:
        """Take the lock across a ``fork()`` (:meth:`let_go` after it, in the parent)."""
        self._lock.acquire()

    def let_go(self) -> None:
        self._lock.release()

    # -- under the lock --------------------------------------------------------------

    def _room(self) -> bool:
        dispatch = self._dispatch
        return dispatch.held < self.max_pending and dispatch.held_bytes < self.max_pending_bytes

    def _move_inbox(self) -> None:
        """Move the inbox into the buffer, in order (admitted by the callers' check)."""
        inbox = self._inbox
        self._inbox_bytes = 0
        if not inbox:
            return
        add, enqueued, coalesced = self._dispatch.add, 0, 0
        while inbox:
            coalesced += add(inbox.popleft(), _always)
            enqueued += 1
        self._stats.add("enqueued", enqueued)
        if coalesced:
            self._stats.add("coalesced", coalesced)
        self._count()

    def _count(self) -> None:
        self.held = self._dispatch.held
        self.held_bytes = self._dispatch.held_bytes


def _always() -> bool:
    return True
