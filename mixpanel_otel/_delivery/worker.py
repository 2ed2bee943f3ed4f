"""The worker: the consumer's background threads, started on demand.

Each thread runs the consumer's loop (take a job, run it) until the loop
returns. A fork leaves the child without threads: its owner calls
:meth:`Worker.after_fork` there (a consumer makes a new worker instead).
Threads run with OpenTelemetry instrumentation suppressed, so their own HTTP
requests make no spans, and their idents are in :data:`WORKER_THREADS`, so a
logging front end can ignore what they log.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

# Imported here, not in the thread: an import racing a fork (or the main
# thread's own import of it) leaves a half-initialised module behind.
from opentelemetry import context

from .stats import logger

__all__ = ["WORKER_THREADS", "Worker"]

#: Idents of worker threads; front ends ignore records these threads emit.
WORKER_THREADS: set[int] = set()


def _suppress_instrumentation() -> None:
    """Keep the worker's own HTTP requests out of the service's traces."""
    ctx = context.get_current()
    for key in (
        getattr(context, "_SUPPRESS_INSTRUMENTATION_KEY", None),
        getattr(context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None),
        "suppress_instrumentation",
    ):
        if key:
            ctx = context.set_value(key, True, ctx)
    context.attach(ctx)


class Worker:
    """Up to ``count`` daemon threads running ``loop``; restarted after a crash."""

    def __init__(self, loop: Callable[[], None], count: int, name: str) -> None:
        self._loop = loop
        self.count = count
        self.name = name
        self._threads: list[threading.Thread] = []
        self._running = 0  # threads started whose loop has not ended
        self._lock = threading.Lock()
        self.started = False  # read without the lock by the hot path
        self.enabled = True  # False: never start a thread (tests run jobs from flush())

    def ensure(self) -> bool:
        """Start missing threads; False when none can run (interpreter shutdown)."""
        if not self.enabled:
            return False
        with self._lock:
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < self.count:
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._running += 1
                try:
                    thread.start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    self._running -= 1
                    break
                self._threads.append(thread)
            self.started = self._running > 0
            return self.started

    def after_fork(self) -> None:
        """In a forked child: no thread of the parent's runs here."""
        self._lock = threading.Lock()
        self._threads = []
        self._running = 0
        self.started = False

    def alive(self) -> int:
        return sum(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> None:
        """Wait for the threads to end, ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        ident = threading.get_ident()
        WORKER_THREADS.add(ident)
        try:
            _suppress_instrumentation()
            self._loop()
        except BaseException as exc:  # a bug must not pass silently; the next enqueue restarts
            logger.error("mixpanel-otel worker error: %r", exc)
        finally:
            WORKER_THREADS.discard(ident)
            with self._lock:
                self._running -= 1
                self.started = self._running > 0
