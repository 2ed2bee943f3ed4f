"""The shared consumers of this process, and the process events they must survive.

One consumer per (token, API host) (:func:`get_consumer`). Around them:

- **exit**: ``atexit`` shuts every consumer down within one overall bound;
- **SIGTERM**: when its action would kill the process (the default), a handler
  flushes first, then lets the default action happen (same exit status); an
  application's own Python handler is chained: we flush, then call it;
- **fork**: the child starts with empty consumers and no threads, the parent
  keeps its updates; a ``multiprocessing`` child (which ends with
  ``os._exit``) flushes through multiprocessing's own exit finalizers;
- a **test seam**: :func:`override` routes every ``get_consumer()`` to one
  consumer (``mixpanel_otel.testing`` uses it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from time import monotonic
from types import FrameType
from typing import Any, Callable, Optional, Union

from .._config import resolve_options, resolve_target
from .consumer import Consumer
from .stats import logger

__all__ = ["get_consumer", "live_consumers", "override", "reset", "shutdown_all"]

_LIVE: weakref.WeakSet[Consumer] = weakref.WeakSet()
_SHARED: dict[tuple[str, str], Consumer] = {}
_LOCK = threading.Lock()
_OVERRIDE: list[Consumer] = []

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def get_consumer(
    token: Optional[str] = None, api_host: Optional[str] = None, **options: Any
) -> Consumer:
    """This process's consumer for (token, API host), created with ``options`` if new.

    ``token`` and ``api_host`` fall back to ``MIXPANEL_TOKEN`` and
    ``MIXPANEL_API_HOST`` (or ``MIXPANEL_REGION``). Options apply only when
    the consumer is created; a later call gets the same consumer (a
    misspelt option is still refused).
    """
    if _OVERRIDE:
        return _OVERRIDE[-1]
    region = options.pop("region", None)
    token, base_url = resolve_target(token, api_host, region)
    with _LOCK:
        consumer = _SHARED.get((token, base_url))
        if consumer is None:
            consumer = _SHARED[(token, base_url)] = Consumer(token, base_url, **options)
            register(consumer)
        else:
            resolve_options(options)
    return consumer


def register(consumer: Consumer) -> None:
    """Flush ``consumer`` at exit, on SIGTERM and in multiprocessing children."""
    _LIVE.add(consumer)
    if consumer.flush_on_sigterm:
        _install_sigterm_handler()


def live_consumers() -> list[Consumer]:
    return list(_LIVE)


@contextlib.contextmanager
def override(consumer: Consumer) -> Iterator[Consumer]:
    """Within the block, every ``get_consumer()`` returns ``consumer``."""
    _OVERRIDE.append(consumer)
    try:
        yield consumer
    finally:
        _OVERRIDE.remove(consumer)


def reset(timeout: float = 2.0) -> None:
    """Shut down and forget every shared consumer (between tests)."""
    with _LOCK:
        consumers = list(_SHARED.values())
        _SHARED.clear()
    for consumer in consumers:
        consumer.shutdown(timeout)
        _LIVE.discard(consumer)


def shutdown_all(timeout: Optional[float] = None) -> None:
    """Shut every consumer down, one after the other, within one overall bound.

    No new threads here: Python 3.12+ refuses to start one at exit, so a
    consumer whose workers are gone sends from this thread.
    """
    consumers = list(_LIVE)
    if not consumers:
        return
    bound = max(c.shutdown_timeout for c in consumers) if timeout is None else timeout
    deadline = monotonic() + bound
    for consumer in consumers:
        try:
            consumer.shutdown(max(0.1, deadline - monotonic()))
        except Exception as exc:  # never let one consumer cost the others their flush
            logger.error("mixpanel-otel: exit flush failed: %r", exc)


# -- SIGTERM ---------------------------------------------------------------------------

_sigterm_chained: list[_Handler] = []


def _install_sigterm_handler() -> None:
    """Flush on SIGTERM, when this is the main thread and the handler is not ours yet."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
    except (AttributeError, ValueError):  # no SIGTERM here
        return
    if current is _on_sigterm or current == signal.SIG_IGN or current is None:
        return  # ours already, ignored on purpose, or set from C code: leave it alone
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return
    _sigterm_chained[:] = [] if current == signal.SIG_DFL else [current]


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    """Flush (bounded by ``shutdown_timeout``), then do what SIGTERM did before us."""
    chained = _sigterm_chained[0] if _sigterm_chained else signal.SIG_DFL
    if callable(chained):
        # The application stops gracefully and may still log: deliver at once from now on.
        _in_helper_thread(_flush_eagerly)
        chained(signum, frame)
        return
    _in_helper_thread(shutdown_all)
    # The default action: die by the signal, as if we were never here (exit status 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _flush_eagerly() -> None:
    consumers = list(_LIVE)
    for consumer in consumers:
        consumer.send_eagerly()
    deadline = monotonic() + max((c.shutdown_timeout for c in consumers), default=0.0)
    for consumer in consumers:
        consumer.flush(max(0.1, deadline - monotonic()))


def _in_helper_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a helper thread and wait for it, within the exit bound. A signal
    handler runs in the main thread between two bytecodes, maybe holding a consumer's lock."""
    consumers = list(_LIVE)
    if not consumers:
        return
    bound = max(c.shutdown_timeout for c in consumers)
    worker = threading.Thread(target=work, name="mixpanel-otel-sigterm", daemon=True)
    try:
        worker.start()
    except RuntimeError:
        work()
        return
    worker.join(bound + 1.0)


# -- fork ------------------------------------------------------------------------------

_fork_held: list[Consumer] = []


def _before_fork() -> None:
    _LOCK.acquire()
    _fork_held[:] = list(_LIVE)
    for consumer in _fork_held:
        consumer._cond.acquire()


def _after_fork_in_parent() -> None:
    for consumer in _fork_held:
        consumer._cond.release()
    _fork_held.clear()
    _LOCK.release()


def _after_fork_in_child() -> None:
    global _LOCK
    for consumer in _fork_held:
        consumer.after_fork()
    _LOCK = threading.Lock()
    if _fork_held:
        _flush_at_multiprocessing_exit()
    _fork_held.clear()


def _flush_at_multiprocessing_exit() -> None:
    """multiprocessing ends a forked child with ``os._exit`` (no atexit) after
    running its own finalizers: flush there."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.Finalize(None, shutdown_all, exitpriority=100)


atexit.register(shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
