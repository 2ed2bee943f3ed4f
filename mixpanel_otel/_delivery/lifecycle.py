"""The lifecycle: which phase the consumer is in, and the clock it keeps.

One state machine instead of flags::

    RUNNING ──shutdown()──► CLOSING ──► STOPPED
                               ▲            │
                               └──flush()───┘   (sends from the caller's thread)

``FLUSHING`` is RUNNING while a :meth:`Consumer.flush` waits. CLOSING has
the *deadline* for sending: retries stop there and whatever is left goes to
the spool. STOPPED notes whether the last shutdown *left* updates behind, so
the next one does not wait for the same outage again. A 429 (or Retry-After)
*pauses* every request until a time the lifecycle keeps.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable, Optional

__all__ = ["Lifecycle", "Phase"]


class Phase(enum.Enum):
    RUNNING = "running"
    FLUSHING = "flushing"  # RUNNING with a flush() waiting
    CLOSING = "closing"  # shutdown(): until the exit deadline
    STOPPED = "stopped"


class Lifecycle:
    """The consumer's phase, its deadline and the pause; waits that they cut short.

    ``wait(seconds) -> bool`` (injected by tests with a fake clock) sleeps and
    returns True when it was cut short; by default on an event that a flush or a
    shutdown sets.
    """

    def __init__(
        self, clock: Callable[[], float], wait: Optional[Callable[[float], bool]] = None
    ) -> None:
        self.clock = clock
        self._phase = Phase.RUNNING
        self._flushes = 0  # flush() calls waiting
        self._inline_until: Optional[float] = None  # a flush sending from its own thread
        self.deadline: Optional[float] = None  # CLOSING: when sending stops
        self.left_behind = False  # STOPPED with updates not delivered
        self.paused_until = 0.0  # a 429: no request before then
        self._hurry = threading.Event()
        self._wait = wait or self._event_wait

    @property
    def phase(self) -> Phase:
        if self._phase is Phase.RUNNING and self._flushes:
            return Phase.FLUSHING
        return self._phase

    # -- what the ledger and the callers ask ------------------------------------------

    @property
    def stopped(self) -> bool:
        return self._phase is Phase.STOPPED

    @property
    def closing(self) -> bool:
        return self._phase is Phase.CLOSING

    @property
    def urgent(self) -> bool:
        """Partial batches go now, not on the next interval (a flush, an exit)."""
        return self.phase is not Phase.RUNNING

    # -- transitions ------------------------------------------------------------------

    def begin_flush(self, inline_until: Optional[float] = None) -> None:
        """A flush waits; ``inline_until``: it sends from its own thread until then."""
        self._flushes += 1
        if inline_until is not None:
            self._inline_until = inline_until
        self._hurry.set()

    def end_flush(self) -> None:
        self._flushes -= 1
        self._inline_until = None

    def close(self, deadline: float) -> None:
        """Begin a shutdown (or, once stopped, a flush from the caller's thread)."""
        self._phase = Phase.CLOSING
        self.deadline = deadline
        self._hurry.set()

    def stop(self, left_behind: bool) -> None:
        self._phase = Phase.STOPPED
        self.left_behind = left_behind

    def pause(self, seconds: float) -> None:
        """A 429: no request before ``seconds`` from now (at most 60)."""
        self.paused_until = max(self.paused_until, self.clock() + min(seconds, 60.0))

    # -- the sender's waits -----------------------------------------------------------

    def exit_deadline(self) -> Optional[float]:
        """When requests and retries stop: the exit's deadline (also once stopped:
        a request still out then gives up), or an inline flush's."""
        if self._phase in (Phase.CLOSING, Phase.STOPPED):
            return self.deadline
        return self._inline_until

    def wait(self, delay: float) -> bool:
        """Sleep before a retry, cut short by flush() or shutdown; False when out of time."""
        deadline = self.exit_deadline()
        if deadline is not None:
            left = deadline - self.clock()
            if left <= 0.01:
                return False
            delay = min(delay, left)
        self._wait(max(0.0, delay))
        deadline = self.exit_deadline()
        return deadline is None or deadline - self.clock() > 0.01

    def wait_out_pause(self) -> bool:
        """Before each request: wait while a 429 pauses the consumer; False to stop."""
        while True:
            left = self.paused_until - self.clock()
            if left <= 0:
                return True
            if not self.wait(left):
                return False

    def _event_wait(self, delay: float) -> bool:
        if self._hurry.wait(delay):  # a backoff is cut short once per hurry
            self._hurry.clear()
            return True
        return False
