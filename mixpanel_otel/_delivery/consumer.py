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

import os
import threading
from collections import deque
from time import monotonic
from typing import Any, Callable, Optional

from .._config import resolve_options
from .._transport import Post, Transport
from .._wire import GroupUpdate, Truncations
from .dispatch import Dispatch
from .encode import Encoder
from .intake import Intake
from .lifecycle import Lifecycle
from .pipeline import Pipeline
from .sender import Backoff, Sender
from .spool import Spool
from .stats import Health, Stats, Throttle
from .worker import Worker

__all__ = ["Consumer"]

_OVERFLOW_WARN_EVERY = 10.0
_HEALTH_WARN_TICKS = 5  # warn when failing for this many flush intervals (at most 30 s)
_STATS_DEBUG_EVERY = 60.0


class Consumer(Intake, Pipeline, Lifecycle):
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

    def count_invalid(self, count: int = 1) -> None:
        """Count records a front end refused (they never reach the queue)."""
        self.stats_.add("invalid", count)

    def count_ignored(self, count: int = 1) -> None:
        """Count records that carried group tags but no operation (not an error)."""
        self.stats_.add("ignored", count)

    def _scrub(self, text: str) -> str:
        """``text`` without the token or the service-account secret (an upstream may echo them)."""
        text = text.replace(self._token, "<token>")
        secret = getattr(self._credentials, "secret", None)
        if secret:
            text = text.replace(str(secret), "<secret>")
        return text

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork()

    def after_fork(self) -> None:
        """In a forked child: start empty; the parent keeps (and delivers) its updates."""
        if self._spool is not None:
            self._spool.forget_after_fork()
        self._fresh_state()
