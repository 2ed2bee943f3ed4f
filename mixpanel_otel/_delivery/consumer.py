"""The consumer: the one object every front end hands its updates to.

Data flow: callers append updates to the *inbox* (a deque, no lock, no I/O);
whoever next takes the lock *absorbs* the inbox into the coalescing
:class:`~.buffer.Buffer`. Worker threads (``max_in_flight`` of them) take
:class:`~.jobs.Job` s (a batch each), encode and send them through the
:class:`~.sender.Sender`, and *settle* them: delivered, refused, or put
back. Overflow goes to the :class:`~.spool.Spool` (a *spill*) or is dropped
(:mod:`.admission`). One consumer exists per (token, API host) per process
(:mod:`.registry`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from time import monotonic
from typing import Any, Callable, Optional
from urllib.parse import quote_plus

from .._config import resolve_options
from .._exceptions import MixpanelException
from .._transport import Answer, Outcome, Post, Transport, form_quote
from .._wire import ENDPOINTS, GroupUpdate, Truncations, updates_from_message
from .admission import Admission, decide
from .dispatch import Dispatch, settle_receipts
from .encode import Encoder, Message, Unsendable, shown
from .jobs import Job, Kind, Lane
from .receipts import Fate, Receipt
from .sender import Backoff, Result, Sender
from .spool import Spool
from .stats import Health, Stats, Throttle, logger
from .worker import WORKER_THREADS, Worker

__all__ = ["Consumer"]

_DEFAULT_FLUSH_TIMEOUT = 30.0
_OVERFLOW_WARN_EVERY = 10.0
_HEALTH_WARN_TICKS = 5  # warn when failing for this many flush intervals (at most 30 s)
_STATS_DEBUG_EVERY = 60.0


class Consumer:
    """Buffers, coalesces and delivers group updates (and SDK messages) for one (token, host).

    Build it with :func:`~mixpanel_otel.get_consumer`. It also speaks the
    official SDK's consumer protocol (:meth:`send`), so
    ``Mixpanel(token, consumer=...)`` gets background, batched delivery.
    """

    def __init__(
        self, token: str, base_url: str, *, transport: Optional[Post] = None, **options: Any
    ) -> None:
        opts = resolve_options(options)
        self._token = token
        self.base_url = base_url
        self.flush_interval: float = opts["flush_interval"]
        self.batch_size: int = opts["batch_size"]
        self.max_pending: int = opts["max_pending"]
        self.max_pending_bytes: int = opts["max_pending_bytes"]
        self.max_block: float = opts["max_block"]
        self.max_in_flight: int = opts["max_in_flight"]
        self.request_timeout: float = opts["request_timeout"]
        self.shutdown_timeout: float = opts["shutdown_timeout"]
        self.spool_dir: Optional[str] = opts["spool_dir"]
        self.flush_on_sigterm: bool = opts["flush_on_sigterm"]
        self.on_error: Optional[Callable[..., Any]] = opts["on_error"]
        self._credentials: Any = opts["credentials"]
        self._backoff = Backoff(opts["backoff_base"], opts["backoff_max"])
        self._encoder = Encoder(token, opts["before_send"])
        self._transport_given = transport
        self.truncations = Truncations()
        self._fresh_state()
        if self._spool is not None and self._spool.orphans():
            self._worker.ensure()  # replay what processes that are gone left behind

    def _fresh_state(self) -> None:
        """Everything a forked child must not share with its parent."""
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self.transport: Post = self._transport_given or Transport(
            self.base_url, self.request_timeout, connections=self.max_in_flight + 1
        )
        self._inbox: deque[GroupUpdate] = deque()
        self._inbox_bytes = 0
        self._dispatch = Dispatch(self.batch_size)
        self.held = 0  # pending + in flight, read without the lock by the hot path
        self.held_bytes = 0
        self._spool = Spool(self.spool_dir, self._token, self.base_url) if self.spool_dir else None
        self._spool_adopted = False
        self._spill_lock = threading.Lock()  # one mover at a time keeps the spool in order
        self._finishing = threading.Lock()  # one shutdown at a time
        self._flushing = 0  # flush() calls waiting
        self._eager = False  # after a chained SIGTERM: every update is sent at once
        self._eager_until = 0.0  # ... and callers wait for it until then
        self._next_tick = monotonic() + self.flush_interval
        self._deadline: Optional[float] = None  # the exit deadline while shutting down
        self._closing = False
        self._stopped = False
        self._pause_until = 0.0  # a 429 / Retry-After pauses every request
        self._retry_now = threading.Event()  # flush() and shutdown cut retry waits short
        self._wake_sent = False
        self._debug_due = False
        self._wake_at = max(1, self.batch_size // 2)
        self._gave_up = False  # shut down with updates left: later flushes don't wait again
        self.stats_ = Stats()
        self.truncations.count = 0
        self.health = Health(min(30.0, self.flush_interval * _HEALTH_WARN_TICKS), scrub=self._scrub)
        self._overflow_warning = Throttle(_OVERFLOW_WARN_EVERY)
        self._stats_debug = Throttle(_STATS_DEBUG_EVERY)
        self._worker = Worker(self._loop, self.max_in_flight, "mixpanel-otel-worker")
        self._sender = Sender(
            self.transport,
            request_timeout=self.request_timeout,
            backoff=self._backoff,
            wait=self._retry_wait,
            deadline=lambda: self._deadline,
            on_answer=self._on_answer,
            before_post=self._wait_out_pause,
        )

    def __repr__(self) -> str:
        return f"<mixpanel_otel Consumer {self.base_url} held={self.held}>"

    @property
    def failing(self) -> bool:
        """Delivery is failing right now (the last request got a retryable failure)."""
        return self.health.failing

    # -- callers ----------------------------------------------------------------------

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None:
        """Queue updates from the caller's thread: an append; never I/O, never raises.

        Past ``max_pending`` the caller goes through admission (:mod:`.admission`).
        """
        inbox = self._inbox
        if not isinstance(updates, list):
            updates = list(updates)
        waiting = len(inbox)
        size = sum(update.size for update in updates)
        # Past a batch in the inbox the caller absorbs it itself, under the lock.
        if (
            waiting < self.batch_size
            and self.held + waiting < self.max_pending
            and self.held_bytes + self._inbox_bytes + size < self.max_pending_bytes
        ):
            inbox.extend(updates)
            self._inbox_bytes += size  # not atomic; a rough figure, reset by every absorb
            if len(inbox) >= self._wake_at and not self._wake_sent:
                self._wake_sent = True
                with self._cond:
                    self._cond.notify()
            if not self._worker.started:
                self._worker.ensure()
            if self._eager_until:
                self._deliver_before_returning()
            return
        self._admit(updates, None, wait=True)
        if self._eager_until:
            self._deliver_before_returning()

    def _deliver_before_returning(self) -> None:
        """After a SIGTERM an application handles itself, the process may die by the
        signal once that handler is done: updates made meanwhile (a shutdown hook's
        last log line) are delivered before the call returns, within the exit bound."""
        left = self._eager_until - monotonic()
        if left > 0 and threading.get_ident() not in WORKER_THREADS:
            self.flush(left)

    def submit(self, updates: Sequence[GroupUpdate]) -> Receipt:
        """Queue updates and return a :class:`Receipt` that settles when all are settled.

        Never waits, and sends at once rather than on the next interval. When
        there is no room or delivery is failing, the updates go to the spool
        (the receipt settles as spooled) or, without one, the receipt comes
        back ``refused`` with nothing queued.
        """
        receipt = Receipt(len(updates))
        if not updates:
            return receipt
        if self._spool is None:
            reason = ""
            if self.health.failing:
                reason = f"delivery is failing: {self._scrub(self.health.reason)}"
            elif self.held + len(self._inbox) + len(updates) > self.max_pending:
                reason = f"over max_pending ({self.max_pending})"
            if reason:
                refused = Receipt(len(updates), refused=True, reason=reason)
                refused.retry_after = max(1.0, self._pause_until - monotonic())
                return refused
        for update in updates:
            update.receipts = [receipt]
        if self._spool is not None and (
            self.health.failing or self.held + len(self._inbox) + len(updates) > self.max_pending
        ):
            self._spill(list(updates))  # kept on disk: the receipt settles as spooled
            return receipt
        self._admit(list(updates), receipt, wait=False)
        with self._cond:  # someone waits on this receipt: send now, not on the next tick
            self._dispatch.draining = True
            self._cond.notify_all()
        return receipt

    def _admit(self, updates: list[GroupUpdate], receipt: Optional[Receipt], wait: bool) -> None:
        """Add updates under the lock: merge, take room, wait for room, or overflow."""
        overflow: list[GroupUpdate] = []
        reason = ""
        self._check_fork()
        with self._cond:
            self._absorb()
            wait_until: Optional[float] = None
            position = 0
            while position < len(updates):
                added = self._add(updates[position], room=receipt is None)
                if added:
                    position += 1
                    continue
                now = monotonic()
                verdict, reason = decide(
                    failing=self.health.failing,
                    max_block=self.max_block if wait else 0.0,
                    wait_until=wait_until,
                    now=now,
                    can_wait=self._can_wait(),
                )
                if verdict is Admission.OVERFLOW:
                    overflow = updates[position:]
                    break
                if wait_until is None:
                    wait_until = now + self.max_block
                    self.stats_.add("blocked")
                self._dispatch.draining = True
                self._cond.notify_all()
                self._cond.wait(max(0.0, wait_until - now))
                self._absorb()
            self._count_held()
        if not self._worker.started:
            self._worker.ensure()
        if overflow:
            self._overflow(overflow, reason)

    def _can_wait(self) -> bool:
        return (
            threading.get_ident() not in WORKER_THREADS
            and not self._closing
            and self._worker.started
        )

    def _room(self) -> bool:
        dispatch = self._dispatch
        return dispatch.held < self.max_pending and dispatch.held_bytes < self.max_pending_bytes

    def _add(self, update: GroupUpdate, room: bool = True) -> bool:
        """Coalesce or append one update (the lock is held); False when it needs room."""
        superseded = self._dispatch.add(update, self._room if room else _always)
        if superseded < 0:
            return False
        self.stats_.add("enqueued")
        if superseded:
            self.stats_.add("coalesced", superseded)
        return True

    def _absorb(self) -> None:
        """Move the inbox into the buffer, in order (the lock is held)."""
        inbox = self._inbox
        self._wake_sent = False
        self._inbox_bytes = 0
        if not inbox:
            return
        add, enqueued, coalesced = self._dispatch.add, 0, 0
        while inbox:
            coalesced += add(inbox.popleft(), _always)  # admitted by the caller's check
            enqueued += 1
        self.stats_.add("enqueued", enqueued)
        if coalesced:
            self.stats_.add("coalesced", coalesced)
        self._count_held()

    def _count_held(self) -> None:
        self.held = self._dispatch.held
        self.held_bytes = self._dispatch.held_bytes

    def _overflow(self, updates: list[GroupUpdate], reason: str) -> None:
        if self._spool is not None:
            self._spill(updates)
            return
        with self._cond:
            settle_receipts(updates, Fate.DROPPED, f"dropped: {reason}")
        self.stats_.add("dropped", len(updates))
        suppressed = self._overflow_warning.ready()
        if suppressed is not None:
            logger.warning(
                "mixpanel-otel: %d update(s) dropped: %s (max_pending %d updates / %d bytes); "
                "stats()['dropped'] counts them all%s",
                len(updates),
                reason,
                self.max_pending,
                self.max_pending_bytes,
                f"; {suppressed} more overflow(s) since the last warning" if suppressed else "",
            )

    def _spill(
        self, extra: list[GroupUpdate], in_flight: Optional[list[GroupUpdate]] = None
    ) -> int:
        """Move everything pending, then ``extra``, to the end of the spool (a *spill*).

        ``in_flight`` (at the exit deadline) goes in front of every row. No
        batch of groups starts while a spill writes: the spool's rows are
        older than anything in memory, and they are sent first.
        """
        assert self._spool is not None
        with self._spill_lock:
            with self._cond:
                self._absorb()
                updates = self._dispatch.take_for_spill() + extra
                self._count_held()
            front, front_refused = self._encode_updates(in_flight or [])
            back, back_refused = self._encode_updates(updates)
            kept = self._spool.append([m.text for m in front], front=True) and self._spool.append(
                [m.text for m in back]
            )
            moved = [m.origin for m in front + back]
            with self._cond:
                self._dispatch.spilling -= 1
                if kept:
                    self._dispatch.spool_rows = self._spool.rows
                settle_receipts(moved, Fate.SPOOLED if kept else Fate.DROPPED, "spool unavailable")
                self._cond.notify_all()
        self.stats_.add("spooled" if kept else "dropped", len(moved))
        self._report_refusals(front_refused + back_refused)
        if not kept:
            logger.error("mixpanel-otel: spool unavailable; dropped %d update(s)", len(moved))
        return len(moved) if kept else 0

    def count_invalid(self, count: int = 1) -> None:
        """Count records a front end refused (they never reach the queue)."""
        self.stats_.add("invalid", count)

    def count_ignored(self, count: int = 1) -> None:
        """Count records that carried group tags but no operation (not an error)."""
        self.stats_.add("ignored", count)

    def send(
        self,
        endpoint: str,
        json_message: str,
        api_key: Any = None,
        api_secret: Optional[str] = None,
    ) -> None:
        """The official SDK's consumer protocol: queue one JSON message for ``endpoint``."""
        path = ENDPOINTS.get(endpoint)
        if path is None:
            raise MixpanelException(
                f"No such endpoint {endpoint!r}. Valid endpoints are one of {list(ENDPOINTS)}"
            )
        if isinstance(api_key, tuple):
            api_key, api_secret = api_key
        if endpoint == "groups":
            try:
                message = json.loads(json_message)
            except (TypeError, ValueError):
                raise MixpanelException("groups message is not valid JSON") from None
            if isinstance(message, dict) and message.get("$token", self._token) == self._token:
                self.enqueue(updates_from_message(message, counter=self.truncations))
                return
        self._enqueue_raw(endpoint, path, json_message, api_key, api_secret)

    def _enqueue_raw(
        self, endpoint: str, path: str, text: str, api_key: Optional[str], api_secret: Optional[str]
    ) -> None:
        self._check_fork()
        with self._cond:
            full = not self._room()
            if not full:
                lane = self._dispatch.add_raw(
                    (endpoint, api_key, api_secret),
                    lambda: self._new_lane(endpoint, path, api_key, api_secret),
                    text,
                )
                self.stats_.add("enqueued")
                self._count_held()
                if len(lane.queue) >= self.batch_size:
                    self._cond.notify()
        if full:
            self.stats_.add("dropped")
            self._report(MixpanelException("dropped: the consumer is full"), [text])
        elif not self._worker.started:
            self._worker.ensure()

    def _new_lane(
        self, endpoint: str, path: str, api_key: Optional[str], api_secret: Optional[str]
    ) -> Lane:
        credentials = self._credentials
        if endpoint == "imports" and credentials is not None:
            # Service-account credentials, as the SDK's Consumer(credentials=...) uses them.
            project = quote_plus(str(credentials.project_id))
            return Lane(f"{path}?project_id={project}", (credentials.username, credentials.secret))
        if api_secret:
            extra = f"&api_key={quote_plus(api_key)}" if api_key else ""
            return Lane(path, (api_secret, ""), extra)
        return Lane(path)

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

    # -- the worker's loop -----------------------------------------------------------

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
        result = Result()
        try:
            if job.kind is Kind.GROUPS:
                messages, refusals = self._encode_updates(job.updates)
                path, auth, extra = "/groups", None, ""
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

    # -- waiting, pausing, health ---------------------------------------------------

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

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>")

    # -- flush, stats, exit, fork ---------------------------------------------------

    def send_eagerly(self) -> None:
        """From now on send every update at once, and make callers wait for it
        within ``shutdown_timeout`` (the process is about to stop)."""
        self._eager_until = monotonic() + self.shutdown_timeout
        with self._cond:
            self._eager = True
            self._dispatch.draining = True
            self._cond.notify_all()

    def _settled(self) -> bool:
        """Nothing in memory, nothing being spilled, nothing left in the spool."""
        dispatch = self._dispatch
        return not (self._inbox or dispatch.held or dispatch.spilling or dispatch.spool_rows)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything pending, waiting up to ``timeout`` s (default 30).

        Cuts a retry wait short. True when nothing is left.
        """
        self._check_fork()
        deadline = monotonic() + (_DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout)
        if self._stopped:  # after shutdown: send from this thread, spool the rest
            return self._finish(deadline)
        if self._spool is not None:
            self._adopt_spool()
        with self._cond:
            if self._settled():
                return True
            self._flushing += 1
            self._dispatch.draining = True
            self._cond.notify_all()
        self._retry_now.set()
        try:
            return self._wait_settled(deadline)
        finally:
            with self._cond:
                self._flushing -= 1

    def _wait_settled(self, deadline: float) -> bool:
        """Wait for the workers to settle everything; send from this thread if none can run."""
        inline = not self._worker.ensure()
        with self._cond:
            while not self._settled():
                left = deadline - monotonic()
                if left <= 0:
                    return False
                if inline:
                    self._cond.release()
                    try:
                        job = self._next_job(block=False, inline=True)
                        if job is not None:
                            self._run(job)
                    finally:
                        self._cond.acquire()
                    if job is None:
                        self._cond.wait(min(left, 0.05))
                else:
                    self._cond.wait(min(left, 0.1))
            return True

    def stats(self) -> dict[str, int]:
        """Counters since the consumer started (or since this process forked)."""
        with self._cond:
            self._absorb()
            held, held_bytes = self._dispatch.held, self._dispatch.held_bytes
            jobs = len(self._dispatch.jobs)
            spool_rows = self._dispatch.spool_rows
        stats = self.stats_.snapshot()
        stats.update(
            pending=held,
            pending_bytes=held_bytes,
            in_flight=jobs,
            spool_rows=spool_rows,
            truncated=self.truncations.count,
            failing=int(self.health.failing),
        )
        return stats

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is pending within ``timeout`` (default ``shutdown_timeout``), then stop.

        Idempotent. Whatever is not acknowledged at the deadline, the batches
        in flight included, goes to the spool when there is one. Updates
        added later are sent by the next :meth:`flush`, from its thread.
        """
        self._check_fork()
        timeout = self.shutdown_timeout if timeout is None else timeout
        return self._finish(monotonic() + timeout, timeout)

    def _finish(self, deadline: float, timeout: Optional[float] = None) -> bool:
        # One at a time: a SIGTERM can ask for a shutdown while the exit's runs.
        if not self._finishing.acquire(timeout=max(0.0, deadline - monotonic())):
            return False
        try:
            return self._finish_now(deadline, timeout)
        finally:
            self._finishing.release()

    def _finish_now(self, deadline: float, timeout: Optional[float]) -> bool:
        with self._cond:
            if self._stopped and self._gave_up and not self._inbox:
                return False  # nothing new since the last try: don't wait for the outage again
            self._closing = True
            self._deadline = deadline
            self._dispatch.draining = True
            self._cond.notify_all()
        self._retry_now.set()
        done = self._wait_settled(deadline) if not self._stopped else self._drain_inline(deadline)
        with self._cond:
            self._stopped = True
            self._absorb()
            in_flight, lost = self._dispatch.abandon()
            left = self._dispatch.held + len(in_flight)
            self._cond.notify_all()
        kept = 0
        if self._spool is not None and left:
            kept = self._spill([], in_flight)
        elif left:
            with self._cond:
                dropped = self._dispatch.take_for_spill() + in_flight
                self._dispatch.spilling -= 1
                settle_receipts(dropped, Fate.DROPPED, "not delivered before exit")
                self._count_held()
            self.stats_.add("dropped", len(dropped))
        if lost:
            self.stats_.add("dropped", lost)
        self._gave_up = bool(left or lost)
        if left or lost:
            reason = (
                self.health.reason if self.health.failing else "the server did not answer in time"
            )
            logger.warning(
                "mixpanel-otel: %d update(s) not delivered within the %.1f s "
                "shutdown timeout (%s)%s%s",
                left + lost,
                timeout if timeout is not None else self.shutdown_timeout,
                self._scrub(reason),
                f"; {kept} kept in the spool for the next process" if kept else "",
                f"; {left - kept + lost} lost" if left + lost - kept else "",
            )
        if self._spool is not None:
            self._spool.close()
            with self._cond:
                self._dispatch.spool_rows = 0  # closed: the next process replays them
        return done and not left and not lost

    def _drain_inline(self, deadline: float) -> bool:
        """After shutdown: send what is new from this thread, within ``deadline``."""
        with self._cond:
            self._deadline = deadline
        while monotonic() < deadline:
            job = self._next_job(block=False, inline=True)
            if job is None:
                with self._cond:
                    if self._settled():
                        return True
                    if not self._dispatch.jobs and not self._dispatch.pending():
                        return self._settled()
                continue
            self._run(job)
        return False

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork()

    def after_fork(self) -> None:
        """In a forked child: start empty; the parent keeps (and delivers) its updates."""
        if self._spool is not None:
            self._spool.forget_after_fork()
        self._fresh_state()


def _always() -> bool:
    return True
