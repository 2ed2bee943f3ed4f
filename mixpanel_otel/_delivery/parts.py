"""The parts of one consumer, built together (a forked child builds new ones), and what
needs more than one of them: the workers' loop, admission and overflow, receipts, the
synchronous path, flush and shutdown (what is left at the deadline goes to the spool).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Callable, Optional

from .._config import Options
from .._exceptions import MixpanelException
from .._transport import Post
from .._wire import GroupUpdate
from . import process
from .admission import overflow_reason
from .deliverer import Deliverer
from .encode import Encoder, Updates
from .ledger import Ledger
from .lifecycle import Lifecycle
from .receipts import Fate, Receipt
from .report import Reporter
from .sender import Backoff, Messages, Result, Sender, SyncHooks
from .spool import Spool
from .stats import Throttle, logger
from .worker import WORKER_THREADS, Worker

__all__ = ["Parts"]

_HEALTH_WARN_TICKS = 5  # warn when failing for this many flush intervals (at most 30 s)
_STATS_DEBUG_EVERY = 60.0
# Of a shutdown's time, what is kept for writing the rest to the spool (at most _SPILL_MAX s).
_SPILL_SHARE = 0.25
_SPILL_MAX = 1.0


class Parts:
    """Ledger, lifecycle, reporter, deliverer, spool and worker of one consumer."""

    def __init__(
        self,
        token: str,
        base_url: str,
        options: Options,
        transport: Post,
        clock: Callable[[], float],
        wait: Optional[Callable[[float], bool]],
    ) -> None:
        self.options = options
        warn_after = min(30.0, options.flush_interval * _HEALTH_WARN_TICKS)
        secret = getattr(options.credentials, "secret", None)
        self.reporter = Reporter(
            token, options.on_error, warn_after, clock, str(secret) if secret else None
        )
        self.lifecycle = Lifecycle(clock, wait)
        self.ledger = Ledger(
            self.reporter.stats,
            batch_size=options.batch_size,
            max_pending=options.max_pending,
            max_pending_bytes=options.max_pending_bytes,
            max_in_flight=options.max_in_flight,
            flush_interval=options.flush_interval,
            clock=clock,
        )
        self.spool = Spool(options.spool_dir, token, base_url) if options.spool_dir else None
        self.encoder = Encoder(token, options.before_send)
        self.deliverer = Deliverer(
            self.ledger,
            self.lifecycle,
            self.reporter,
            self.encoder,
            transport,
            self.spool,
            request_timeout=options.request_timeout,
            backoff=Backoff(options.backoff_base, options.backoff_max),
        )
        # One thread more than requests in flight with a spool: a spill never waits.
        threads = options.max_in_flight + (1 if self.spool is not None else 0)
        self.worker = Worker(self._loop, threads, "mixpanel-otel-worker")
        self._stats_debug = Throttle(_STATS_DEBUG_EVERY, lock=self.reporter.stats.lock)
        self._finishing = threading.Lock()  # one shutdown at a time
        #: Set when a SIGTERM's exit has taken everything held: the process dies next,
        #: and a caller that adds more is stopped there (:meth:`.Consumer.enqueue`).
        self.frozen = False

    def _loop(self) -> None:
        """One worker thread: take a job, run it, until stopped."""
        self.deliverer.adopt()
        ledger, lifecycle, spool = self.ledger, self.lifecycle, self.spool is not None
        while True:
            job = ledger.next_job(lifecycle, spool)
            if job is None:
                return
            self.deliverer.run(job)
            if logger.isEnabledFor(logging.DEBUG) and self._stats_debug.allow()[0]:
                logger.debug("mixpanel-otel: stats %s", self.reporter.stats.snapshot())

    # -- callers ---------------------------------------------------------------------

    def admit(self, updates: list[GroupUpdate], wait: bool) -> None:
        """The slow path of enqueue: add what has room, wait for more, or overflow."""
        max_block = self.options.max_block if wait else 0.0
        clock = self.lifecycle.clock
        wait_until: Optional[float] = None
        while True:
            updates = updates[self.ledger.add(updates) :]
            if not updates:
                return
            now = clock()
            reason = overflow_reason(
                failing=self.reporter.health.failing,
                max_block=max_block,
                wait_until=wait_until,
                now=now,
                can_wait=self._can_wait(),
            )
            if reason:
                self.overflow(updates, reason, wait)
                return
            if wait_until is None:
                wait_until = now + max_block
                self.reporter.stats.add("blocked")
            self.ledger.wait_for_room(wait_until - now)

    def _can_wait(self) -> bool:
        return (
            threading.get_ident() not in WORKER_THREADS
            and not self.lifecycle.closing
            and self.worker.started
        )

    def overflow(self, updates: list[GroupUpdate], reason: str, wait: bool) -> None:
        """Updates that found no room: to a spill job when there is a spool, else dropped."""
        if self.spool is not None:
            updates = self._spill_later(updates, self.options.max_block if wait else 0.0)
            reason = "the spool writer is behind"
        if updates:
            reason = f"{reason} (max_pending {self.options.max_pending})"
            self.ledger.settle(updates, Fate.DROPPED, f"dropped: {reason}")
            self.reporter.dropped(updates, reason)

    def _spill_later(self, updates: list[GroupUpdate], wait: float) -> list[GroupUpdate]:
        """Hand overflow to a spill job, waiting up to ``wait`` s while a few batches
        already wait for the spool; returns what does not fit."""
        clock = self.lifecycle.clock
        wait_until = clock() + wait
        while updates:
            left = wait_until - clock()
            patient = left > 0 and self._can_wait()
            updates = updates[self.ledger.to_spill(updates, patient) :]
            if not patient:
                break
            if updates:
                self.ledger.wait_for_room(left, spill=True)
        return updates

    def submit(self, updates: Sequence[GroupUpdate]) -> Receipt:
        receipt = Receipt(len(updates))
        if not updates:
            return receipt
        failing = self.reporter.health.failing
        full = self.ledger.held + len(updates) > self.options.max_pending
        if self.spool is None and (failing or full):
            reason = f"over max_pending ({self.options.max_pending})"
            if failing:
                reason = f"delivery is failing: {self.reporter.scrub(self.reporter.health.reason)}"
            refused = Receipt(len(updates), refused=True, reason=reason)
            refused.retry_after = max(1.0, self.lifecycle.paused_until - self.lifecycle.clock())
            return refused
        for update in updates:
            update.receipts = [receipt]
        if failing or full:  # kept on disk: the receipt settles as spooled
            self.overflow(list(updates), "no room or delivery is failing", wait=False)
        else:  # someone waits on this receipt: sent now, not on the next tick
            self.ledger.add(list(updates), bounded=False)
        return receipt

    def deliver_now(self, updates: list[GroupUpdate]) -> None:
        """Send from this thread with the official SDK ``Consumer``'s patience (a few
        quick retries); raise unless Mixpanel accepted every update."""
        stats, result = self.reporter.stats, Result()
        messages = Updates(self.encoder, updates).messages(result)
        if result.failed:
            stats.add("failed", len(result.failed))
            raise MixpanelException(result.failed[0].reason)
        if not messages:
            return
        stats.add("enqueued", len(messages))
        sender = Sender(
            self.deliverer.sender.transport,
            SyncHooks(self.reporter.answered),
            request_timeout=self.options.request_timeout,
            backoff=Backoff(0.25, 2.0),
            max_attempts=5,
        )
        result = sender.deliver("/groups", Messages(messages))
        stats.add("sent", len(result.delivered))
        failed = len(result.failed) + len(result.unsent)
        if failed:
            stats.add("failed", failed)
            reason = result.failed[0].reason if result.failed else result.reason
            raise MixpanelException(f"Mixpanel error: {self.reporter.scrub(reason)}")

    # -- flush and exit --------------------------------------------------------------

    def flush(self, deadline: float) -> bool:
        """See :meth:`.Consumer.flush`."""
        losses = self.reporter.losses
        if self.lifecycle.stopped:  # after shutdown: send from this thread, spool the rest
            return self.shutdown(deadline)
        self.deliverer.adopt()
        if not self.ledger.empty():
            inline = not self.worker.ensure()
            self.lifecycle.begin_flush(deadline if inline else None)
            self.ledger.hurry()
            try:
                if not self._wait_empty(deadline, inline):
                    return False
            finally:
                self.lifecycle.end_flush()
        return self.reporter.losses == losses

    def _wait_empty(self, deadline: float, inline: bool) -> bool:
        """Wait until nothing is held; ``inline``: run the jobs from this thread."""
        ledger, lifecycle = self.ledger, self.lifecycle
        spool = self.spool is not None
        while not ledger.empty():
            now = lifecycle.clock()
            left = deadline - now
            if left <= 0:
                return False
            if not inline:
                ledger.wait_for_change(min(left, 0.1))
                continue
            job = ledger.next_job(lifecycle, spool, block=False)
            if job is not None:
                self.deliverer.run(job)
                continue
            pause = lifecycle.paused_until - now
            if not lifecycle.wait(min(left, pause if pause > 0 else 0.05)):
                return ledger.empty()  # out of time
        return True

    def shutdown(self, deadline: float) -> bool:
        """See :meth:`.Consumer.shutdown`; one at a time (a SIGTERM can ask while the exit runs)."""
        if not self._finishing.acquire(timeout=max(0.0, deadline - self.lifecycle.clock())):
            return False
        try:
            return self._shutdown(deadline)
        finally:
            self._finishing.release()

    def _shutdown(self, deadline: float) -> bool:
        ledger, lifecycle, reporter = self.ledger, self.lifecycle, self.reporter
        if lifecycle.stopped and lifecycle.left_behind and ledger.empty():
            return False  # nothing new since the last try: don't wait for the outage again
        losses = reporter.losses
        inline = lifecycle.stopped  # the workers have ended: send from this thread
        send_until = deadline
        if self.spool is not None:  # what is left goes to the spool before the deadline
            send_until -= min(_SPILL_MAX, _SPILL_SHARE * max(0.0, deadline - lifecycle.clock()))
        lifecycle.close(send_until)
        ledger.hurry()
        done = self._wait_empty(send_until, inline=inline or not self.worker.ensure())
        lifecycle.stop(left_behind=False)
        ledger.hurry()  # the workers end, once their job is done: a spill job being
        self.worker.join(max(0.0, deadline - lifecycle.clock()) / 2)  # written is kept
        self.frozen = process.dying()  # before the take: whoever adds after it sees it
        front, back, sdk_lost = ledger.take_all()
        left = front + back
        unkept = self.deliverer.spill(front, back) if left and self.spool is not None else left
        lost = {id(update) for update in unkept}
        kept = [update for update in left if id(update) not in lost]
        ledger.settle(kept, Fate.SPOOLED)
        if unkept:
            reason = "not delivered before exit"
            if self.spool is not None:
                reason += "; the spool could not keep them"
            ledger.settle(unkept, Fate.DROPPED, reason)
            reporter.dropped(unkept, reason)
        reporter.dropped(sdk_lost, "not delivered before exit")
        updates = sum(update.stands_for for update in left) + len(sdk_lost)
        if updates:
            self._report_left(updates, sum(update.stands_for for update in kept))
        lifecycle.stop(left_behind=bool(updates))
        if self.spool is not None:
            self.spool.close()
            ledger.set_spool_rows(0)  # closed: the next process replays them
        return done and not updates and reporter.losses == losses

    def _report_left(self, updates: int, spooled: int) -> None:
        """The exit line: what was not delivered, and where it went."""
        health = self.reporter.health
        why = health.reason if health.failing else "no answer in time"
        outcome = [f"{spooled} kept in the spool for the next process"] if spooled else []
        if updates - spooled:
            outcome.append(f"{updates - spooled} lost")
        logger.warning(
            "mixpanel-otel: %d update(s) not delivered within the %.1f s shutdown timeout (%s); %s",
            updates,
            self.options.shutdown_timeout,
            self.reporter.scrub(why),
            ", ".join(outcome),
        )
