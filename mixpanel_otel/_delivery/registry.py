"""The shared consumers of this process, and the process events they must survive.

One consumer per (token, API host) (:func:`get_consumer`). Around them:

- **exit**: ``atexit`` shuts every consumer down within one overall bound;
- **SIGTERM**: when its action would kill the process (the default), a handler
  flushes first, then lets the default action happen (same exit status); an
  application's own Python handler is chained: we flush, then call it;
- **fork**: the child starts with empty consumers and no threads, the parent
  keeps its updates; a ``multiprocessing`` child (which ends with
  ``os._exit``) flushes through multiprocessing's own exit finalizers,
  registered by an after-fork callback (the child clears its finalizers first);
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
import time
import weakref
from collections.abc import Iterator
from time import monotonic
from types import FrameType
from typing import Any, Callable, Optional, Union

from .._config import CONSUMER_OPTIONS, check_arguments, resolve_options, resolve_target
from . import signals
from .consumer import Consumer
from .stats import logger

__all__ = ["get_consumer", "override", "reset", "shutdown_all"]

_LIVE: weakref.WeakSet[Consumer] = weakref.WeakSet()
_SHARED: dict[tuple[str, str], Consumer] = {}
_LOCK = threading.Lock()
_OVERRIDE: list[Consumer] = []
_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {}  # each shared consumer's options
_WARNED: set[tuple[str, str, str]] = set()

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def get_consumer(
    token: Optional[str] = None, api_host: Optional[str] = None, **options: Any
) -> Consumer:
    """This process's consumer for (token, API host), created with ``options`` if new.

    ``token`` and ``api_host`` fall back to ``MIXPANEL_TOKEN`` and
    ``MIXPANEL_API_HOST`` (or ``MIXPANEL_REGION``). Options apply only when
    the consumer is created; a later call gets the same consumer (a
    misspelt option still raises) and a warning, once per option, for
    each option it gives a different value (as the OpenTelemetry SDK warns
    when a global provider is set twice).
    """
    if _OVERRIDE:
        return _OVERRIDE[-1]
    region = options.pop("region", None)
    token, base_url = resolve_target(token, api_host, region)
    with _LOCK:
        key = (token, base_url)
        consumer = _SHARED.get(key)
        if consumer is None:
            consumer = _SHARED[key] = Consumer(token, base_url, **options)
            given = {name: options[name] for name in CONSUMER_OPTIONS if name in options}
            _OPTIONS[key] = resolve_options(given)
            register(consumer)
        else:
            _warn_ignored(key, base_url, check_arguments(options))
    return consumer


def _warn_ignored(key: tuple[str, str], base_url: str, given: dict[str, Any]) -> None:
    """Warn, once per option, that an option differs from the shared consumer's."""
    kept = _OPTIONS.get(key, {})
    for name, value in given.items():
        if name not in kept or kept[name] == value or (*key, name) in _WARNED:
            continue
        _WARNED.add((*key, name))
        logger.warning(
            "mixpanel-otel: the consumer for %s already exists and keeps %s=%r; %s=%r is "
            "ignored (options apply when the consumer is created: give them to the first "
            "front end or get_consumer() call, or set them in the environment)",
            base_url,
            name,
            kept[name],
            name,
            value,
        )


def register(consumer: Consumer) -> None:
    """Flush ``consumer`` at exit, on SIGTERM and in multiprocessing children."""
    _LIVE.add(consumer)
    if consumer.flush_on_sigterm:
        _install_sigterm_handler()
    _watch_multiprocessing()


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
        _OPTIONS.clear()
        _WARNED.clear()
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


_flushed_for_signal = threading.Event()


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    """Flush (bounded by ``shutdown_timeout``), then do what SIGTERM did before us.

    The flush runs in a helper thread while this handler waits: it runs in
    the main thread between two bytecodes, maybe inside a consumer's lock.
    When a lock is held (by this very thread, as far as we can tell), the
    signal is deferred (:mod:`.signals`) to the moment the consumer lets go
    of it; a watchdog flushes anyway if that moment does not come within
    the exit bound.
    """
    chained = _sigterm_chained[0] if _sigterm_chained else signal.SIG_DFL
    if callable(chained):
        # The application stops gracefully and may still log: deliver at once from now on.
        _in_helper_thread(_flush_eagerly, wait=_locks_free())
        chained(signum, frame)
        return
    if not _flushed_for_signal.is_set():
        if not _locks_free():
            signals.defer(lambda: _on_sigterm(signum, None))
            _in_helper_thread(_watchdog, wait=False)
            return
        _in_helper_thread(shutdown_all, wait=True)
    # The default action: die by the signal, as if we were never here (exit status 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _watchdog() -> None:
    """A deferred signal not handled within the exit bound: flush from here, then kill."""
    time.sleep(max((c.shutdown_timeout for c in list(_LIVE)), default=0.0))
    if signals.pending:
        shutdown_all()
        _flushed_for_signal.set()
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread's handler now lets it kill


def _locks_free() -> bool:
    """Whether every consumer's locks can be taken now (a worker holds them only briefly)."""
    return all(consumer.quiescent(0.05) for consumer in list(_LIVE))


def _flush_eagerly() -> None:
    consumers = list(_LIVE)
    for consumer in consumers:
        consumer.send_eagerly()
    deadline = monotonic() + max((c.shutdown_timeout for c in consumers), default=0.0)
    for consumer in consumers:
        consumer.flush(max(0.1, deadline - monotonic()))


def _in_helper_thread(work: Callable[[], None], wait: bool) -> None:
    """Run ``work`` in a helper thread; with ``wait``, wait for it within the exit bound."""
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
    if wait:
        worker.join(bound + 1.0)


# -- fork ------------------------------------------------------------------------------

_fork_held: list[Consumer] = []


def _before_fork() -> None:
    if _LIVE:
        _watch_multiprocessing()  # multiprocessing may have been imported since
    _LOCK.acquire()
    _fork_held[:] = list(_LIVE)
    for consumer in _fork_held:
        consumer.before_fork()


def _after_fork_in_parent() -> None:
    for consumer in _fork_held:
        consumer.after_fork_in_parent()
    _fork_held.clear()
    _LOCK.release()


def _after_fork_in_child() -> None:
    global _LOCK
    for consumer in _fork_held:
        consumer.after_fork()
    _LOCK = threading.Lock()
    _fork_held.clear()


# -- multiprocessing -------------------------------------------------------------------

_MP_SENTINEL = type("_MultiprocessingFlush", (), {})()  # keeps the after-fork entry alive
_mp_armed_in: list[int] = []
_mp_watched_in: list[int] = []


def _arm_multiprocessing(_: object = None) -> None:
    """In a multiprocessing child: flush in multiprocessing's own exit finalizers,
    since the child ends with ``os._exit`` and skips ``atexit``."""
    if os.getpid() in _mp_armed_in:
        return
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        _mp_armed_in.append(os.getpid())
        util.Finalize(None, shutdown_all, exitpriority=100)


def _watch_multiprocessing() -> None:
    """Arm every multiprocessing child (and this process, if it is one).

    A child's finalizers are cleared when it starts (``_after_fork``), then
    the after-fork callbacks run: that is where the flush is registered.
    """
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    if os.getpid() not in _mp_watched_in:  # once per process: the registry only grows
        _mp_watched_in.append(os.getpid())
        util.register_after_fork(_MP_SENTINEL, _arm_multiprocessing)
    process = sys.modules.get("multiprocessing.process")
    if process is not None and process.parent_process() is not None:
        _arm_multiprocessing()


atexit.register(shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
