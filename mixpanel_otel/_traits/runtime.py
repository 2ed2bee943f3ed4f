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
from .._exceptions import MixpanelException
from .._rules import Condition, Trait
from .._wire import group_id_key
from .aggregates import SKETCHES_EXTRA, needs_sketches, sketches_missing
from .engine import TraitEngine
from .store import TraitStore

__all__ = ["TraitFeed", "feed_for", "finish", "held_observations"]

logger = logging.getLogger("mixpanel_otel")

_SAVE_EVERY = 5.0  # seconds between two saves of changed state (and one at exit)
_MAX_WAIT = 1.0  # the timer looks at least this often (a record may make a group due)

Special = Callable[[str], Any]
#: Observations held back for the gateway: (engine, record time, [(position, group id, value)]).
Held = tuple[TraitEngine, float, list[tuple[int, str, Any]]]


class _Runtime:
    """A consumer's engine, store and where its due updates go."""

    def __init__(self, consumer: Any) -> None:
        interval = _option(consumer, "trait_interval")
        directory = _option(consumer, "trait_state_dir") or getattr(consumer, "spool_dir", None)
        self.consumer = weakref.ref(consumer)
        max_groups = _option(consumer, "trait_max_groups")
        self.engine = TraitEngine(interval=interval, max_groups=max_groups)
        if hasattr(consumer, "trait_engine"):
            consumer.trait_engine = self.engine  # its stats() report the engine's counters
        self.store: Optional[TraitStore] = None
        self._directory = directory
        self._scope = f"{getattr(consumer, '_token', '')}\n{getattr(consumer, 'base_url', '')}"
        self._saved_at = 0.0
        self._loaded = False

    def add(self, traits: list[Trait]) -> list[int]:
        positions = self.engine.add_traits(traits)
        if self._directory and not self._loaded:
            self._loaded = True
            try:
                self.store = TraitStore(self._directory, self._scope)
                self.store.load(self.engine)
            except Exception as exc:  # traits still work, in memory
                self.store = None
                logger.error(
                    "mixpanel-otel: trait state in %r unavailable (%r); kept in memory only",
                    self._directory,
                    exc,
                )
        return positions

    def tick(self, final: bool = False) -> bool:
        """Hand what is due to the consumer; save state now and then. False: consumer gone."""
        consumer = self.consumer()
        if consumer is None:
            return False
        updates = self.engine.due(final=final)
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


def _option(consumer: Any, name: str) -> Any:
    """The consumer's trait option; for a consumer of another kind, the environment's."""
    if hasattr(consumer, name):
        return getattr(consumer, name)
    return resolve_options({})[name]


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
    """The feed for a front end's traits, on the engine its consumer shares.

    Without the ``traits`` extra, the traits that need it are left out with one
    error; the others, and the front end's rules, work as usual.
    """
    traits = usable_traits(traits)
    runtime = _runtime(consumer)
    feed = TraitFeed(traits, runtime.engine, runtime.add(traits))
    _timer.ensure()
    return feed


def usable_traits(traits: list[Trait]) -> list[Trait]:
    """``traits`` less those that need the missing ``traits`` extra (logged once, by name)."""
    needing = [trait for trait in traits if needs_sketches(trait.aggregate)]
    if not needing or not sketches_missing():
        return traits
    logger.error(
        "mixpanel-otel: traits %s disabled: %s",
        ", ".join(f"{trait.index} ({trait.property})" for trait in needing),
        SKETCHES_EXTRA,
    )
    return [trait for trait in traits if not needs_sketches(trait.aggregate)]


# -- records -> observations -----------------------------------------------------------


_held = threading.local()


@contextlib.contextmanager
def held_observations() -> Iterator[list[Held]]:
    """Within the block, this thread's observations are collected, not counted: the
    gateway counts a request's records only once it acknowledges it
    (:meth:`TraitFeed.commit`), so a retried request is not counted twice."""
    held: list[Held] = []
    _held.list = held
    try:
        yield held
    finally:
        _held.list = None


