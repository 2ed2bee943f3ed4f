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

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time as _time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional, Protocol

from .._config import resolve_options
from .._delivery import process
from .._exceptions import MixpanelException
from .._rules import Condition, Trait
from .._wire import GroupUpdate, group_id_key
from .aggregates import SKETCHES_EXTRA, needs_sketches, sketches_missing
from .engine import TraitEngine
from .store import Batch, TraitStore

__all__ = ["TraitFeed", "feed_for", "finish", "held_observations"]

logger = logging.getLogger("mixpanel_otel")

_SAVE_EVERY = 5.0  # seconds between two saves of changed state (and one at exit)
_EXIT_WAIT = 2.0  # at exit, longest wait for the ending aggregator to hand over
_MAX_WAIT = 1.0  # the timer looks at least this often (a record may make a group due)

Special = Callable[[str], Any]


class Counter(Protocol):
    """Where a feed's observations go: a runtime (or, in tests, an engine)."""

    def record(self, time: float, items: list[tuple[int, str, Any]]) -> None: ...


#: Observations held back for the gateway: (counter, record time, [(position, group id, value)]).
Held = tuple[Counter, float, list[tuple[int, str, Any]]]


class _Runtime:
    """A consumer's engine, its shared state (if any) and where its due updates go.

    Without a state directory, records go straight into the engine. With one,
    they go to the shared log (:class:`TraitStore`), from the timer thread
    (the gateway: before it answers), and only the process holding the
    aggregator's lock reads the log into its engine and emits.
    """

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
        self._lock = threading.RLock()  # one tick at a time (the timer's, or the exit's)
        self._pending: deque[tuple[float, list[tuple[int, str, Any]]]] = deque()
        self._cursor = 0  # the last logged batch read into the engine
        self._unsettled: list[tuple[Any, list[GroupUpdate]]] = []  # (receipt, its updates)
        self._recent: OrderedDict[str, float] = OrderedDict()  # export digest -> when counted
        self._finished = False  # the final values went out (at exit)
        #: ``record(time, items)``: one record's observations (see :meth:`_route`).
        self.record: Callable[[float, list[tuple[int, str, Any]]], Any]
        self._route()

    def add(self, traits: list[Trait]) -> list[int]:
        positions = self.engine.add_traits(traits)
        if self._directory and not self._loaded:
            self._loaded = True
            self._open_store()
        if self.store is None:
            _claim_solo(self._scope, traits)
        return positions

    def _open_store(self) -> None:
        try:
            self.store = TraitStore(str(self._directory), self._scope)
        except Exception as exc:  # traits still work, in memory
            self.store = None
            logger.error(
                "mixpanel-otel: trait state in %r unavailable (%r); kept in memory only",
                self._directory,
                exc,
            )
        self._route()

    # -- records ---------------------------------------------------------------------

    def _route(self) -> None:
        """Where :attr:`record` puts a record's observations, from the application's
        thread: into the engine, or (shared state) on a queue the timer thread logs."""
        if self.store is None:
            self.record = self.engine.observe_many
        else:
            self.record = self._log_later

    def _log_later(self, time: float, items: list[tuple[int, str, Any]]) -> None:
        self._pending.append((time, items))

    def commit(
        self, held: list[tuple[float, list[tuple[int, str, Any]]]], digest: str, window: float
    ) -> None:
        """A gateway call's observations, durable when this returns (with a state
        directory); not counted again when a call with the same ``digest`` was within
        ``window`` seconds. Raises when they cannot be made durable."""
        now = self.engine.clock()
        if self.store is not None:
            if self.store.append(self._batch(held), digest, window, now):
                _wake.set()
            return
        with self._lock:
            while self._recent and next(iter(self._recent.values())) < now - window:
                self._recent.popitem(last=False)
            if digest in self._recent:
                return
            self._recent[digest] = now
        for time, items in held:
            self.engine.observe_many(time, items)

    def _batch(self, held: Iterable[tuple[float, list[tuple[int, str, Any]]]]) -> Batch:
        """Observations in the log's form: trait signatures, not this engine's positions."""
        traits = self.engine.traits
        return [
            (
                time,
                [
                    (traits[position].signature, group_id, value)
                    for position, group_id, value in items
                ],
            )
            for time, items in held
        ]

    def _log_pending(self) -> None:
        held = []
        while self._pending:
            held.append(self._pending.popleft())
        if held and self.store is not None:
            try:
                self.store.append(self._batch(held))
            except Exception:
                self._pending.extendleft(reversed(held))  # tried again next tick
                raise

    # -- the aggregator ----------------------------------------------------------------

    def _take_over(self) -> None:
        """This process now aggregates: start from the saved state, then read the log."""
        assert self.store is not None
        self.engine.release()
        self.engine.track_changes = True
        cursor, groups = self.store.load()
        for key, data in groups:
            self.engine.import_group(key, data)
        self.engine.changed.clear()
        self.engine.forgotten.clear()
        self._cursor = cursor
        self._unsettled.clear()
        self.store.set_leader_exiting(False)

    def _read_log(self) -> None:
        assert self.store is not None
        positions = self.engine.signature_positions()
        while True:
            batches = self.store.read_after(self._cursor)
            if not batches:
                return
            for number, batch in batches:
                for time, observations in batch:
                    items = [
                        (positions[signature], group_id, value)
                        for signature, group_id, value in observations
                        if signature in positions
                    ]
                    if items:
                        self.engine.observe_many(time, items)
                self._cursor = number

    def _save(self) -> None:
        assert self.store is not None
        engine = self.engine
        changed, engine.changed = engine.changed, set()
        forgotten, engine.forgotten = engine.forgotten, set()
        rows = engine.export_groups(changed, self._unconfirmed())
        self.store.save(self._cursor, rows, forgotten)

    # -- emission ----------------------------------------------------------------------

    def tick(self, final: bool = False) -> bool:
        """Log, aggregate, hand what is due to the consumer; save now and then.
        False: the consumer is gone."""
        consumer = self.consumer()
        if consumer is None:
            return False
        with self._lock:
            if self._finished:
                return True  # at exit, after the final values: nothing more from here
            store = self.store
            if store is not None:
                self._log_pending()
                if not store.leading:
                    if not store.try_lead():
                        return True  # another process aggregates
                    self._take_over()
                if final:
                    store.set_leader_exiting(True)  # who ends after us takes over
                self._read_log()
            self._check_receipts()
            updates = self.engine.due(final=final)
            if updates:
                self._hand_over(consumer, updates)
            now = self.engine.monotonic()
            if store is not None and (final or now - self._saved_at >= _SAVE_EVERY):
                self._saved_at = now
                try:
                    self._save()
                except Exception as exc:
                    logger.error("mixpanel-otel: could not save trait state: %r", exc)
            return True

    def _hand_over(self, consumer: Any, updates: list[GroupUpdate]) -> None:
        submit = getattr(consumer, "submit", None)
        if submit is None:
            consumer.enqueue(updates)
            return
        self._unsettled.append((submit(updates), updates))

    def _check_receipts(self) -> None:
        """Values whose delivery failed (not delivered, not spooled) go out again."""
        still = []
        for receipt, updates in self._unsettled:
            if not receipt.settled:
                still.append((receipt, updates))
            elif receipt.refused or receipt.delivered + receipt.spooled < receipt.total:
                self.engine.unsend(updates)
        self._unsettled = still

    def _unconfirmed(self) -> dict[tuple[str, str], set[str]]:
        """Properties handed over whose delivery is not known yet: saved as unsent."""
        pending: dict[tuple[str, str], set[str]] = {}
        for receipt, updates in self._unsettled:
            if (
                receipt.settled
                and not receipt.refused
                and (receipt.delivered + receipt.spooled == receipt.total)
            ):
                continue
            for update in updates:
                names = update.payload if update.op == "$unset" else list(update.payload)
                pending.setdefault((update.group_key, str(update.group_id)), set()).update(names)
        return pending

    def finish(self, deadline: float) -> None:
        """At exit: log what is pending and, if this process aggregates (or the one that
        did is ending too, or is gone), hand over every changed trait and save. Once:
        the timer does nothing more for this runtime afterwards."""
        with self._lock:
            if self._finished:
                return
            try:
                if self._take_over_at_exit(deadline):
                    self.tick(final=True)
            finally:
                self._finished = True
                if self.store is not None:
                    self.store.resign()

    def _take_over_at_exit(self, deadline: float) -> bool:
        """Whether this process sends the final values: it aggregates, or takes over
        from an aggregator that ends too (False: the living aggregator will)."""
        store = self.store
        if store is None or store.leading:
            return True
        self._log_pending()
        if not store.try_lead():
            if not store.leader_exiting():
                return False  # the aggregator lives on and reads what we logged
            while not store.try_lead():
                if _time.monotonic() >= deadline or not store.leader_exiting():
                    return False  # it is logged: the (next) aggregator counts it
                _time.sleep(0.02)
        self._take_over()
        return True

    def after_fork(self) -> None:
        self._finished = False
        self.engine.clear()
        self._pending.clear()
        self._unsettled.clear()
        self._lock = threading.RLock()
        if self.store is not None:
            self.store.abandon()
            self._open_store()  # the shared state: this process logs to it too
        self._route()


