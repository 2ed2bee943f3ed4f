"""Traits in a running process: one engine per consumer, fed by records, emptied by a timer.

- :func:`feed_for` gives a front end the :class:`TraitFeed` that reads its
  records; front ends that share a consumer share its engine, so a trait
  both the logging handler and the span exporter feed counts both.
- One daemon thread (pid-stamped: a forked child starts its own) hands due
  updates to each consumer (``consumer.enqueue``) and saves state.
- At exit, what is due goes to the consumer before its exit flush.
- After a fork, the child forgets its parent's trait state, keeps no state
  file, and warns once that each process only sees its share of the records.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

from .._config import resolve_options
from .._rules import Trait
from .._wire import group_id_key
from .engine import TraitEngine
from .store import TraitStore

__all__ = ["TraitFeed", "feed_for", "held_observations"]

logger = logging.getLogger("mixpanel_otel")

_SAVE_EVERY = 1.0  # seconds between two saves of changed state
_MAX_WAIT = 1.0  # the timer looks at least this often (a record may make a group due)

Special = Callable[[str], Any]
Observation = tuple[int, str, float, Any]


class _Runtime:
    """A consumer's engine, store and where its due updates go."""

    def __init__(self, consumer: Any) -> None:
        options = resolve_options({})
        interval = getattr(consumer, "trait_interval", None) or options["trait_interval"]
        directory = (
            getattr(consumer, "trait_state_dir", None)
            or getattr(consumer, "spool_dir", None)
            or options["trait_state_dir"]
        )
        self.consumer = weakref.ref(consumer)
        self.engine = TraitEngine(interval=interval)
        self.store: Optional[TraitStore] = None
        self._directory = directory
        self._scope = f"{getattr(consumer, '_token', '')}\n{getattr(consumer, 'base_url', '')}"
        self._saved_at = 0.0
        self._loaded = False

    def add(self, traits: list[Trait]) -> list[int]:
        positions = self.engine.add_traits(traits)
        if self._directory and not self._loaded:
            self._loaded = True
            self.store = TraitStore(self._directory, self._scope)
            self.store.load(self.engine)
        return positions

    def tick(self, final: bool = False) -> bool:
        """Hand what is due to the consumer; save state now and then. False: consumer gone."""
        consumer = self.consumer()
        if consumer is None:
            return False
        updates = self.engine.due()
        now = self.engine.clock()
        if self.store is not None and (final or now - self._saved_at >= _SAVE_EVERY):
            self._saved_at = now
            try:
                self.store.save(self.engine)
            except Exception as exc:
                logger.error("mixpanel-otel: could not save trait state: %r", exc)
        if updates:
            consumer.enqueue(updates)
        return True

    def after_fork(self) -> None:
        self.engine.clear()
        self.store = None  # the parent owns the state file


_RUNTIMES: dict[int, _Runtime] = {}  # id(consumer) -> its runtime
_LOCK = threading.Lock()
_wake = threading.Event()
_forked = [False]  # this process is a fork of one computing traits
_warned = [False]


def _runtime(consumer: Any) -> _Runtime:
    with _LOCK:
        runtime = _RUNTIMES.get(id(consumer))
        if runtime is None or runtime.consumer() is not consumer:
            runtime = _RUNTIMES[id(consumer)] = _Runtime(consumer)
        return runtime


def feed_for(consumer: Any, traits: list[Trait]) -> TraitFeed:
    """The feed for a front end's traits, on the engine its consumer shares."""
    runtime = _runtime(consumer)
    feed = TraitFeed(traits, runtime.engine, runtime.add(traits))
    _timer.ensure()
    return feed


# -- records -> observations -----------------------------------------------------------


def _unwrap(value: Any) -> Any:
    if type(value) in (tuple, list) and len(value) == 1:
        return value[0]
    return value


_held = threading.local()


@contextlib.contextmanager
def held_observations() -> Iterator[list[tuple[TraitFeed, Observation]]]:
    """Within the block, this thread's observations are collected, not counted: the
    gateway counts a request's records only once it acknowledges it
    (:meth:`TraitFeed.commit`), so a retried request is not counted twice."""
    held: list[tuple[TraitFeed, Observation]] = []
    _held.list = held
    try:
        yield held
    finally:
        _held.list = None


