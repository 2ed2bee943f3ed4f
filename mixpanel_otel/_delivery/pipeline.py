"""The worker threads' side: take a job, encode it, send it, settle it.

Also the sender's callbacks (health, 429 pauses, retry waits cut short by
``flush()``), reports to ``on_error``, and ``GroupClient(sync=True)``'s
delivery, which uses the same sender from the caller's thread.
"""

from __future__ import annotations

import logging
import os
import threading
from time import monotonic
from typing import Any, Optional

from .._exceptions import MixpanelException
from .._transport import Answer, Outcome, form_quote
from .._wire import GroupUpdate
from .dispatch import settle_receipts
from .encode import Message, Unsendable, shown
from .jobs import Job, Kind
from .receipts import Fate
from .sender import Backoff, Result, Sender
from .state import ConsumerState
from .stats import logger

__all__ = ["Pipeline"]


class Pipeline(ConsumerState):
    """The worker threads' side of the consumer (see the module docstring)."""

    def _loop(self) -> None:
        """One worker thread: take a job, run it, settle it, until stopped."""
        self._adopt_spool()
        while True:
            job = self._next_job()
            if job is None:
                return
            if self._debug_due:  # logged here, never under the lock
                self._debug_due = False
                self._log_stats()
            self._run(job)

    def _adopt_spool(self) -> None:
        """Take over the spool files of processes that are gone (once, and on flush)."""
        if self._spool is None:
            return
        self._spool.adopt()
        with self._cond:
            self._dispatch.spool_rows = self._spool.rows
            self._cond.notify_all()

    def _next_job(self, block: bool = True, inline: bool = False) -> Optional[Job]:
        """Wait for the next job due; None when stopped (or, unless ``block``, when none is)."""
        dispatch = self._dispatch
        with self._cond:
            while True:
                if (self._stopped and not inline) or self._pid != os.getpid():
                    return None
                self._absorb()
                now = monotonic()
                if now >= self._next_tick and not dispatch.draining:
                    dispatch.draining = True
                    self._debug_due = True
                job = dispatch.pick(self._spool is not None) if self._pause_until <= now else None
                if job is not None:
                    self._count_held()
                    return job
                if dispatch.draining and not dispatch.pending():
                    dispatch.draining = bool(self._flushing or self._closing or self._eager)
                    self._next_tick = now + self.flush_interval
                if not block:
                    return None
                if self._pause_until > now:
                    timeout = self._pause_until - now
                elif dispatch.draining:  # what is left is in flight: a settle notifies
                    timeout = self.flush_interval
                else:
                    timeout = self._next_tick - now
                self._cond.wait(min(max(0.001, timeout), self.flush_interval))

    def _run(self, job: Job) -> None:
        """Encode and send one job (no lock held), then settle it."""
        refusals: list[tuple[Any, str]] = []
        messages: list[Message] = []
        result = Result()
        try:
            if job.kind is Kind.GROUPS:
                path, auth, extra = "/groups", None, ""
                body = self._encoder.batch_body(job.updates)
                sent = self._sender.deliver_body(path, body, job.updates) if body else None
                if isinstance(sent, Result):
                    result = sent
                else:  # not encodable in one piece, or refused: message by message
                    messages, refusals = self._encode_updates(job.updates)
                    if sent is not None and sent.outcome is not Outcome.REJECTED:
                        result.refused = [(message, sent.reason) for message in messages]
                        messages = []  # 401, 403, 4xx: reported, never sent again
            elif job.kind is Kind.SPOOL:
                assert self._spool is not None
                rows = self._spool.peek(self.batch_size)
                self.stats_.add("replayed", len(rows))
                messages = [Message(text, form_quote(text), row_id) for row_id, text in rows]
                path, auth, extra = "/groups", None, ""
            else:
                assert job.lane is not None
                messages, refusals = self._encode_texts(job.texts)
                path, auth, extra = job.lane.path, job.lane.auth, job.lane.extra
            if messages:
                result = self._sender.deliver(path, messages, auth, extra)
        except Exception as exc:  # a bug must not lose the batch or kill the thread
            self.stats_.add("errors")
            logger.error("mixpanel-otel worker error: %s", self._scrub(repr(exc)))
            result = Result(unsent=[Message("", "", update) for update in job.updates])
            self._retry_wait(1.0)  # and must not spin
        if job.kind is Kind.SPOOL and self._spool is not None:
            done = [m.origin for m in result.delivered] + [m.origin for m, _ in result.refused]
            self._spool.ack(done)
        with self._cond:
            self._dispatch.finish(job, result)
            if job.kind is Kind.SPOOL and self._spool is not None:
                self._dispatch.spool_rows = self._spool.rows
            self._count_held()
            self._cond.notify_all()
        self.stats_.add("sent", len(result.delivered))
        self.stats_.add("failed", len(result.refused))
        self._report_refusals([(m.text, reason) for m, reason in result.refused] + refusals)

    def _encode_updates(
        self, updates: list[GroupUpdate]
    ) -> tuple[list[Message], list[tuple[Any, str]]]:
        """Messages for updates; refused and filtered ones are settled here."""
        messages, refused, filtered = self._encoder.updates(updates)
        if refused or filtered:
            settled = [(update, Fate.FAILED, exc.reason) for update, exc in refused]
            settled += [(update, Fate.DELIVERED, "") for update in filtered]  # before_send's choice
            self._release(settled)
        return messages, [(exc.message, exc.reason) for _, exc in refused]

    def _release(self, settled: list[tuple[GroupUpdate, Fate, str]]) -> None:
        """Updates that leave before sending (refused or filtered): free their room."""
        with self._cond:
            for update, fate, reason in settled:
                settle_receipts([update], fate, reason)
                job = next((j for j in self._dispatch.jobs if update in j.updates), None)
                if job is not None and not job.abandoned:
                    job.updates.remove(update)
                    job.count -= 1
                    job.bytes -= update.size
                    self._dispatch.in_flight -= 1
                    self._dispatch.in_flight_bytes -= update.size
            self._count_held()
        filtered = sum(1 for _, fate, _ in settled if fate is Fate.DELIVERED)
        self.stats_.add("filtered", filtered)
        self.stats_.add("failed", len(settled) - filtered)

    def _encode_texts(self, texts: list[str]) -> tuple[list[Message], list[tuple[Any, str]]]:
        messages: list[Message] = []
        refusals: list[tuple[Any, str]] = []
        for text in texts:
            try:
                message = self._encoder.text(text)
            except Unsendable as exc:
                refusals.append((exc.message, exc.reason))
                self.stats_.add("failed")
                continue
            if message is None:
                self.stats_.add("filtered")
            else:
                messages.append(message)
        return messages, refusals

    def _report_refusals(self, refusals: list[tuple[Any, str]]) -> None:
        by_reason: dict[str, list[Any]] = {}
        for message, reason in refusals:
            by_reason.setdefault(reason, []).append(message)
        for reason, messages in by_reason.items():
            self._report(MixpanelException(self._scrub(reason)), messages)

    def _on_answer(self, answer: Answer) -> None:
        self.stats_.add("requests")
        if answer.outcome is Outcome.RETRY:
            self.stats_.add("retries")
            was_failing = self.health.failing
            self.health.failure(answer.reason)
            if not was_failing:  # callers waiting for room overflow now, not after max_block
                with self._cond:
                    self._cond.notify_all()
            if answer.retry_after is not None or answer.reason.startswith("HTTP 429"):
                pause = answer.retry_after if answer.retry_after is not None else self._backoff.base
                with self._cond:
                    self._pause_until = max(self._pause_until, monotonic() + min(pause, 60.0))
        elif answer.outcome is Outcome.OK:
            self.health.success()

    def _wait_out_pause(self) -> bool:
        """Before each request: wait while a 429 pauses the consumer; False to stop."""
        while True:
            left = self._pause_until - monotonic()
            if left <= 0:
                return True
            if not self._retry_wait(left):
                return False

    def _retry_wait(self, delay: float) -> bool:
        """Sleep before a retry, cut short by flush() or shutdown; False when out of time."""
        deadline = self._deadline
        if deadline is not None:
            left = deadline - monotonic()
            if left <= 0.01:
                return False
            delay = min(delay, left)
        if self._retry_now.wait(delay):  # a backoff is cut short; a 429's pause is not
            self._retry_now.clear()
        deadline = self._deadline
        return deadline is None or deadline - monotonic() > 0.01

    def _log_stats(self) -> None:
        if logger.isEnabledFor(logging.DEBUG) and self._stats_debug.ready() is not None:
            logger.debug("mixpanel-otel: stats %s", self.stats())

    def _report(self, error: MixpanelException, messages: list[Any]) -> None:
        """Tell ``on_error`` (or the log) which messages will not be delivered, and why."""
        if not messages:
            return
        if self.on_error is None:
            logger.warning("mixpanel-otel: %d message(s) not delivered: %s", len(messages), error)
            return
        try:
            self.on_error(error, [shown(message, self._token) for message in messages])
        except Exception as exc:
            self.stats_.add("errors")
            logger.error("mixpanel-otel: on_error raised %s", self._scrub(repr(exc)))

    def deliver_now(self, updates: list[GroupUpdate]) -> None:
        """Send ``updates`` from this thread at once; raise unless Mixpanel accepted them.

        The same sender as the background worker, with the official SDK
        ``Consumer``'s patience: a few quick retries. Used by ``GroupClient(sync=True)``.
        """
        messages, refusals = self._encode_updates(updates)
        if refusals:
            raise MixpanelException(refusals[0][1])
        if not messages:
            return
        self.stats_.add("enqueued", len(messages))
        sender = Sender(
            self.transport,
            request_timeout=self.request_timeout,
            backoff=Backoff(0.25, 2.0),
            wait=lambda delay: not threading.Event().wait(delay),
            on_answer=self._on_answer,
            max_attempts=5,
        )
        result = sender.deliver("/groups", messages)
        self.stats_.add("sent", len(result.delivered))
        failed = len(result.refused) + len(result.unsent)
        if failed:
            self.stats_.add("failed", failed)
            reason = result.refused[0][1] if result.refused else result.reason
            raise MixpanelException(f"Mixpanel error: {self._scrub(reason)}")