def _option(consumer: Any, name: str) -> Any:
    """The consumer's trait option; for a consumer of another kind, the environment's."""
    if hasattr(consumer, name):
        return getattr(consumer, name)
    return getattr(resolve_options({}), name)


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
    feed = TraitFeed(traits, runtime, runtime.add(traits))
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

    def __init__(self, traits: list[Trait], counter: Counter, positions: list[int]) -> None:
        self.counter = counter
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
            _use_process_hooks()  # a forked child's exit runs the traits' exit step
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
            held.append((self.counter, time, items))
        else:
            self.counter.record(time, items)

    @staticmethod
    def commit(held: list[Held], digest: str = "", window: float = 0.0) -> None:
        """Count observations collected by :func:`held_observations`: durably, when
        returning, with a state directory; not again for the same ``digest`` (a resent
        call) within ``window`` seconds. Raises when they cannot be made durable."""
        by_counter: dict[int, tuple[Counter, list[tuple[float, list[Any]]]]] = {}
        for counter, time, items in held:
            by_counter.setdefault(id(counter), (counter, []))[1].append((time, items))
        for counter, entries in by_counter.values():
            if isinstance(counter, _Runtime):
                counter.commit(entries, digest, window)
            else:
                for time, items in entries:
                    counter.record(time, items)


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
                wait = min(wait, at - runtime.engine.monotonic())
        _wake.wait(max(0.005, wait))
        _wake.clear()