class TraitFeed:
    """Reads a record's traits (group, ``when``, value) and hands them to the engine."""

    def __init__(self, traits: list[Trait], engine: TraitEngine, positions: list[int]) -> None:
        self.engine = engine
        self._plan = list(zip(traits, positions))

    def observe(
        self,
        attributes: Mapping[str, Any],
        resource: Mapping[str, Any],
        time: float,
        special: Special,
        errors: Optional[list[str]] = None,
    ) -> None:
        """Count one record for every trait it matches; a bad value goes to ``errors``."""
        if not _timer.started:
            _timer.ensure()  # after a fork, or after the timer found nothing to do
            if _forked[0] and not _warned[0]:
                _warn_forked()
        held = getattr(_held, "list", None)

        def lookup(name: str) -> Any:
            if name[0] == "@":
                return special(name)
            value = attributes.get(name)
            if value is None:
                value = resource.get(name)
            return _unwrap(value)

        for trait, position in self._plan:
            group_id = lookup(trait.group_id)
            if group_id is None:
                continue
            skip = False
            for name, expected in trait.when.items():
                found = lookup(name)
                if found != expected and not (type(expected) is list and found in expected):
                    skip = True
                    break
            if skip:
                continue
            value = None
            if trait.of is not None:
                value = lookup(trait.of)
                if value is None:
                    continue
                problem = _bad_value(trait, value)
                if problem:
                    if errors is None:
                        from .._exceptions import MixpanelException

                        raise MixpanelException(problem)
                    errors.append(problem)
                    continue
            if type(group_id) is not str:
                if isinstance(group_id, bool) or not isinstance(group_id, (int, float)):
                    problem = (
                        f"trait {trait.index} ({trait.property}): group id {trait.group_id!r} "
                        f"is {type(group_id).__name__}, not a string or a number"
                    )
                    if errors is None:
                        from .._exceptions import MixpanelException

                        raise MixpanelException(problem)
                    errors.append(problem)
                    continue
                group_id = group_id_key(group_id)
            elif not group_id:
                continue
            if held is not None:
                held.append((self, (position, group_id, time, value)))
            else:
                self.engine.observe(position, group_id, time, value)

    @staticmethod
    def commit(held: list[tuple[TraitFeed, Observation]]) -> None:
        """Count observations collected by :func:`held_observations`."""
        for feed, (position, group_id, time, value) in held:
            feed.engine.observe(position, group_id, time, value)


def _bad_value(trait: Trait, value: Any) -> Optional[str]:
    kind = type(value)
    if trait.numeric:
        if kind is int or (kind is float and value == value and abs(value) != float("inf")):
            return None
        return (
            f"trait {trait.index} ({trait.property}): {trait.of!r} is {value!r:.40}, "
            f"not a number ({trait.aggregate} needs numbers)"
        )
    if kind in (str, int, float, bool):
        return None
    return (
        f"trait {trait.index} ({trait.property}): {trait.of!r} is a {kind.__name__}, "
        "not a string, number or boolean"
    )


# -- the timer -------------------------------------------------------------------------


def _loop() -> None:
    while True:
        with _LOCK:
            runtimes = list(_RUNTIMES.items())
        if not runtimes:
            return  # started again by the next feed_for()
        wait = _MAX_WAIT
        for key, runtime in runtimes:
            try:
                alive = runtime.tick()
            except Exception as exc:
                logger.error("mixpanel-otel: trait emission failed: %r", exc)
                alive = True
            if not alive:
                with _LOCK:
                    if _RUNTIMES.get(key) is runtime:
                        del _RUNTIMES[key]
                continue
            at = runtime.engine.next_due()
            if at is not None:
                wait = min(wait, at - runtime.engine.clock())
        _wake.wait(max(0.005, wait))
        _wake.clear()


def _make_timer() -> Any:
    from .._delivery.worker import Worker  # pid-stamped, instrumentation suppressed

    return Worker(_loop, 1, "mixpanel-otel-traits")


_timer = _make_timer()


def _emit_at_exit() -> None:
    """Registered after the consumers' exit flush, so it runs before it (atexit is LIFO)."""
    with _LOCK:
        runtimes = list(_RUNTIMES.values())
    for runtime in runtimes:
        try:
            runtime.tick(final=True)
        except Exception as exc:
            logger.error("mixpanel-otel: trait emission at exit failed: %r", exc)


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for runtime in _RUNTIMES.values():
        runtime.after_fork()
    if _RUNTIMES:
        _forked[0] = True
        _warned[0] = False
    _timer.after_fork()


def _warn_forked() -> None:
    _warned[0] = True
    logger.warning(
        "mixpanel-otel: computed traits in a forked process (pid %d): each process only "
        "sees its share of the records, and they overwrite each other's values. Run the "
        "traits in the gateway (mixpanel-otel gateway), where each group lives in one "
        "process, to keep them exact.",
        os.getpid(),
    )


atexit.register(_emit_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
