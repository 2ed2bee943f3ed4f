"""Flush and exit: how the consumer empties itself.

:func:`flush` waits for the workers to finish everything held (or runs the
jobs from its own thread when no worker can run); :func:`shutdown` does the
same within a deadline, stops the workers, and then writes what is left,
the jobs in flight included, to the spool, or reports it lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import signals
from .receipts import Fate
from .stats import logger

if TYPE_CHECKING:
    from .consumer import Consumer
    from .parts import Parts

__all__ = ["flush", "shutdown"]

_DEFAULT_FLUSH_TIMEOUT = 30.0


def flush(consumer: Consumer, timeout: Optional[float]) -> bool:
    """See :meth:`Consumer.flush`."""
    parts = consumer.parts
    clock = parts.lifecycle.clock
    deadline = clock() + (_DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout)
    losses = parts.reporter.losses
    if parts.lifecycle.stopped:  # after shutdown: send from this thread, spool the rest
        return shutdown(consumer, deadline, timeout)
    parts.deliverer.adopt()
    if not parts.ledger.empty():
        inline = not parts.worker.ensure()
        parts.lifecycle.begin_flush(deadline if inline else None)
        parts.ledger.hurry()
        try:
            if not _wait_empty(parts, deadline, inline):
                return False
        finally:
            parts.lifecycle.end_flush()
    return parts.reporter.losses == losses


def _wait_empty(parts: Parts, deadline: float, inline: bool) -> bool:
    """Wait until nothing is held; ``inline``: run the jobs from this thread."""
    ledger, lifecycle = parts.ledger, parts.lifecycle
    spool = parts.spool is not None
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
            parts.deliverer.run(job)
            continue
        pause = lifecycle.paused_until - now
        if not lifecycle.wait(min(left, pause if pause > 0 else 0.05)):
            return ledger.empty()  # out of time
    return True


def shutdown(consumer: Consumer, deadline: float, timeout: Optional[float]) -> bool:
    """See :meth:`Consumer.shutdown`; one at a time (a SIGTERM can ask while the exit runs)."""
    clock = consumer.parts.lifecycle.clock
    if not consumer._finishing.acquire(timeout=max(0.0, deadline - clock())):
        return False
    try:
        return _shutdown(consumer, deadline, timeout)
    finally:
        consumer._finishing.release()
        signals.check()


def _shutdown(consumer: Consumer, deadline: float, timeout: Optional[float]) -> bool:
    parts = consumer.parts
    ledger, lifecycle, reporter = parts.ledger, parts.lifecycle, parts.reporter
    if lifecycle.stopped and lifecycle.left_behind and ledger.empty():
        return False  # nothing new since the last try: don't wait for the outage again
    losses = reporter.losses
    inline = lifecycle.stopped  # the workers have ended: send from this thread
    lifecycle.close(deadline)
    ledger.hurry()
    done = _wait_empty(parts, deadline, inline=inline or not parts.worker.ensure())
    lifecycle.stop(left_behind=False)
    ledger.hurry()  # the workers end
    front, back, sdk_lost = ledger.take_all()
    left = front + back
    unkept = left
    if left and parts.spool is not None:
        unkept = parts.deliverer.spill(front, back)
    lost = {id(update) for update in unkept}
    kept = [update for update in left if id(update) not in lost]
    ledger.settle(kept, Fate.SPOOLED)
    if unkept:
        reason = "not delivered before exit"
        if parts.spool is not None:
            reason += "; the spool could not keep them"
        ledger.settle(unkept, Fate.DROPPED, reason)
        reporter.dropped(unkept, reason)
    reporter.dropped_texts(sdk_lost, "not delivered before exit")
    spooled = sum(update.stands_for for update in kept)
    updates = sum(update.stands_for for update in left) + len(sdk_lost)
    if updates:
        why = reporter.health.reason if reporter.health.failing else "no answer in time"
        outcome = [f"{spooled} kept in the spool for the next process"] if spooled else []
        if updates - spooled:
            outcome.append(f"{updates - spooled} lost")
        logger.warning(
            "mixpanel-otel: %d update(s) not delivered within the %.1f s shutdown timeout (%s); %s",
            updates,
            consumer.shutdown_timeout if timeout is None else timeout,
            reporter.scrub(why),
            ", ".join(outcome),
        )
    lifecycle.stop(left_behind=bool(updates))
    if parts.spool is not None:
        parts.spool.close()
        ledger.set_spool_rows(0)  # closed: the next process replays them
    return done and not updates and reporter.losses == losses