def _make_timer() -> Any:
    from .._delivery.worker import Worker  # pid-stamped, instrumentation suppressed

    return Worker(_loop, 1, "mixpanel-otel-traits")


_timer = _make_timer()


def finish(consumer: Any, timeout: float = _EXIT_WAIT) -> None:
    """Hand ``consumer`` every changed trait (however recently sent) and save the
    state: call it before shutting the consumer down (the gateway does)."""
    with _LOCK:
        runtime = _RUNTIMES.get(id(consumer))
    if runtime is not None and runtime.consumer() is consumer:
        runtime.finish(_time.monotonic() + timeout)


def _emit_at_exit(deadline: Optional[float] = None) -> None:
    """The traits' exit step, before the consumers': every changed trait goes out,
    however recently its group was sent (by this process, or by the aggregator of the
    shared state when it ends too, waiting for it until ``deadline``, a
    ``time.monotonic()``)."""
    now = _time.monotonic()
    # Waiting for an ending aggregator takes at most half of what is left of the
    # exit budget: the consumers' flush, next, needs the rest.
    deadline = now + _EXIT_WAIT if deadline is None else min(deadline, now + _EXIT_WAIT)
    deadline = now + max(0.0, deadline - now) / 2
    with _LOCK:
        runtimes = list(_RUNTIMES.values())
    for runtime in runtimes:
        try:
            runtime.finish(deadline)
        except Exception as exc:
            logger.error("mixpanel-otel: trait emission at exit failed: %r", exc)
        # Sketches still alive at interpreter teardown make their bindings print
        # "leaked instance" lines: the state is saved and sent, let it go now.
        runtime.engine.release()


def _use_process_hooks() -> None:
    """Install the process hooks (exit steps, SIGTERM, multiprocessing's exit) where
    this process has not yet, as a consumer does when first used after a fork: a
    child that only counts traits never uses its consumer before it ends."""
    with _LOCK:
        consumers = [runtime.consumer() for runtime in _RUNTIMES.values()]
    for consumer in consumers:
        use = getattr(consumer, "use_process", None)
        if use is not None:
            use(consumer)


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for runtime in _RUNTIMES.values():
        runtime.after_fork()
        if runtime.store is None:
            _forked[0] = True  # this child sees only its share of the records
    _warned[0] = False
    _SOLO.clear()
    _timer.after_fork()


_FIX = (
    "each process only sees its share of the records, and they overwrite each other's "
    "values. Set MIXPANEL_OTEL_TRAIT_STATE_DIR to a directory these processes share (one "
    "of them then aggregates every process's records), or run the traits in the gateway "
    "(mixpanel-otel gateway), to keep them exact."
)


def _warn_forked() -> None:
    _warned[0] = True
    logger.warning(
        "mixpanel-otel: computed traits in a forked process (pid %d): " + _FIX, os.getpid()
    )


#: Locks this process holds, one per (project, host, traits) it computes without shared state.
_SOLO: dict[str, int] = {}


def _claim_solo(scope: str, traits: list[Trait]) -> None:
    """Without a state directory, hold a lock naming these traits of this project; when
    another live process holds it, it computes the same traits: warn once."""
    if not traits or _warned[0]:
        return
    signatures = "\n".join(sorted(trait.signature for trait in traits))
    name = hashlib.sha256(f"{os.getuid()}\n{scope}\n{signatures}".encode()).hexdigest()[:16]
    if name in _SOLO:
        return
    path = os.path.join(tempfile.gettempdir(), f"mixpanel-otel-traits-{name}.lock")
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # no temporary directory to coordinate in: nothing to tell
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        _warned[0] = True
        logger.warning(
            "mixpanel-otel: another process (pid %d is one more) computes the same traits "
            "for this project: " + _FIX,
            os.getpid(),
        )
        return
    _SOLO[name] = handle  # held while this process lives; the kernel releases it


process.add_exit_step("traits", _emit_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
