"""The shared consumers of this process: one per (token, API host) (:func:`get_consumer`).

Each is shut down by the process's exit steps (:mod:`.process`, stage
``"consumers"``); across a ``fork()`` the child starts with empty consumers
and no threads, the parent keeps its updates. :func:`override` is a test
seam: every ``get_consumer()`` returns one consumer (``mixpanel_otel.testing``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

from .._config import check_arguments, resolve_target
from . import process
from .consumer import Consumer
from .stats import logger

__all__ = ["get_consumer", "override", "reset"]

# Guarded by process.lock, which is also held across fork().
_SHARED: dict[tuple[str, str], Consumer] = {}
_WARNED: set[tuple[str, str, str]] = set()
_OVERRIDE: list[Consumer] = []


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
    key = (token, base_url)
    with process.lock:
        consumer = _SHARED.get(key)
        if consumer is not None:
            _warn_ignored(consumer, key, check_arguments(options))
            return consumer
        consumer = _SHARED[key] = Consumer(token, base_url, **options)
        consumer.use_process = _use_process
    _use_process(consumer)  # outside the lock, which use() takes
    return consumer


def _warn_ignored(consumer: Consumer, key: tuple[str, str], given: dict[str, Any]) -> None:
    """Warn, once per option, that an option differs from the shared consumer's."""
    for name, value in given.items():
        kept = getattr(consumer.options, name, value)
        if kept == value or (*key, name) in _WARNED:
            continue
        _WARNED.add((*key, name))
        logger.warning(
            "mixpanel-otel: the consumer for %s already exists and keeps %s=%r; %s=%r is "
            "ignored (options apply when the consumer is created: give them to the first "
            "front end or get_consumer() call, or set them in the environment)",
            consumer.base_url,
            name,
            kept,
            name,
            value,
        )


def _use_process(consumer: Consumer) -> None:
    """The process hooks, for a new consumer or one first used after a fork."""
    process.use(consumer.options.shutdown_timeout, consumer.options.flush_on_sigterm)


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
    with process.lock:
        consumers = list(_SHARED.values())
        _SHARED.clear()
        _WARNED.clear()
    for consumer in consumers:
        consumer.shutdown(timeout)


def shutdown_consumers(deadline: float) -> None:
    """The exit step of the consumers: each shut down, one after the other, by ``deadline``.

    No new threads here: Python 3.12+ refuses to start one at exit, so a
    consumer whose workers are gone sends from this thread.
    """
    for consumer in list(_SHARED.values()):
        try:
            consumer.close_by(deadline)
        except Exception as exc:  # never let one consumer cost the others their flush
            logger.error("mixpanel-otel: exit flush failed: %r", exc)


def _each_consumer(method: str) -> Callable[[], None]:
    def call() -> None:
        for consumer in list(_SHARED.values()):
            getattr(consumer, method)()

    return call


process.add_exit_step("consumers", shutdown_consumers)
process.at_fork(
    before=_each_consumer("before_fork"),
    in_parent=_each_consumer("after_fork_in_parent"),
    in_child=_each_consumer("after_fork"),
)
