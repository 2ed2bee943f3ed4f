"""The consumer: the one object every front end hands its updates to.

A facade over parts that own their state: the :class:`~.ledger.Ledger`
(what is held, under the one lock), the :class:`~.deliverer.Deliverer`
(runs a job through encoder, sender and spool), the
:class:`~.lifecycle.Lifecycle` (phase, deadline, pause), the
:class:`~.report.Reporter` (counts, health, ``on_error``) and the
:class:`~.worker.Worker` threads. Flush and exit are in :mod:`.closing`.
One consumer exists per (token, API host) per process (:mod:`.registry`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._config import resolve_options
from .._transport import Post, Transport
from .._wire import GroupUpdate, Truncations
from . import closing, signals
from .parts import Parts
from .receipts import Receipt
from .sdk import SdkRoutes
from .stats import TRAIT_COUNTERS, Health
from .worker import WORKER_THREADS

if TYPE_CHECKING:
    from .._traits import TraitEngine

__all__ = ["Consumer"]


class Consumer:
    """Buffers, coalesces and delivers group updates (and SDK messages) for one (token, host).

    Build it with :func:`~mixpanel_otel.get_consumer`. It also speaks the
    official SDK's consumer protocol (:meth:`send`), so
    ``Mixpanel(token, consumer=...)`` gets background, batched delivery.
    ``transport``, ``clock``, ``wait`` and ``threads=False`` are test seams.
    """

    def __init__(
        self,
        token: str,
        base_url: str,
        *,
        transport: Optional[Post] = None,
        clock: Callable[[], float] = monotonic,
        wait: Optional[Callable[[float], bool]] = None,
        threads: bool = True,
        **options: Any,
    ) -> None:
        self.options = resolve_options(options)
        self._token = token
        self.base_url = base_url
        opts = self.options
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
        self.trait_interval: float = opts["trait_interval"]  # read by mixpanel_otel._traits
        self.trait_state_dir: Optional[str] = opts["trait_state_dir"]
        self.trait_max_groups: int = opts["trait_max_groups"]
        #: The engine computing the traits of the front ends on this consumer, set by
        #: :mod:`mixpanel_otel._traits`; :meth:`stats` reports its counters.
        self.trait_engine: Optional[TraitEngine] = None
        self.on_error: Optional[Callable[..., Any]] = opts["on_error"]
        self.truncations = Truncations()
        self._sdk = SdkRoutes(token, self.options, self.truncations, self.enqueue)
        self._seams = (transport, clock, wait, threads)
        self._finishing = threading.Lock()  # one shutdown at a time
        self._fresh()
        if self.parts.spool is not None and self.parts.spool.orphans():
            self.parts.worker.ensure()  # replay what processes that are gone left behind

    def _fresh(self) -> None:
        """Everything a forked child must not share with its parent."""
        transport, clock, wait, threads = self._seams
        if transport is None:
            opts = self.options
            transport = Transport(
                self.base_url, opts["request_timeout"], connections=opts["max_in_flight"] + 1
            )
        self._pid = os.getpid()
        self.transport = transport
        self.parts = Parts(self._token, self.base_url, self.options, transport, clock, wait)
        self._ledger = self.parts.ledger  # the hot path's one hop
        self.parts.worker.enabled = threads
        self.truncations.count = 0

    def __repr__(self) -> str:
        return f"<mixpanel_otel Consumer {self.base_url} held={self.parts.ledger.held}>"

    @property
    def failing(self) -> bool:
        """Delivery is failing right now (the last request got a retryable failure)."""
        return self.parts.reporter.health.failing

    @property
    def health(self) -> Health:
        """Whether delivery is failing, since when and why."""
        return self.parts.reporter.health

    # -- callers ---------------------------------------------------------------------

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None:
        """Queue updates from the caller's thread: no I/O, never raises. Usually an
        append; past the bounds, admission (:mod:`.admission`): wait, or overflow."""
        if not isinstance(updates, list):
            updates = list(updates)
        parts = self.parts
        if not self._ledger.offer(updates, sum(update.size for update in updates)):
            if self._pid != os.getpid():  # a fork the registry did not see
                self.after_fork()
                parts = self.parts
            parts.admit(updates, wait=True)
        lifecycle = parts.lifecycle
        if not parts.worker.started and not lifecycle.stopped:
            parts.worker.ensure()
        if lifecycle.deadline is not None and lifecycle.eager:
            # After a SIGTERM the application handles, the process may die by the
            # signal once its handler is done: deliver before returning.
            left = lifecycle.eager_left()
            if left > 0 and threading.get_ident() not in WORKER_THREADS:
                self.flush(left)
        if signals.pending:
            signals.check()

    def submit(self, updates: Sequence[GroupUpdate]) -> Receipt:
        """Queue updates, sent at once, never waiting; the :class:`Receipt` settles when
        each has. No room or delivery failing: the spool takes them (settled as
        spooled) or, without one, the receipt comes back ``refused``, nothing queued."""
        if self._pid != os.getpid():
            self.after_fork()
        receipt = self.parts.submit(updates)
        if not self.parts.worker.started:
            self.parts.worker.ensure()
        return receipt

    def send(
        self,
        endpoint: str,
        json_message: str,
        api_key: Any = None,
        api_secret: Optional[str] = None,
    ) -> None:
        """The official SDK's consumer protocol: queue one JSON message for ``endpoint``."""
        routed = self._sdk.route(endpoint, json_message, api_key, api_secret)
        if routed is None:  # a groups message, enqueued as updates
            return
        if self._pid != os.getpid():
            self.after_fork()
        key, lane = routed
        if not self.parts.ledger.add_sdk(key, lane, json_message):
            self.parts.reporter.dropped_texts([json_message], "the consumer is full")
        elif not self.parts.worker.started:
            self.parts.worker.ensure()

    def deliver_now(self, updates: list[GroupUpdate]) -> None:
        """Send ``updates`` from this thread at once; raise unless Mixpanel accepted them
        (``GroupClient(sync=True)``)."""
        self.parts.deliver_now(updates)

    # -- flush and exit --------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything held, waiting up to ``timeout`` s (default 30); cuts a retry
        wait short. True when nothing is left and nothing since the call began was
        refused, dropped or left behind."""
        if self._pid != os.getpid():
            self.after_fork()
        return closing.flush(self, timeout)

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is held within ``timeout`` (default ``shutdown_timeout``), then
        stop; idempotent. What is not acknowledged by then, in flight too, goes to the
        spool if there is one. Updates added later go with the next :meth:`flush`."""
        if self._pid != os.getpid():
            self.after_fork()
        timeout = self.shutdown_timeout if timeout is None else timeout
        return closing.shutdown(self, self.parts.lifecycle.clock() + timeout, timeout)

    def send_eagerly(self) -> None:
        """From now on send every update at once, and make callers wait for it
        within ``shutdown_timeout`` (the process is about to stop)."""
        self.parts.lifecycle.go_eager(self.shutdown_timeout)
        self.parts.ledger.hurry()

    # -- reporting -------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since the consumer started (or since this process forked)."""
        stats = self.parts.reporter.stats.snapshot()
        stats.update(self.parts.ledger.snapshot())
        stats.update(truncated=self.truncations.count, failing=int(self.failing))
        engine = self.trait_engine
        stats.update(engine.snapshot() if engine is not None else dict.fromkeys(TRAIT_COUNTERS, 0))
        return stats

    def count_invalid(self, count: int = 1) -> None:
        """Count records a front end could not use (they never reach the queue)."""
        self.parts.reporter.stats.add("invalid", count)

    def count_ignored(self, count: int = 1) -> None:
        """Count records that carried group tags but no operation (not an error)."""
        self.parts.reporter.stats.add("ignored", count)

    # -- processes -------------------------------------------------------------------

    def quiescent(self, timeout: float = 0.05) -> bool:
        """Whether this consumer's locks can be taken within ``timeout`` s each now
        (a SIGTERM handler asks before flushing; see :mod:`.signals`)."""
        if not self._finishing.acquire(timeout=timeout):
            return False
        self._finishing.release()
        return self.parts.quiescent(timeout)

    def before_fork(self) -> None:
        """Hold the lock across ``fork()``, so the child's copy is not taken mid-change."""
        self.parts.ledger.hold()

    def after_fork_in_parent(self) -> None:
        """Let go of what :meth:`before_fork` took."""
        self.parts.ledger.let_go()

    def after_fork(self) -> None:
        """In a forked child: start empty; the parent keeps (and delivers) its updates."""
        if self.parts.spool is not None:
            self.parts.spool.forget_after_fork()
        self._finishing = threading.Lock()
        self._fresh()
