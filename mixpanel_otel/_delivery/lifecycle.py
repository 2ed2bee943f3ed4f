"""Flush, exit and spills: how the consumer empties itself.

``flush()`` waits for the workers (or sends from its own thread when none
can run); ``shutdown()`` does the same within a deadline and then writes
what is left, the batches in flight included, to the spool (a *spill*).
"""

from __future__ import annotations

from time import monotonic
from typing import Optional

from .._wire import GroupUpdate
from . import signals
from .dispatch import settle_receipts
from .receipts import Fate
from .state import ConsumerState
from .stats import logger

__all__ = ["Lifecycle"]

_DEFAULT_FLUSH_TIMEOUT = 30.0


class Lifecycle(ConsumerState):
    """Flush, exit and spills of the consumer (see the module docstring)."""

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
        signals.check()
        return len(moved) if kept else 0

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
            signals.check()

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
