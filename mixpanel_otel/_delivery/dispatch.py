"""Dispatch: which batch goes next, and what its outcome changes. No threads, no I/O.

It owns what the consumer holds in memory: the coalescing buffer, the SDK
lanes and the jobs in flight, with their counts (``held``: pending plus in
flight, the figure ``max_pending`` bounds). The consumer calls it under its
lock; tests call it directly, with no thread and no server.

Order rules, the reason this exists:

- a group with a job in flight is *busy*: none of its later updates is taken;
- rows in the spool are older than anything in memory: while there are any
  (or a spill is writing some), no group job starts, and a spool job starts
  only when no other group job is in flight;
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
    """The in-memory side of delivery: buffer, lanes, jobs in flight, counts."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.buffer = Buffer()
        self.lanes: dict[tuple[Any, ...], Lane] = {}
        self.jobs: list[Job] = []  # in flight, in the order they were taken
        self.busy: set[GroupKey] = set()
        self.in_flight = self.in_flight_bytes = 0
        self.raw = self.raw_bytes = 0
        self.spool_rows = 0  # rows known to be in this process's spool
        self.spilling = 0  # spills writing now
        self.draining = False  # send partial batches (interval tick, flush, exit)
        #: Updates that came back unsent (the exit deadline) while the spool held
        #: newer rows: the exit spill writes them in front of every row.
        self.unsent_front: list[GroupUpdate] = []

    @property
    def held(self) -> int:
        return self.buffer.count + self.in_flight + self.raw + len(self.unsent_front)

    @property
    def held_bytes(self) -> int:
        front = sum(update.size for update in self.unsent_front)
        return self.buffer.bytes + self.in_flight_bytes + self.raw_bytes + front

    def pending(self) -> bool:
        """Anything in memory not yet taken for sending."""
        return bool(self.buffer.count or self.raw)

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

    def add_raw(self, key: tuple[Any, ...], new_lane: Callable[[], Lane], text: str) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = new_lane()
        lane.queue.append(text)
        lane.bytes += len(text)
        self.raw += 1
        self.raw_bytes += len(text)
        return lane

    # -- out -----------------------------------------------------------------------

    def pick(self, spool_ready: bool) -> Optional[Job]:
        """The next job due, or None; ``spool_ready``: a spool exists to replay from."""
        if self.spool_rows or self.spilling or any(j.kind is Kind.SPOOL for j in self.jobs):
            if (
                spool_ready
                and self.spool_rows
                and not self.spilling
                and not any(j.kind is not Kind.RAW for j in self.jobs)
            ):
                return self._start(Job(Kind.SPOOL))
        elif self.buffer.count >= self.batch_size or (self.draining and self.buffer.count):
            updates = self.buffer.take(self.batch_size, self.busy)
            if updates:
                job = self._start(Job(Kind.GROUPS, updates))
                self.busy |= job.groups
                return job
        for lane in self.lanes.values():
            if (
                lane.queue
                and not lane.busy
                and (self.draining or len(lane.queue) >= self.batch_size)
            ):
                count = min(self.batch_size, len(lane.queue))
                job = Job(Kind.RAW, lane=lane, texts=[lane.queue.popleft() for _ in range(count)])
                lane.busy = True
                lane.bytes -= job.bytes
                self.raw -= job.count
                self.raw_bytes -= job.bytes
                return self._start(job)
        return None

    def _start(self, job: Job) -> Job:
        self.jobs.append(job)
        self.in_flight += job.count
        self.in_flight_bytes += job.bytes
        return job

    def finish(self, job: Job, result: Result) -> None:
        """Account for a job's outcome: free its groups and lane, settle receipts.

        Updates left unsent (the exit deadline) go back in front of their
        groups, or of their lane, so the exit spill keeps them in order.
        """
        self.jobs.remove(job)
        if job.abandoned:
            return  # its updates were written to the spool at the deadline
        self.in_flight -= job.count
        self.in_flight_bytes -= job.bytes
        if job.kind is Kind.GROUPS:
            self.busy -= job.groups
            settle_receipts([m.origin for m in result.delivered], Fate.DELIVERED)
            for message, reason in result.refused:
                settle_receipts([message.origin], Fate.FAILED, reason)
            unsent = [m.origin for m in result.unsent if isinstance(m.origin, GroupUpdate)]
            if unsent and (self.spool_rows or self.spilling):
                self.unsent_front.extend(unsent)  # older than the spooled rows: in front of them
            elif unsent:
                self.buffer.restore(unsent)
        elif job.kind is Kind.RAW and job.lane is not None:
            job.lane.busy = False
            texts = [m.text for m in result.unsent]
            job.lane.queue.extendleft(reversed(texts))
            job.lane.bytes += sum(map(len, texts))
            self.raw += len(texts)
            self.raw_bytes += sum(map(len, texts))

    # -- exit and spills -----------------------------------------------------------

    def take_for_spill(self) -> list[GroupUpdate]:
        """Everything pending in the buffer, for the spool; it stays counted while written."""
        updates = self.buffer.take_all()
        self.spilling += 1
        return updates

    def abandon(self) -> tuple[list[GroupUpdate], int]:
        """At the exit deadline: the updates of group jobs that came back unsent
        or are still in flight, now the spool's to keep in front of its rows,
        and how many SDK messages are lost."""
        updates, self.unsent_front = self.unsent_front, []
        lost = 0
        for job in self.jobs:
            if job.abandoned:
                continue
            job.abandoned = True
            self.in_flight -= job.count
            self.in_flight_bytes -= job.bytes
            if job.kind is Kind.GROUPS:
                self.busy -= job.groups
                updates.extend(job.updates)
            elif job.kind is Kind.RAW:
                lost += job.count
        for lane in self.lanes.values():
            lost += len(lane.queue)
            lane.queue.clear()
            lane.bytes = 0
        self.raw = self.raw_bytes = 0
        return updates, lost
