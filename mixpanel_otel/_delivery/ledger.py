"""The ledger: everything the consumer holds, under one lock.

Callers append updates to the *inbox* (:mod:`.inbox`: no lock, no I/O)
while the consumer has room; whoever takes the lock next moves the inbox
into the coalescing buffer. Past the bounds a caller adds under the lock and, as
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
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._wire import GroupUpdate
from .bounds import Bounds
from .dispatch import Dispatch, settle_receipts
from .inbox import Inbox
from .jobs import Job, Kind, Lane
from .receipts import Fate
from .sender import Result
from .spool import Reading
from .stats import Stats

if TYPE_CHECKING:
    from .lifecycle import Lifecycle

__all__ = ["Ledger", "Tick"]


class Tick:
    """Every ``flush_interval`` seconds partial batches go; how long an idle worker waits."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._next = clock() + interval

    def due(self, now: float) -> bool:
        return now >= self._next

    def restart(self, now: float) -> None:
        self._next = now + self.interval

    def wait(self, now: float, pause_end: Optional[float], partial: bool) -> float:
        """Seconds to wait: until a pause ends, a tick, or (``partial``: the rest is
        in flight and a finish wakes the worker) one interval."""
        if pause_end is not None:
            timeout = pause_end - now
        elif partial:
            timeout = self.interval
        else:
            timeout = self._next - now
        return min(max(0.001, timeout), self.interval)


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
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers: one woken per job due
        self._change = threading.Condition(self._lock)  # callers: room, or all finished
        #: Taken across a ``fork()`` (released after it, in the parent).
        self.hold, self.let_go = self._lock.acquire, self._lock.release
        self._dispatch = Dispatch(batch_size)
        self._bounds = Bounds(self._dispatch, max_pending, max_pending_bytes)
        self._inbox = Inbox(batch_size, self._bounds, self._wake_one)
        self.offer = self._inbox.offer
        self._tick = Tick(flush_interval, clock)
        self._spool_read = 0  # order of the spool reading ``spool_rows`` comes from

    def _wake_one(self) -> None:
        with self._lock:
            self._work.notify()

    @property
    def held(self) -> int:
        """Pending + in flight, read without the lock by the hot path."""
        return self._inbox.held

    # -- callers ---------------------------------------------------------------------

    def add(self, updates: list[GroupUpdate], bounded: bool = True) -> int:
        """Add updates in order under the lock, merging where they can; returns how
        many went in before one found no room. ``bounded=False``: all go in, now."""
        with self._lock:
            self._move_inbox()
            room = self._bounds.room if bounded else _always
            added = coalesced = 0
            for update in updates:
                merged = self._dispatch.add(update, room)
                if merged < 0:
                    break
                added += 1
                coalesced += merged
            self._counted(added, coalesced)
            if not bounded:
                self._dispatch.partial = True
                self._work.notify()
        return added

    def wait_for_room(self, timeout: float, spill: bool = False) -> None:
        """Unless there is room now (``spill``: for overflow), wait at most ``timeout`` s
        for a job to finish or be taken; meanwhile workers send partial batches."""
        with self._lock:
            has_room = self._bounds.spill_has_room if spill else self._bounds.room
            if has_room():
                return
            self._dispatch.partial = True
            self._work.notify()
            self._change.wait(max(0.0, timeout))

    def add_sdk(self, key: tuple[Any, ...], new_lane: Callable[[], Lane], text: str) -> bool:
        """Queue an SDK message in its lane; False when the consumer is full."""
        with self._lock:
            if not self._bounds.room():
                return False
            lane = self._dispatch.add_sdk(key, new_lane, text)
            self._stats.add("enqueued")
            self._count()
            if len(lane.queue) >= self.batch_size:
                self._work.notify()
        return True

    def to_spill(self, updates: list[GroupUpdate], patient: bool) -> int:
        """Queue overflow for a spill job, as much as :meth:`.Bounds.spill_fits`; how many."""
        with self._lock:
            self._move_inbox()  # appended before this overflow: older than it
            taken = self._bounds.spill_fits(updates, patient)
            self._dispatch.add_to_spill(updates[:taken])
            self._count()
            self._work.notify()
        return taken

    # -- workers ---------------------------------------------------------------------

    def next_job(self, pace: Lifecycle, spool: bool, block: bool = True) -> Optional[Job]:
        """The next job due. Blocking (a worker): waits for one, None once stopped.
        Not blocking (a flush with no worker): None when none is due now."""
        dispatch = self._dispatch
        with self._lock:
            while True:
                if block and pace.stopped:
                    return None
                self._move_inbox()
                now = self._tick.clock()
                if self._tick.due(now):
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
                    self._tick.restart(now)
                if not block:
                    return None
                pause_end = pace.paused_until if paused else None
                self._work.wait(self._tick.wait(now, pause_end, dispatch.partial))

    def finish(self, job: Job, result: Result, spool: Optional[Reading] = None) -> None:
        """A group, SDK or replay job is done: account for its result and (a replay)
        the spool reading taken after it."""
        with self._lock:
            if spool is not None:
                self._note_spool(spool)
            self._dispatch.finish(job, result)
            self._finished()

    def finish_spill(
        self, job: Job, unkept: list[GroupUpdate], spool: Optional[Reading]
    ) -> list[GroupUpdate]:
        """A spill job is done; ``unkept``: its updates the spool did not keep. Returns
        those memory cannot keep either."""
        with self._lock:
            if spool is not None:
                self._note_spool(spool)
            lost = self._dispatch.finish_spill(job, unkept, self._bounds.max_pending)
            self._finished()
        return lost

    # -- flush and exit --------------------------------------------------------------

    def empty(self) -> bool:
        """Nothing held in memory and nothing left in the spool."""
        with self._lock:
            return not (len(self._inbox) or self._dispatch.held or self._dispatch.spool_rows)

    def wait_for_change(self, timeout: float) -> None:
        """Wait until a job finishes (or ``timeout`` s)."""
        with self._lock:
            if len(self._inbox) or self._dispatch.held or self._dispatch.spool_rows:
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

    def note_spool(self, reading: Reading) -> None:
        """Take a spool reading (after an adoption) unless a later one is known."""
        with self._lock:
            self._note_spool(reading)
            self._work.notify()
            self._change.notify_all()

    def set_spool_rows(self, rows: int) -> None:
        """The spool was closed: its rows are the next process's (``rows`` 0)."""
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

    # -- under the lock --------------------------------------------------------------

    def _note_spool(self, reading: Reading) -> None:
        """Keep the latest reading only: a job that read the spool before another
        job changed it may finish after that one (a replay and a spill at once)."""
        if reading.order > self._spool_read:
            self._spool_read = reading.order
            self._dispatch.spool_rows = reading.rows

    def _move_inbox(self) -> None:
        """Move the inbox into the buffer, in order (admitted by the callers' check)."""
        enqueued, coalesced = self._inbox.move(self._dispatch.buffer.add)
        if enqueued:
            self._counted(enqueued, coalesced)

    def _counted(self, enqueued: int, coalesced: int) -> None:
        self._stats.add("enqueued", enqueued)
        if coalesced:
            self._stats.add("coalesced", coalesced)
        self._count()

    def _finished(self) -> None:
        self._count()
        self._work.notify()  # a group or lane is free again
        self._change.notify_all()

    def _count(self) -> None:
        self._inbox.count(self._dispatch.held, self._dispatch.held_bytes)


def _always() -> bool:
    return True
