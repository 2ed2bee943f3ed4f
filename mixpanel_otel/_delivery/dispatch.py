"""Dispatch: which job goes next, and what its result changes. No threads, no I/O.

It keeps what the consumer holds in memory: the coalescing buffer, the SDK
lanes, the updates waiting for the spool and the jobs in flight, with their
counts (``held``: all of these, the figure ``max_pending`` bounds). The
:class:`~.ledger.Ledger` calls it under its lock; tests call it directly,
with no thread and no server.

Order rules, the reason this exists:

- a group with a job in flight is *busy*: none of its later updates is taken;
- a spill job goes first, and takes everything pending with it;
- rows in the spool are older than anything in memory: while there are any
  (or a spill job is out), no group job starts, and a replay job starts only
  when no group or spill job is in flight;
- a lane sends one job at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from .._wire import GroupUpdate
from .buffer import Buffer, GroupKey
from .jobs import Job, Kind, Lane
from .receipts import Fate
from .sender import Result

__all__ = ["Dispatch", "settle_receipts"]


def settle_receipts(updates: list[GroupUpdate], fate: Fate, reason: str = "") -> None:
    """Tell the receipts waiting on ``updates`` what became of them."""
    for update in updates:
        if update.receipts:
            for receipt in update.receipts:
                receipt.settle(fate, reason)
            update.receipts = None


class Dispatch:
    """The in-memory side of delivery: buffer, lanes, spill queue, jobs in flight, counts."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.buffer = Buffer()
        self.lanes: dict[tuple[Any, ...], Lane] = {}
        self.jobs: list[Job] = []  # in flight, in the order they were taken
        self.busy: set[GroupKey] = set()
        self.in_flight = self.in_flight_bytes = 0
        self.sdk = self.sdk_bytes = 0  # SDK messages waiting in lanes
        self.to_spill: list[GroupUpdate] = []  # overflow waiting for a spill job
        self.to_spill_bytes = 0
        #: The overflow part of ``to_spill`` (what :class:`.Bounds` limits): the rest is
        #: what the buffer held when it came, queued ahead of it to keep each group in order.
        self.overflow = self.overflow_bytes = 0
        self.spool_rows = 0  # rows known to be in this process's spool
        self.partial = False  # send partial batches now (interval tick, flush, exit)
        #: Updates that came back unsent while the spool held newer rows: the
        #: exit writes them in front of every row, so each group stays in order.
        self.before_spool: list[GroupUpdate] = []

    @property
    def held(self) -> int:
        return (
            self.buffer.count
            + self.in_flight
            + self.sdk
            + len(self.to_spill)
            + len(self.before_spool)
        )

    @property
    def held_bytes(self) -> int:
        front = sum(update.size for update in self.before_spool)
        return (
            self.buffer.bytes + self.in_flight_bytes + self.sdk_bytes + self.to_spill_bytes + front
        )

    def pending(self) -> bool:
        """Anything in memory not yet taken by a job."""
        return bool(self.buffer.count or self.sdk or self.to_spill)

    def due(self) -> bool:
        """Whether another job may be due now (a hint to wake one more worker)."""
        count = self.buffer.count
        return bool(
            self.to_spill or count >= self.batch_size or (self.partial and (count or self.sdk))
        )

    def spilling(self) -> bool:
        return bool(self.to_spill) or any(job.kind is Kind.SPILL for job in self.jobs)

    # -- in ------------------------------------------------------------------------

    def add(self, update: GroupUpdate, room: Callable[[], bool]) -> int:
        """Coalesce or append; updates no longer sent on their own, or -1 when out of room.

        Returns 0 for a new entry, 1 for a merge, k for a ``$delete`` that
        superseded k pending updates. ``room()`` is asked only for a new entry.
        """
        superseded = self.buffer.coalesce(update)
        if superseded:
            return superseded
        if not room():
            return -1
        self.buffer.append(update)
        return 0

    def add_sdk(self, key: tuple[Any, ...], new_lane: Callable[[], Lane], text: str) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = new_lane()
        lane.queue.append(text)
        lane.bytes += len(text)
        self.sdk += 1
        self.sdk_bytes += len(text)
        return lane

    def add_to_spill(self, updates: list[GroupUpdate]) -> None:
        """Overflow joins the spill queue behind everything pending now: the queue
        stays older than whatever the buffer takes after it, group by group."""
        queued = self.buffer.take_all() + updates
        self.to_spill.extend(queued)
        self.to_spill_bytes += sum(update.size for update in queued)
        self.overflow += len(updates)
        self.overflow_bytes += sum(update.size for update in updates)

    # -- out -----------------------------------------------------------------------

    def pick(self, spool_ready: bool, in_flight_limit: int) -> Optional[Job]:
        """The next job due, or None; ``spool_ready``: a spool exists to replay from.

        At most ``in_flight_limit`` jobs that send are out at once; a spill
        job does not count, so one thread is always free to write the spool.
        """
        jobs = self.jobs
        if self.to_spill and not any(job.kind is Kind.SPILL for job in jobs):
            updates = self.to_spill + self.buffer.take_all()  # the buffer's are newer
            self.to_spill, self.to_spill_bytes = [], 0
            self.overflow = self.overflow_bytes = 0
            return self._start(Job(Kind.SPILL, updates))
        if sum(job.kind is not Kind.SPILL for job in jobs) >= in_flight_limit:
            return None
        if self.spool_rows or self.spilling() or any(j.kind is Kind.REPLAY for j in jobs):
            if (
                spool_ready
                and self.spool_rows
                and not self.spilling()
                and not any(job.kind is not Kind.SDK for job in jobs)
            ):
                return self._start(Job(Kind.REPLAY))
        elif self.buffer.count >= self.batch_size or (self.partial and self.buffer.count):
            groups: set[GroupKey] = set()
            updates = self.buffer.take(self.batch_size, self.busy, groups)
            if updates:
                job = self._start(Job(Kind.GROUPS, updates, groups=groups))
                self.busy |= job.groups
                return job
        for lane in self.lanes.values():
            due = self.partial or len(lane.queue) >= self.batch_size
            if lane.queue and not lane.busy and due:
                count = min(self.batch_size, len(lane.queue))
                job = Job(Kind.SDK, lane=lane, texts=[lane.queue.popleft() for _ in range(count)])
                lane.busy = True
                lane.bytes -= job.bytes
                self.sdk -= job.count
                self.sdk_bytes -= job.bytes
                return self._start(job)
        return None

    def _start(self, job: Job) -> Job:
        self.jobs.append(job)
        self.in_flight += job.count
        self.in_flight_bytes += job.bytes
        return job

    def finish(self, job: Job, result: Result) -> None:
        """Account for a group or SDK job's result: free its groups or lane, settle receipts.

        Updates left unsent (the exit deadline) go back in front of their
        groups, or of their lane, so the exit keeps them in order.
        """
        if not self._close(job):
            return
        if job.kind is Kind.GROUPS:
            self.busy -= job.groups
            settle_receipts(result.delivered, Fate.DELIVERED)
            settle_receipts(result.filtered, Fate.DELIVERED)  # before_send's choice
            for failure in result.failed:
                settle_receipts([failure.origin], Fate.FAILED, failure.reason)
            if result.unsent and (self.spool_rows or self.spilling()):
                self.before_spool.extend(result.unsent)  # older than the spooled rows
            elif result.unsent:
                self.buffer.restore(result.unsent)
        elif job.kind is Kind.SDK and job.lane is not None:
            job.lane.busy = False
            texts: list[str] = result.unsent
            job.lane.queue.extendleft(reversed(texts))
            job.lane.bytes += sum(map(len, texts))
            self.sdk += len(texts)
            self.sdk_bytes += sum(map(len, texts))

    def finish_spill(self, job: Job, unkept: list[GroupUpdate], max_held: int) -> list[GroupUpdate]:
        """Account for a spill job. Updates the spool did not keep (``unkept``, the
        newest) go back to memory, up to ``max_held`` held in all; returns the rest."""
        if not self._close(job):
            return []
        left = {id(update) for update in unkept}
        settle_receipts([u for u in job.updates if id(u) not in left], Fate.SPOOLED)
        free = max(0, max_held - self.held)
        self.buffer.restore(unkept[:free])
        return unkept[free:]

    def _close(self, job: Job) -> bool:
        self.jobs.remove(job)
        if job.abandoned:
            return False  # the exit took its updates at the deadline
        self.in_flight -= job.count
        self.in_flight_bytes -= job.bytes
        return True

    # -- exit ----------------------------------------------------------------------

    def take_all(self) -> tuple[list[GroupUpdate], list[GroupUpdate], list[str]]:
        """At the exit deadline: updates that go in front of the spool's rows (those
        of jobs in flight or come back unsent), then everything else held, and the
        SDK messages that are lost. Jobs still out are abandoned."""
        front, self.before_spool = self.before_spool, []
        back: list[GroupUpdate] = []
        lost: list[str] = []
        for job in self.jobs:
            if job.abandoned or job.kind is Kind.SPILL:
                continue  # a spill job being written finishes as usual
            job.abandoned = True
            self.in_flight -= job.count
            self.in_flight_bytes -= job.bytes
            if job.kind is Kind.GROUPS:
                self.busy -= job.groups
                front.extend(job.updates)
            elif job.kind is Kind.SDK:
                lost += job.texts
        back += self.to_spill + self.buffer.take_all()
        self.to_spill, self.to_spill_bytes = [], 0
        self.overflow = self.overflow_bytes = 0
        for lane in self.lanes.values():
            lost += lane.queue
            lane.queue.clear()
            lane.bytes = 0
        self.sdk = self.sdk_bytes = 0
        return front, back, lost
