"""The deliverer: runs one job through the encoder, the sender and the spool.

A group job is encoded (in one piece when it can be) and sent; an SDK job
sends its lane's messages; a replay job sends the oldest spooled rows and
deletes the ones that are done; a spill job writes updates to the spool.
Each result goes back to the :class:`~.ledger.Ledger`; counts, health and
``on_error`` go through the :class:`~.report.Reporter`.
"""

from __future__ import annotations

import json
import threading
from typing import Optional

from .._transport import Answer, Post
from .._wire import GroupUpdate
from .encode import Encoder, Failure, Texts, Updates
from .jobs import Job, Kind
from .ledger import Ledger
from .lifecycle import Lifecycle
from .report import Reporter
from .sender import Backoff, Result, Sender
from .spool import Spool
from .stats import logger

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
        self.sender = Sender(
            transport,
            self,
            request_timeout=request_timeout,
            backoff=backoff,
            clock=lifecycle.clock,
        )
        self._spool_lock = threading.Lock()  # one writer at a time keeps the spool in order
        self._token_field = '{"$token":' + json.dumps(encoder.token) + ","

    # -- Hooks -----------------------------------------------------------------------

    def answered(self, answer: Answer) -> None:
        was_failing = self.reporter.health.failing
        self.reporter.answered(answer)
        if answer.retry_after is not None or answer.reason.startswith("HTTP 429"):
            pause = answer.retry_after if answer.retry_after is not None else self._backoff.base
            self.lifecycle.pause(pause)
        if not was_failing and self.reporter.health.failing:
            self.ledger.hurry()  # callers waiting for room overflow now, not after max_block

    def may_post(self) -> bool:
        return self.lifecycle.wait_out_pause()

    def wait(self, delay: float) -> bool:
        return self.lifecycle.wait(delay)

    def deadline(self) -> Optional[float]:
        return self.lifecycle.exit_deadline()

    # -- jobs ------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        """Run ``job`` (no lock held) and hand its result to the ledger."""
        if job.kind is Kind.SPILL:
            self._spill_job(job)
            return
        rows: Optional[int] = None
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
                result, rows = self._replay()
        except Exception as exc:  # a bug must not lose the batch or kill the thread
            self.reporter.stats.add("errors")
            logger.error("mixpanel-otel worker error: %s", self.reporter.scrub(repr(exc)))
            result = Result(unsent=list(job.updates or job.texts))
            self.lifecycle.wait(1.0)  # and must not spin
        self.ledger.finish(job, result, rows)
        stats = self.reporter.stats
        stats.add("sent", len(result.delivered))
        if result.filtered:
            stats.add("filtered", len(result.filtered))
        self.reporter.failed(result.failed)

    def _replay(self) -> tuple[Result, int]:
        assert self.spool is not None
        rows = self.spool.peek(self.ledger.batch_size)
        self.reporter.stats.add("replayed", len(rows))
        ids = [row_id for row_id, _ in rows]
        texts = [self._with_token(text) for _, text in rows]
        batch = Texts(self.encoder, texts, origins=ids, before_send=False)
        result = self.sender.deliver(GROUPS_PATH, batch)
        self.spool.ack(result.delivered + [failure.origin for failure in result.failed])
        by_id = dict(rows)
        result.failed = [Failure(f.origin, by_id[f.origin], f.reason) for f in result.failed]
        return result, self.spool.rows

    def _with_token(self, text: str) -> str:
        """A spooled row as sent: rows may be kept without ``$token``; it is added here."""
        if text.startswith("{") and '"$token"' not in text:
            return self._token_field + text[1:]
        return text

    def _spill_job(self, job: Job) -> None:
        try:
            kept = self.spill([], job.updates)
        except Exception as exc:  # a bug must not leave the job out forever
            self.reporter.stats.add("errors")
            logger.error("mixpanel-otel spill error: %s", self.reporter.scrub(repr(exc)))
            kept = False
        lost = self.ledger.finish(job, None, self.spool.rows if kept and self.spool else None)
        self.reporter.dropped(lost, "the spool could not keep them and memory is full")

    def spill(self, front: list[GroupUpdate], back: list[GroupUpdate]) -> bool:
        """Write ``front`` before every spooled row and ``back`` after them; False
        when the spool kept nothing (then nothing is counted as spooled)."""
        assert self.spool is not None
        result = Result()
        with self._spool_lock:
            texts = [
                [m.text for m in Updates(self.encoder, updates).messages(result)]
                for updates in (front, back)
            ]
            kept = self.spool.append(texts[0], front=True) and self.spool.append(texts[1])
        if kept:
            self.reporter.stats.add("spooled", len(texts[0]) + len(texts[1]))
        self.reporter.failed(result.failed)
        return kept

    def adopt(self) -> None:
        """Take over the spool files of processes that are gone."""
        if self.spool is not None:
            self.spool.adopt()
            self.ledger.set_spool_rows(self.spool.rows)
