"""The shared consumer: pending updates per group, coalesced, sent in batches.

Callers only append under a short lock (:meth:`Consumer.enqueue`); one worker
thread per consumer encodes, batches and posts, retrying with backoff and
splitting rejected batches. One consumer exists per (token, API host) per
process (:func:`get_consumer`); it is fork-safe and flushed at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from time import monotonic
from typing import Any, Callable, Iterable, Optional, Union
from urllib.parse import quote_plus

# Imported here, not in the worker: an import racing a fork or the main
# thread's own import of it leaves a half-initialised module behind.
from opentelemetry import context

from ._config import resolve_options, resolve_target
from ._exceptions import MixpanelException
from ._spool import Spool
from ._transport import (
    BODY_CLOSE,
    BODY_OPEN,
    FATAL,
    OK,
    REJECTED,
    RETRY,
    SEPARATOR,
    Outcome,
    Transport,
    form_body,
    form_quote,
)
from ._wire import (
    ENDPOINTS,
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    GroupUpdate,
    Truncations,
    approx_size,
    group_id_key,
    updates_from_message,
    wire_message,
)

__all__ = ["Consumer", "get_consumer"]

logger = logging.getLogger("mixpanel_otel")

#: Idents of worker threads; front ends ignore records these threads emit.
WORKER_THREADS: set[int] = set()

_WARN_EVERY = 10.0
_DEFAULT_FLUSH_TIMEOUT = 30.0
_RETRY_AFTER_CAP = 60.0  # a server asking for longer gets retried after this

_Entry = Union[GroupUpdate, str]


class _Lane:
    """Pending messages for one endpoint (and, for ``/import``, one credential)."""

    __slots__ = ("path", "auth", "extra", "queue", "groups", "carry")

    def __init__(self, path: str, auth: Optional[tuple] = None, extra: str = "") -> None:
        self.path = path
        self.auth = auth
        self.extra = extra  # more form fields, e.g. "&api_key=..."
        self.queue: deque[_Entry] = deque()  # arrival order
        self.groups: dict[tuple, deque[GroupUpdate]] = {}  # per group, same order
        # Encoded messages taken off ``queue`` and not yet delivered, oldest first:
        # (json text, form-quoted text, accounted size).
        self.carry: deque[tuple[str, str, int]] = deque()

    def __len__(self) -> int:
        return len(self.queue) + len(self.carry)


def _touches(a: Any, b: Any) -> bool:
    """Whether two payloads (dicts or name lists) share a property name."""
    if len(a) > len(b):
        a, b = b, a
    return any(name in b for name in a)


def _holds(values: list, value: Any) -> bool:
    """JSON membership: ``True`` is not ``1`` and ``1`` is not ``1.0`` to Mixpanel."""
    return any(v == value and type(v) is type(value) for v in values)


def _merge(into: GroupUpdate, new: GroupUpdate) -> bool:
    """Merge ``new`` into the earlier ``into`` of the same operation, if exact."""
    op, target, source = into.op, into.payload, new.payload
    if op == "$set":
        target.update(source)
    elif op == "$set_once":
        for name, value in source.items():
            target.setdefault(name, value)
    elif op == "$union":
        for name, values in source.items():
            current = target.get(name)
            if current is None:
                target[name] = values
            else:
                current.extend(v for v in values if not _holds(current, v))
    elif op == "$remove":
        # One message removes one value a property, so only new properties merge.
        if _touches(target, source):
            return False
        target.update(source)
    elif op == "$unset":
        target.extend(name for name in source if name not in target)
    else:
        return False
    into.time = new.time
    into.size = approx_size(target)  # what the merged update holds, not the sum of both
    return True


def _redacted(text: str, token: str) -> dict:
    """A message as given to ``on_error``: decoded, without the token."""
    try:
        message = json.loads(text)
    except ValueError:
        return {"message": text.replace(token, "<token>")}
    if isinstance(message, dict):
        message.pop("$token", None)
        return message
    return {"message": message}


class Consumer:
    """Buffers, coalesces and delivers group updates for one (token, host).

    Build it with :func:`get_consumer`. Also speaks the official SDK's
    consumer protocol (:meth:`send`), so ``Mixpanel(token, consumer=...)``
    gets background, batched delivery.
    """

    def __init__(self, token: str, base_url: str, **options: Any) -> None:
        opts = resolve_options(options)
        self._token = token
        self.base_url = base_url
        self.flush_interval: float = opts["flush_interval"]
        self.batch_size: int = opts["batch_size"]
        self.max_pending: int = opts["max_pending"]
        self.max_pending_bytes: int = opts["max_pending_bytes"]
        self.request_timeout: float = opts["request_timeout"]
        self.shutdown_timeout: float = opts["shutdown_timeout"]
        self.spool_dir: Optional[str] = opts["spool_dir"]
        self._backoff_base: float = opts["backoff_base"]
        self._backoff_max: float = opts["backoff_max"]
        self.on_error: Optional[Callable] = opts["on_error"]
        self.before_send: Optional[Callable] = opts["before_send"]
        self.transport = Transport(base_url, self.request_timeout)
        self.truncations = Truncations()
        self._init_state()
        _LIVE.add(self)
        if self._spool_rows:
            with self._lock:
                self._start_worker()  # replay what an earlier process left
            self._wake.set()

    def _init_state(self) -> None:
        """Everything a forked child must not inherit."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is left
        self._drain_lock = threading.Lock()  # one sender at a time
        self._wake = threading.Event()  # send now
        self._wake_sent = False  # a wake is on its way; saves callers an Event.set each
        self._flush_wanted = False  # flush() asked the worker to send everything
        self._gave_up = False  # closed, and the last send from a caller left updates
        self._inbox: deque[GroupUpdate] = deque()  # appended by callers, lock-free
        self._stop = threading.Event()  # shutting down
        self._alert = threading.Event()  # cuts a retry wait short: stop or spill
        self._worker: Optional[threading.Thread] = None
        self._deadline: Optional[float] = None  # set while shutting down
        self._closed = False
        self._groups_lane = _Lane("/groups")
        self._lanes: dict[tuple, _Lane] = {("groups", None, None): self._groups_lane}
        self._count = 0  # pending + in flight
        self._bytes = 0
        self._last_warning = -_WARN_EVERY
        self._stats = dict.fromkeys(
            (
                "enqueued",
                "coalesced",
                "sent",
                "failed",
                "dropped",
                "invalid",
                "filtered",
                "retries",
                "requests",
                "errors",
                "spooled",
                "replayed",
            ),
            0,
        )
        self.truncations.count = 0
        self.transport.reset()
        self._sync_lock = threading.Lock()
        self._sync_transport: Optional[Transport] = None
        # Without a spool, overflow past max_pending is dropped (counted). With one,
        # the worker is asked to spill to disk past max_pending, and past a headroom
        # the caller spills itself (the overflow policy), so nothing is dropped.
        self._spool = Spool(self.spool_dir, self._token, self.base_url) if self.spool_dir else None
        self._spool_rows = self._spool.count() if self._spool else 0
        self._spill_needed = False
        self._spill_now = False
        self._spill_lock = threading.RLock()  # spool order: one mover at a time
        self._spilling = False
        headroom = max(64, self.max_pending // 4)
        self._absorb_at = max(4 * self.batch_size, self.max_pending // 4)
        self._hard_cap = self.max_pending + headroom
        self._hard_cap_bytes = self.max_pending_bytes + self.max_pending_bytes // 4

    def __repr__(self) -> str:
        return f"<mixpanel_otel Consumer {self.base_url} pending={self._count}>"

    # -- caller side -----------------------------------------------------------------

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None:
        """Add updates from the caller's thread: an append, no lock, no I/O, no encoding.

        The worker absorbs the inbox into the per-group pending updates
        (coalescing, bounds); a caller does it only when the inbox has grown
        to a quarter of ``max_pending`` (the worker is busy sending, or starved
        of the GIL). A fork is caught by ``os.register_at_fork``; the pid
        check is in :meth:`_absorb`, off this path.
        """
        inbox = self._inbox
        inbox.extend(updates)
        if len(inbox) >= self.batch_size:
            if len(inbox) >= self._absorb_at:
                self._absorb()
            elif not self._wake_sent:
                self._wake_sent = True
                self._wake.set()
        if self._worker is None:
            with self._lock:
                if self._worker is None:
                    self._start_worker()

    def _absorb(self) -> None:
        """Move the inbox into the pending updates, in order; apply the bounds."""
        if self._pid != os.getpid():
            self._reset_in_child()  # a fork the at-fork hooks did not see
            return
        overflow = 0
        inbox = self._inbox
        while True:
            with self._lock:
                add = self._add
                while inbox and not self._spill_now:
                    if not add(inbox.popleft()):
                        overflow += 1
                spill, spill_now = self._spill_needed, self._spill_now
            if spill and not self._alert.is_set():
                self._alert.set()
                self._wake.set()
            if spill_now:
                # Over the headroom with a spool: spill now, then take the rest.
                if not self._spill(from_caller=threading.get_ident() not in WORKER_THREADS):
                    with self._lock:
                        self._spill_now = False
                if inbox:
                    continue
            break
        if overflow:
            self._overflowed(overflow)

    def _add(self, update: GroupUpdate) -> bool:
        """Coalesce or append one update; the lock is held. False on overflow."""
        self._stats["enqueued"] += 1
        gid = update.group_id
        key = (update.group_key, gid if type(gid) is str else group_id_key(gid))
        lane = self._groups_lane
        queue = lane.groups.get(key)
        if queue:
            op = update.op
            if op == "$delete":
                # A delete supersedes everything still pending for the group.
                for old in queue:
                    old.dead = True
                    self._count -= 1
                    self._bytes -= old.size
                self._stats["coalesced"] += len(queue)
                queue.clear()
            elif op is not None:
                for old in reversed(queue):
                    if old.op == op and old.meta == update.meta:
                        before = old.size
                        if _merge(old, update):
                            self._bytes += old.size - before
                            self._stats["coalesced"] += 1
                            return True
                        break
                    if old.op == "$delete" or _touches(old.payload, update.payload):
                        break
        if self._count >= self.max_pending or self._bytes >= self.max_pending_bytes:
            over = self._count >= self._hard_cap or self._bytes >= self._hard_cap_bytes
            if (
                self._spool is None
                # a spill is under way: room for one more headroom, then drop
                or self._count >= 2 * self._hard_cap
                or self._bytes >= 2 * self._hard_cap_bytes
            ):
                self._stats["enqueued"] -= 1
                self._stats["dropped"] += 1
                if queue is not None and not queue:
                    del lane.groups[key]
                return False
            self._spill_needed = True
            self._spill_now = self._spill_now or over
        if queue is None:
            queue = lane.groups[key] = deque()
        queue.append(update)
        lane.queue.append(update)
        self._count += 1
        self._bytes += update.size
        return True

    def _overflowed(self, count: int) -> None:
        now = monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            logger.warning(
                "mixpanel-otel: pending updates are at max_pending (%d updates / %d bytes); "
                "dropped %d update(s) (stats()['dropped'] counts them all)",
                self.max_pending,
                self.max_pending_bytes,
                count,
            )

    def count_ignored(self, count: int = 1) -> None:
        """Count records that carried group tags but no operation (not an error)."""
        with self._lock:
            self._stats["ignored"] = self._stats.get("ignored", 0) + count

    def count_invalid(self, count: int = 1) -> None:
        """Count records a front end refused (they never reach the queue)."""
        with self._lock:
            self._stats["invalid"] += count

    def send(
        self,
        endpoint: str,
        json_message: str,
        api_key: Any = None,
        api_secret: Optional[str] = None,
    ) -> None:
        """The official SDK's consumer protocol: queue one JSON message for ``endpoint``."""
        path = ENDPOINTS.get(endpoint)
        if path is None:
            raise MixpanelException(
                f"No such endpoint {endpoint!r}. Valid endpoints are one of {list(ENDPOINTS)}"
            )
        if isinstance(api_key, tuple):
            api_key, api_secret = api_key
        if endpoint == "groups":
            try:
                message = json.loads(json_message)
            except (TypeError, ValueError):
                raise MixpanelException("groups message is not valid JSON") from None
            if isinstance(message, dict) and message.get("$token", self._token) == self._token:
                self.enqueue(updates_from_message(message, counter=self.truncations))
                return
        self._enqueue_raw(endpoint, path, json_message, api_key, api_secret)

    def _enqueue_raw(self, endpoint, path, text, api_key, api_secret) -> None:
        if self._pid != os.getpid():
            self._reset_in_child()
        with self._lock:
            lane = self._lanes.get((endpoint, api_key, api_secret))
            if lane is None:
                auth = (api_secret, "") if api_secret else None
                extra = f"&api_key={quote_plus(api_key)}" if api_secret and api_key else ""
                lane = self._lanes[(endpoint, api_key, api_secret)] = _Lane(path, auth, extra)
            self._stats["enqueued"] += 1
            full = self._count >= self.max_pending or self._bytes >= self.max_pending_bytes
            if full:
                self._stats["enqueued"] -= 1
                self._stats["dropped"] += 1
            else:
                lane.queue.append(text)
                self._count += 1
                self._bytes += len(text)
            if self._worker is None:
                self._start_worker()
        if full:
            self._overflowed(1)
        elif len(lane.queue) >= self.batch_size:
            self._wake.set()

    def deliver_now(self, updates: list[GroupUpdate]) -> None:
        """Send ``updates`` from this thread at once; raise unless Mixpanel accepted them.

        Retries a failed connection or 5xx four times, as the official SDK's
        ``Consumer`` does. Used by ``GroupClient(sync=True)``.
        """
        if self._pid != os.getpid():
            self._reset_in_child()
        texts = []
        for update in updates:
            message = wire_message(self._token, update)
            if self.before_send is not None:
                message = self._call_before_send(message)
                if message is None:
                    self._count_stat("filtered")
                    continue
            texts.append(_dumps(message))
        if not texts:
            return
        self._count_stat("enqueued", len(texts))
        body = form_body(map(form_quote, texts))
        with self._sync_lock:
            if self._sync_transport is None:
                self._sync_transport = Transport(self.base_url, self.request_timeout)
            for attempt in range(5):
                self._count_stat("requests")
                outcome = self._sync_transport.post("/groups", body)
                if outcome.kind == OK:
                    self._count_stat("sent", len(texts))
                    return
                if outcome.kind != RETRY or attempt == 4:
                    break
                self._count_stat("retries")
                time.sleep(0.25 * 2**attempt)
        self._count_stat("failed", len(texts))
        raise MixpanelException(f"Mixpanel error: {self._scrub(outcome.reason)}")

    def _count_stat(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._stats[name] += count

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything pending, waiting up to ``timeout`` s (default 30).

        Returns True when nothing is left.
        """
        if self._pid != os.getpid():
            self._reset_in_child()
        deadline = monotonic() + (_DEFAULT_FLUSH_TIMEOUT if timeout is None else timeout)
        if self._spool is not None:
            with self._spill_lock:  # a spill in between would make the count stale
                rows = self._spool.count()  # also replays what other processes left
                with self._lock:
                    self._spool_rows = max(self._spool_rows, rows)
        with self._lock:
            if not self._count and not self._spool_rows and not self._inbox:
                return True
            if self._worker is None:
                self._start_worker()
            worker = self._worker
        if worker is None:
            # Stopped (at exit, or after shutdown): send from this thread, within the
            # bound, and put back in the spool what the bound leaves.
            if self._gave_up and not self._inbox:
                return False  # nothing new since the last try failed: don't wait again
            self._drain(deadline)
            self._absorb()
            spilled = self._spill(everything=True) if self._spool is not None else 0
            with self._lock:
                self._gave_up = bool(self._count or spilled)
                return not self._gave_up
        self._flush_wanted = True
        self._wake.set()
        with self._idle:
            while self._count or self._spool_rows or self._inbox:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stats(self) -> dict[str, int]:
        """Counters since the consumer started (or since this process forked)."""
        self._absorb()
        with self._lock:
            stats = dict(self._stats)
            stats["pending"] = self._count + len(self._inbox)
            stats["pending_bytes"] = self._bytes
        stats["truncated"] = self.truncations.count
        return stats

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is pending within ``timeout`` (default ``shutdown_timeout``), then stop.

        Idempotent. Updates added later are still accepted and sent by the
        next :meth:`flush` from the calling thread.
        """
        if self._pid != os.getpid():
            self._reset_in_child()
        if self._closed:
            return self.flush(timeout if timeout is not None else self.shutdown_timeout)
        timeout = self.shutdown_timeout if timeout is None else timeout
        self._deadline = monotonic() + timeout
        with self._lock:
            self._closed = True
            worker = self._worker
        self._stop.set()
        self._alert.set()
        self._wake.set()
        if worker is not None:
            worker.join(max(0.0, self._deadline - monotonic()) + 0.5)
        # A worker still in a request past the bound (a hung DNS lookup, say) keeps
        # its batch: it may yet be delivered, so it is neither spooled nor resent.
        stuck = worker is not None and worker.is_alive()
        if not stuck:
            self._drain(self._deadline)
        self._absorb()
        spilled = self._spill(everything=True) if self._spool is not None and not stuck else 0
        with self._lock:
            left = self._count + spilled
            # Later flushes (logging's own exit flush) need not wait for the same outage.
            self._gave_up = bool(left)
        if left:
            logger.warning(
                "mixpanel-otel: %d update(s) not delivered within the %.1f s shutdown timeout%s",
                left,
                timeout,
                f"; {spilled} kept in the spool for the next process" if spilled else "",
            )
        with self._lock:
            if not stuck:
                self._worker = None
                self._deadline = None
        self.transport.close()
        return left == 0

    # -- worker side -----------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._closed:
            return  # at exit: flush() sends from the caller instead
        self._stop.clear()
        worker = threading.Thread(target=self._run, name="mixpanel-otel-worker", daemon=True)
        try:
            worker.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return  # flush() and the exit flush send from the caller instead
        self._worker = worker

    def _run(self) -> None:
        WORKER_THREADS.add(threading.get_ident())
        try:
            _suppress_instrumentation()
            next_send = monotonic() + self.flush_interval
            while not self._stop.is_set():
                self._wake.wait(max(0.0, next_send - monotonic()))
                self._wake.clear()
                self._wake_sent = False
                try:
                    # Everything on the interval and on flush(); between ticks only
                    # full batches, so what is still pending keeps coalescing.
                    if self._flush_wanted or monotonic() >= next_send:
                        self._flush_wanted = False
                        self._drain(self._deadline)
                        next_send = monotonic() + self.flush_interval
                    else:
                        self._drain(self._deadline, full_only=True)
                except Exception as exc:  # a bug must not end delivery
                    self._report_bug(exc)
            self._drain(self._deadline)
        except BaseException as exc:
            self._report_bug(exc)
        finally:
            WORKER_THREADS.discard(threading.get_ident())
            with self._lock:
                if self._worker is threading.current_thread():
                    self._worker = None  # restarted by the next enqueue

    def _report_bug(self, exc: BaseException) -> None:
        with self._lock:
            self._stats["errors"] += 1
        logger.error("mixpanel-otel worker error: %s", self._scrub(repr(exc)))

    def _drain(self, deadline: Optional[float], full_only: bool = False) -> None:
        """Send every lane until it is empty (or holds less than a batch, with
        ``full_only``), or the deadline passes."""
        wait = -1 if deadline is None else max(0.0, deadline - monotonic())
        if not self._drain_lock.acquire(timeout=wait):
            return  # another thread (a worker stuck in a request) is sending
        try:
            self._drain_lanes(deadline, full_only)
        finally:
            self._drain_lock.release()

    def _drain_lanes(self, deadline: Optional[float], full_only: bool) -> None:
        self._absorb()
        for lane in list(self._lanes.values()):
            while True:
                if self._spill_needed:
                    self._spill()
                if full_only and len(lane) < self.batch_size:
                    break
                batch = self._take_batch(lane)
                if not batch:
                    break
                left = self._deliver(lane, batch, deadline)
                if left:
                    lane.carry.extendleft(reversed(left))
                    return

    def _take_batch(self, lane: _Lane) -> list:
        batch: list = []
        size = len(BODY_OPEN) + len(BODY_CLOSE) + len(lane.extra)
        while len(batch) < self.batch_size:
            if not lane.carry:
                wanted = self.batch_size - len(batch)
                if lane is self._groups_lane:
                    # Nothing may be spilled between choosing spool or queue and taking.
                    with self._spill_lock:
                        self._absorb()
                        refilled = self._load_spool(wanted) or self._encode_some(lane, wanted)
                else:
                    refilled = self._encode_some(lane, wanted)
                if not refilled:
                    break
                if not lane.carry:
                    continue
            item = lane.carry[0]
            grown = size + len(item[1]) + len(SEPARATOR)
            if batch and grown > MAX_BATCH_BYTES:
                break
            batch.append(lane.carry.popleft())
            size = grown
        return batch

    def _pop(self, lane: _Lane, limit: int) -> list:
        """Take up to ``limit`` live entries off the queue, oldest first; the lock is held."""
        entries: list = []
        queue = lane.queue
        while queue and len(entries) < limit:
            entry = queue.popleft()
            if type(entry) is not str:
                if entry.dead:
                    continue
                gid = entry.group_id
                key = (entry.group_key, gid if type(gid) is str else group_id_key(gid))
                group = lane.groups[key]
                group.popleft()
                if not group:
                    del lane.groups[key]
            entries.append(entry)
        return entries

    def _encode_some(self, lane: _Lane, limit: int) -> bool:
        """Move up to ``limit`` entries from the queue to the carry, encoded. False if none."""
        with self._lock:
            entries = self._pop(lane, limit)
        for entry in entries:
            item = self._encode(entry)
            if item is not None:
                lane.carry.append(item)
        return bool(entries)

    def _encode(self, entry: _Entry) -> Optional[tuple[str, str, int]]:
        """The wire text of an entry (``before_send`` applied); None if it is not to be sent."""
        if type(entry) is str:
            message: Any = entry
            size = len(entry)
        else:
            message = wire_message(self._token, entry)
            size = entry.size
        try:
            if self.before_send is not None:
                if type(message) is str:
                    try:
                        message = json.loads(message)
                    except ValueError:
                        raise MixpanelException("message is not valid JSON; not sent") from None
                message = self._call_before_send(message)
                if message is None:
                    self._settle(size, "filtered")
                    return None
            text = message if type(message) is str else _dumps(message)
            quoted = form_quote(text)
            if len(text) > MAX_MESSAGE_BYTES or len(quoted) > MAX_BATCH_BYTES - 64:
                raise MixpanelException(
                    f"message of {len(text)} bytes is over Mixpanel's 1 MB limit; not sent"
                )
        except MixpanelException as error:
            self._settle(size, "failed")
            self._report(error, [message] if type(message) is dict else [])
            return None
        return text, quoted, size

    # -- spool -------------------------------------------------------------------------

    def _load_spool(self, limit: int) -> bool:
        """Replay up to ``limit`` spooled messages into the groups carry. False if none."""
        if self._spool is None or not self._spool_rows:
            return False
        texts = self._spool.take(limit)
        with self._lock:
            if len(texts) < limit:
                self._spool_rows = 0
            else:
                self._spool_rows = max(0, self._spool_rows - len(texts))
            self._count += len(texts)
            self._bytes += sum(map(len, texts))
            self._stats["replayed"] += len(texts)
            if not self._count and not self._spool_rows:
                self._idle.notify_all()
        carry = self._groups_lane.carry
        for text in texts:
            carry.append((text, form_quote(text), len(text)))
        return bool(texts)

    def _spill(self, everything: bool = False, from_caller: bool = False) -> int:
        """Move the oldest pending group messages to the spool; return how many.

        Send order is carry, then spool, then queue. The worker (and exit)
        moves the carry in front of the spool and queue entries behind it; a
        caller over the headroom only moves queue entries.
        Normally half of ``max_pending`` stays in memory; at exit nothing does.
        """
        # A caller waits for a spill under way (the overflow policy: a disk write
        # instead of a drop), but never for long.
        if not self._spill_lock.acquire(timeout=1.0 if from_caller else -1):
            return 0
        if self._spilling:  # re-entered from a callback inside this spill
            self._spill_lock.release()
            return 0
        self._spilling = True
        try:
            lane = self._groups_lane
            with self._lock:  # the inbox is newer than the queue: it stays
                self._spill_needed = self._spill_now = False
                keep = 0 if everything else self.max_pending // 2
                front: list = []
                if not from_caller:
                    front = list(lane.carry)
                    lane.carry.clear()
                room = max(0, self._count - len(front) - keep)
                entries = self._pop(lane, room) if room else []
            back = [item for item in map(self._encode, entries) if item is not None]
            moved = front + back
            if not moved:
                return 0
            size = sum(item[2] for item in moved)
            stored = self._spool is not None and self._spool.put(
                [item[0] for item in front], [item[0] for item in back]
            )
            with self._lock:
                self._count -= len(moved)
                self._bytes -= size
                self._stats["spooled" if stored else "dropped"] += len(moved)
                if stored:
                    self._spool_rows += len(moved)
        finally:
            self._spilling = False
            self._spill_lock.release()
        if not stored:
            logger.error("mixpanel-otel: spool unavailable; dropped %d update(s)", len(moved))
        return len(moved)

    def _call_before_send(self, message: Any) -> Any:
        try:
            return self.before_send(message)  # type: ignore[misc]
        except Exception as exc:
            with self._lock:
                self._stats["errors"] += 1
            raise MixpanelException(
                f"before_send raised {self._scrub(repr(exc))}; message not sent"
            ) from None

    def _deliver(self, lane: _Lane, batch: list, deadline: Optional[float]) -> list:
        """Post ``batch`` until it is delivered or refused; return what is left at the deadline."""
        attempt = 0
        while True:
            timeout = self.request_timeout
            deadline = deadline or self._deadline  # shutdown may begin while we retry
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0.01:
                    return batch
                timeout = min(timeout, remaining)
            body = form_body((item[1] for item in batch), lane.extra)
            with self._lock:
                self._stats["requests"] += 1
            outcome = self.transport.post(lane.path, body, lane.auth, timeout)
            if outcome.kind == OK:
                self._settle(sum(item[2] for item in batch), "sent", len(batch))
                return []
            if outcome.kind == RETRY:
                attempt += 1
                with self._lock:
                    self._stats["retries"] += 1
                if not self._sleep(self._backoff(attempt, outcome), deadline):
                    return batch
                continue
            if outcome.kind == REJECTED and len(batch) > 1:
                half = len(batch) // 2
                left = self._deliver(lane, batch[:half], deadline)
                if left:
                    return left + batch[half:]
                return self._deliver(lane, batch[half:], deadline)
            assert outcome.kind in (REJECTED, FATAL)
            self._settle(sum(item[2] for item in batch), "failed", len(batch))
            self._report(MixpanelException(self._scrub(outcome.reason)), [i[0] for i in batch])
            return []

    def _backoff(self, attempt: int, outcome: Outcome) -> float:
        if outcome.retry_after is not None:
            return min(outcome.retry_after, max(self._backoff_max, _RETRY_AFTER_CAP))
        if attempt == 1 and outcome.reset:
            return random.uniform(0.05, 0.25)  # a reset connection: retry quickly once
        ceiling = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _sleep(self, delay: float, deadline: Optional[float]) -> bool:
        """Wait before a retry; False when the deadline leaves no time for one."""
        deadline = deadline or self._deadline
        if deadline is None:
            end = monotonic() + delay
            while not self._stop.is_set():  # shutdown cuts the wait short, sets a deadline
                remaining = end - monotonic()
                if remaining <= 0:
                    break
                self._alert.wait(remaining)
                self._alert.clear()
                if self._spill_needed:
                    self._spill()  # an outage: move overflow to disk while we wait
            return True
        remaining = deadline - monotonic()
        if remaining <= 0.01:
            return False
        time.sleep(min(delay, remaining))
        return deadline - monotonic() > 0.01

    def _settle(self, size: int, outcome: str, count: int = 1) -> None:
        with self._lock:
            self._stats[outcome] += count
            self._count -= count
            self._bytes -= size
            if not self._count:
                self._idle.notify_all()

    def _report(self, error: MixpanelException, texts: list) -> None:
        """Tell ``on_error`` (or the log) which messages were lost and why."""
        if self.on_error is None:
            logger.warning("mixpanel-otel: %d message(s) not delivered: %s", len(texts), error)
            return
        try:
            self.on_error(error, [_redacted(text, self._token) for text in texts])
        except Exception as exc:
            with self._lock:
                self._stats["errors"] += 1
            logger.error("mixpanel-otel: on_error raised %s", self._scrub(repr(exc)))

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>")

    # -- fork ------------------------------------------------------------------------

    def _reset_in_child(self) -> None:
        """A forked child starts empty; the parent keeps (and delivers) its updates."""
        self._init_state()


def _dumps(message: Any) -> str:
    try:
        return json.dumps(message, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise MixpanelException(f"message cannot be encoded as JSON: {exc}") from None


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


# -- the shared consumers ---------------------------------------------------------------

_LIVE: weakref.WeakSet[Consumer] = weakref.WeakSet()
_SHARED: dict[tuple[str, str], Consumer] = {}
_SHARED_LOCK = threading.Lock()
_CAPTURE: Optional[Consumer] = None  # set by mixpanel_otel.testing.capture_groups


def get_consumer(token: Optional[str] = None, api_host: Optional[str] = None, **options: Any):
    """Return this process's consumer for (token, API host), creating it with ``options``.

    ``token`` and ``api_host`` fall back to ``MIXPANEL_TOKEN`` and
    ``MIXPANEL_API_HOST`` (or ``MIXPANEL_REGION``). Options only apply when
    the consumer is created; a later call with other options gets the same
    consumer.
    """
    if _CAPTURE is not None:
        return _CAPTURE
    region = options.pop("region", None)
    token, base_url = resolve_target(token, api_host, region)
    with _SHARED_LOCK:
        consumer = _SHARED.get((token, base_url))
        if consumer is None:
            consumer = _SHARED[(token, base_url)] = Consumer(token, base_url, **options)
        else:
            resolve_options(options)  # still reject a misspelt option
        return consumer


def _shutdown_all() -> None:
    """The exit flush: every consumer, one after the other, within one overall bound.

    No new threads here: Python 3.12+ refuses to start one at shutdown.
    """
    consumers = list(_LIVE)
    if not consumers:
        return
    deadline = monotonic() + max(c.shutdown_timeout for c in consumers)
    for consumer in consumers:
        try:
            consumer.shutdown(max(0.1, deadline - monotonic()))
        except Exception as exc:  # never let one consumer cost the others their flush
            logger.error("mixpanel-otel: exit flush failed: %r", exc)


_fork_held: list[Consumer] = []


def _before_fork() -> None:
    _SHARED_LOCK.acquire()
    _fork_held[:] = list(_LIVE)
    for consumer in _fork_held:
        consumer._lock.acquire()


def _after_fork_in_parent() -> None:
    for consumer in _fork_held:
        consumer._lock.release()
    _fork_held.clear()
    _SHARED_LOCK.release()


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    for consumer in _fork_held:
        consumer._reset_in_child()
    _fork_held.clear()
    _SHARED_LOCK = threading.Lock()
    WORKER_THREADS.clear()


atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
