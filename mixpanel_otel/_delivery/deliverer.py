"""The deliverer: runs one job through the encoder, the sender and the spool.

A group job is encoded (in one piece when it can be) and sent; an SDK job
sends its lane's messages; a replay job sends the oldest spooled rows and
deletes the ones that are done; a spill job writes updates to the spool.
Each result goes back to the :class:`~.ledger.Ledger`; counts, health and
``on_error`` go through the :class:`~.report.Reporter`.
"""

from __future__ import annotations

from typing import Optional

from .._transport import Answer, Post
from .._wire import GroupUpdate
from .encode import Encoder, Failure, Texts, Updates
from .jobs import Job, Kind
from .ledger import Ledger
from .lifecycle import Lifecycle
from .report import Reporter
from .sender import Backoff, Result, Sender
from .spool import Reading, Spool

__all__ = ["Deliverer"]

GROUPS_PATH = "/groups"


class Deliverer:
    """Runs jobs; the sender's hooks (answers, pauses, waits, the exit deadline)."""

    def __init__(
        self,
        ledger: Ledger,
        lifecycle: Lifecycle,
        reporter: Reporter,
        encoder: Encoder,
        transport: Post,
        spool: Optional[Spool],
        *,
        request_timeout: float,
        backoff: Backoff,
    ) -> None:
        self.ledger = ledger
        self.lifecycle = lifecycle
        self.reporter = reporter
        self.encoder = encoder
        self.spool = spool
        self._backoff = backoff
        # The sender's other hooks are the lifecycle's: pauses, waits, the exit deadline.
        self.may_post = lifecycle.wait_out_pause
        self.wait = lifecycle.wait
        self.deadline = lifecycle.exit_deadline
        self.sender = Sender(
            transport,
            self,
            request_timeout=request_timeout,
            backoff=backoff,
            clock=lifecycle.clock,
        )

    def answered(self, answer: Answer) -> None:
        was_failing = self.reporter.health.failing
        self.reporter.answered(answer)
        if answer.retry_after is not None or answer.reason.startswith("HTTP 429"):
            pause = answer.retry_after if answer.retry_after is not None else self._backoff.base
            self.lifecycle.pause(pause)
        if not was_failing and self.reporter.health.failing:
            self.ledger.hurry()  # callers waiting for room overflow now, not after max_block

    # -- jobs ------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        """Run ``job`` (no lock held) and hand its result to the ledger."""
        if job.kind is Kind.SPILL:
            self._spill_job(job)
            return
        reading: Optional[Reading] = None
        try:
            if job.kind is Kind.GROUPS:
                result = self.sender.deliver(GROUPS_PATH, Updates(self.encoder, job.updates))
            elif job.kind is Kind.SDK:
                assert job.lane is not None
                lane = job.lane
                result = self.sender.deliver(
                    lane.path, Texts(self.encoder, job.texts), lane.auth, lane.extra
                )
            else:
                result, reading = self._replay()
        except Exception as exc:  # a bug must not lose the batch or kill the thread
            self.reporter.error("the worker", exc)
            result = Result(unsent=list(job.updates or job.texts))
            self.lifecycle.wait(1.0)  # and must not spin
        # Counted before the ledger hears of it: a flush returns as soon as it does.
        stats = self.reporter.stats
        stats.add("sent", len(result.delivered))
        if result.filtered:
            stats.add("filtered", len(result.filtered))
        self.reporter.failed(result.failed)
        self.ledger.finish(job, result, reading)

    def _replay(self) -> tuple[Result, Reading]:
        assert self.spool is not None
        rows = self.spool.peek(self.ledger.batch_size)
        self.reporter.stats.add("replayed", len(rows))
        ids = [row_id for row_id, _ in rows]
        texts = [text for _, text in rows]
        batch = Texts(self.encoder, texts, origins=ids, before_send=False)
        result = self.sender.deliver(GROUPS_PATH, batch)
        self.spool.ack(result.delivered + [failure.origin for failure in result.failed])
        by_id = dict(rows)
        result.failed = [Failure(f.origin, by_id[f.origin], f.reason) for f in result.failed]
        return result, self.spool.reading()

    def _spill_job(self, job: Job) -> None:
        try:
            unkept = self.spill([], job.updates)
        except Exception as exc:  # a bug must not leave the job out forever
            self.reporter.error("a spill", exc)
            unkept = job.updates
        assert self.spool is not None
        lost = self.ledger.finish_spill(job, unkept, self.spool.reading())
        self.reporter.dropped(lost, "the spool could not keep them and memory is full")

    def spill(self, front: list[GroupUpdate], back: list[GroupUpdate]) -> list[GroupUpdate]:
        """Write ``front`` before every spooled row and ``back`` after them, as much as
        fits; returns the updates the spool did not keep, in order (only what was
        kept is counted as spooled)."""
        assert self.spool is not None
        result = Result()
        with self.spool.lock:  # encoding too: a spill that began first is written first
            fronts = Updates(self.encoder, front).messages(result)
            backs = Updates(self.encoder, back).messages(result)
            kept = self.spool.append([m.text for m in backs], before=[m.text for m in fronts])
        if kept:
            self.reporter.stats.add("spooled", kept)
        self.reporter.failed(result.failed)
        return [message.origin for message in (fronts + backs)[kept:]]

    def adopt(self) -> None:
        """Take over the spool files of processes that are gone."""
        if self.spool is not None:
            self.spool.adopt()
            self.ledger.note_spool(self.spool.reading())