_SEQUENCES = (tuple, list)


class TraitFeed:
    """Reads a record's traits (group, ``when``, value) and hands them to the engine.

    What to read is decided once, here: the attributes every trait needs are
    looked up once per record, ``@`` specials only when a trait asks.
    """

    def __init__(self, traits: list[Trait], engine: TraitEngine, positions: list[int]) -> None:
        self.engine = engine
        names: list[str] = []
        for trait in traits:
            for name in (trait.group_id, trait.of, *(name for name, _ in trait.conditions)):
                if name and name[0] != "@" and name not in names:
                    names.append(name)
        self._names = tuple(names)
        self._plan = [
            (trait, position, trait.group_id, trait.of, trait.conditions, trait.numeric)
            for trait, position in zip(traits, positions)
        ]

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
        found: dict[str, Any] = {}  # attribute -> value, read once per record
        get, fallback = attributes.get, resource.get if resource else None
        for name in self._names:
            value: Any = get(name)
            if value is None and fallback is not None:
                value = fallback(name)
            if type(value) in _SEQUENCES and len(value) == 1:
                value = value[0]  # HTTP header capture gives ("acme",)
            found[name] = value
        items: list[tuple[int, str, Any]] = []
        for trait, position, id_name, of, when, numeric in self._plan:
            group_id = found[id_name] if id_name[0] != "@" else special(id_name)
            if group_id is None:
                continue
            if when and not _matches(when, found, special):
                continue
            value = None
            if of is not None:
                value = found[of] if of[0] != "@" else special(of)
                if value is None:
                    continue
                kind = type(value)
                if not (
                    kind is int
                    or (kind is float and value - value == 0)  # finite
                    or (kind is str and not numeric)
                ):
                    problem = _bad_value(trait, value)
                    if problem:
                        _report(problem, errors)
                        continue
            if type(group_id) is not str:
                if isinstance(group_id, bool) or not isinstance(group_id, (int, float)):
                    _report(
                        f"trait {trait.index} ({trait.property}): group id {id_name!r} "
                        f"is {type(group_id).__name__}, not a string or a number",
                        errors,
                    )
                    continue
                group_id = group_id_key(group_id)
            elif not group_id:
                continue
            items.append((position, group_id, value))
        if not items:
            return
        held = getattr(_held, "list", None)
        if held is not None:
            held.append((self.engine, time, items))
        else:
            self.engine.observe_many(time, items)

    @staticmethod
    def commit(held: list[Held]) -> None:
        """Count observations collected by :func:`held_observations`."""
        for engine, time, items in held:
            engine.observe_many(time, items)


def _matches(conditions: tuple[Condition, ...], found: dict[str, Any], special: Special) -> bool:
    return all(test(found[name] if name[0] != "@" else special(name)) for name, test in conditions)


def _report(problem: str, errors: Optional[list[str]]) -> None:
    if errors is None:
        raise MixpanelException(problem)
    errors.append(problem)


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


def finish(consumer: Any) -> None:
    """Hand ``consumer`` every changed trait (however recently sent) and save the
    state: call it before shutting the consumer down (the gateway does)."""
    with _LOCK:
        runtime = _RUNTIMES.get(id(consumer))
    if runtime is not None and runtime.consumer() is consumer:
        runtime.tick(final=True)


def _emit_at_exit() -> None:
    """Registered after the consumers' exit flush, so it runs before it (atexit is LIFO):
    every changed trait goes out, however recently its group was sent."""
    with _LOCK:
        runtimes = list(_RUNTIMES.values())
    for runtime in runtimes:
        try:
            runtime.tick(final=True)
        except Exception as exc:
            logger.error("mixpanel-otel: trait emission at exit failed: %r", exc)
        # Sketches still alive at interpreter teardown make their bindings print
        # "leaked instance" lines: the state is saved and sent, let it go now.
        runtime.engine.release()


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
