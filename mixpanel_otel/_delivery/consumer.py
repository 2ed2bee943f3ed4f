"""The consumer: the one object every front end hands its updates to.

A facade over parts that own their state (:class:`~.parts.Parts`): the
:class:`~.ledger.Ledger` (what is held, under the one lock), the
:class:`~.deliverer.Deliverer` (runs a job through encoder, sender and
spool), the :class:`~.lifecycle.Lifecycle` (phase, deadline, pause), the
:class:`~.report.Reporter` (counts, health, ``on_error``) and the
:class:`~.worker.Worker` threads. One consumer exists per (token, API
host) per process (:mod:`.registry`); its exit is one of the process's
exit steps (:mod:`.process`).
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
from . import process
from .parts import Parts
from .receipts import Receipt
from .sdk import SdkRoutes
from .stats import TRAIT_COUNTERS, Health

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
        self.shutdown_timeout = opts.shutdown_timeout  # read by front ends and the gateway
        self.spool_dir = opts.spool_dir  # read by mixpanel_otel._traits, as are these:
        self.trait_interval = opts.trait_interval
        self.trait_state_dir = opts.trait_state_dir
        self.trait_max_groups = opts.trait_max_groups
        #: The engine computing the traits of the front ends on this consumer, set by
        #: :mod:`mixpanel_otel._traits`; :meth:`stats` reports its counters.
        self.trait_engine: Optional[TraitEngine] = None
        #: Installs the process hooks in a forked child that uses this consumer (the
        #: registry sets it on shared consumers).
        self.use_process: Callable[[Consumer], None] = lambda consumer: None
        self.truncations = Truncations()
        self._sdk = SdkRoutes(token, self.options, self.truncations, self.enqueue)
        self._seams = (transport, clock, wait, threads)
        self._fresh()
        if self.parts.spool is not None and self.parts.spool.orphans():
            self.parts.worker.ensure()  # replay what processes that are gone left behind

    def _fresh(self) -> None:
        """Everything a forked child must not share with its parent."""
        transport, clock, wait, threads = self._seams
        if transport is None:
            opts = self.options
            transport = Transport(
                self.base_url, opts.request_timeout, connections=opts.max_in_flight + 1
            )
        self._fresh_in = self._pid = os.getpid()
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
        if type(updates) is not list:
            updates = list(updates)
        size = updates[0].size if len(updates) == 1 else sum([u.size for u in updates])
        parts = self.parts
        if not self._ledger.offer(updates, size):
            parts = self._own_parts()
            parts.admit(updates, wait=True)
        if parts.frozen:
            _wait_for_the_end()
        if not parts.worker.started and not parts.lifecycle.stopped:
            self._own_parts().worker.ensure()

    def submit(self, updates: Sequence[GroupUpdate]) -> Receipt:
        """Queue updates, sent at once, never waiting; the :class:`Receipt` settles when
        each has. No room or delivery failing: the spool takes them (settled as
        spooled) or, without one, the receipt comes back ``refused``, nothing queued."""
        parts = self._own_parts()
        receipt = parts.submit(updates)
        if not parts.worker.started:
            parts.worker.ensure()
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
        parts = self._own_parts()
        key, lane = routed
        if not parts.ledger.add_sdk(key, lane, json_message):
            parts.reporter.dropped([json_message], "the consumer is full")
        elif not parts.worker.started:
            parts.worker.ensure()

    def deliver_now(self, updates: list[GroupUpdate]) -> None:
        """Send ``updates`` from this thread at once; raise unless Mixpanel accepted them
        (``GroupClient(sync=True)``)."""
        self.parts.deliver_now(updates)

    # -- flush and exit --------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything held, waiting up to ``timeout`` s (default 30; once the process
        exits, at most what is left of its exit budget); cuts a retry wait short. True
        when nothing is left and nothing since the call began was refused, dropped or
        left behind."""
        return self._own_parts().flush(self._deadline(timeout, _DEFAULT_FLUSH_TIMEOUT))

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is held within ``timeout`` (default ``shutdown_timeout``; once the
        process exits, at most what is left of its exit budget), then stop; idempotent.
        What is not acknowledged by then, in flight too, goes to the spool if there is
        one. Updates added later go with the next :meth:`flush`."""
        return self._own_parts().shutdown(self._deadline(timeout, self.shutdown_timeout))

    def close_by(self, deadline: float) -> bool:
        """:meth:`shutdown` by ``deadline``, a ``time.monotonic()`` time (an exit step)."""
        return self._own_parts().shutdown(self.parts.lifecycle.clock() + deadline - monotonic())

    def _deadline(self, timeout: Optional[float], default: float) -> float:
        """``timeout`` from now on the consumer's clock, within the exit budget once it runs."""
        now = self.parts.lifecycle.clock()
        deadline = now + (default if timeout is None else timeout)
        exiting = process.exit_deadline()
        return deadline if exiting is None else min(deadline, now + exiting - monotonic())

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

    def _own_parts(self) -> Parts:
        """This process's parts, and its hooks: the first call after a fork installs
        them (and makes new parts, if the registry did not see the fork)."""
        pid = os.getpid()
        if self._pid != pid:
            if self._fresh_in != pid:
                self.after_fork()
            self._pid = pid
            self.use_process(self)
        return self.parts

    def before_fork(self) -> None:
        """Hold the locks across ``fork()``, so the child's copies are not taken mid-change."""
        self.parts.ledger.hold()
        if isinstance(self.transport, Transport):
            self.transport.hold()

    def after_fork_in_parent(self) -> None:
        """Let go of what :meth:`before_fork` took."""
        if isinstance(self.transport, Transport):
            self.transport.let_go()
        self.parts.ledger.let_go()

    def after_fork(self) -> None:
        """In a forked child: start empty; the parent keeps (and delivers) its updates."""
        if isinstance(self.transport, Transport):
            self.transport.let_go()  # the parent's pool: its finalizer closes our copies
        if self.parts.spool is not None:
            self.parts.spool.forget_after_fork()
        self._fresh()
        self._pid = 0  # not used here yet: the first use installs the process hooks


_DEFAULT_FLUSH_TIMEOUT = 30.0


def _wait_for_the_end() -> None:
    """A SIGTERM's exit took everything held and the process dies next: what a caller
    adds now cannot be delivered, so the caller does not go on as if it had been."""
    threading.Event().wait()
