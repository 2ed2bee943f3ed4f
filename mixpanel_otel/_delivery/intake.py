"""The callers' side: appending updates, admission, SDK messages.

Everything here runs on the application's threads. The fast path is an
append to the *inbox* (no lock, no I/O); past ``max_pending`` a caller goes
through admission (:mod:`.admission`): it waits for room, or its updates
overflow to the spool or are dropped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from time import monotonic
from typing import Any, Optional
from urllib.parse import quote_plus

from .._exceptions import MixpanelException
from .._wire import ENDPOINTS, GroupUpdate, updates_from_message
from . import signals
from .admission import Admission, decide
from .dispatch import settle_receipts
from .jobs import Lane
from .receipts import Fate, Receipt
from .state import ConsumerState
from .stats import logger
from .worker import WORKER_THREADS

__all__ = ["Intake"]


class Intake(ConsumerState):
    """The callers' side of the consumer (see the module docstring)."""

    def enqueue(self, updates: Iterable[GroupUpdate]) -> None:
        """Queue updates from the caller's thread: an append; never I/O, never raises.

        Past ``max_pending`` the caller goes through admission (:mod:`.admission`).
        """
        inbox = self._inbox
        if not isinstance(updates, list):
            updates = list(updates)
        waiting = len(inbox)
        size = sum(update.size for update in updates)
        # Past a batch in the inbox the caller absorbs it itself, under the lock.
        if (
            waiting < self.batch_size
            and self.held + waiting < self.max_pending
            and self.held_bytes + self._inbox_bytes + size < self.max_pending_bytes
        ):
            inbox.extend(updates)
            self._inbox_bytes += size  # not atomic; a rough figure, reset by every absorb
            if len(inbox) >= self._wake_at and not self._wake_sent:
                self._wake_sent = True
                with self._cond:
                    self._cond.notify()
            if not self._worker.started:
                self._worker.ensure()
            if self._eager_until:
                self._deliver_before_returning()
            if signals.pending:
                signals.check()
            return
        self._admit(updates, None, wait=True)
        if self._eager_until:
            self._deliver_before_returning()
        signals.check()

    def _deliver_before_returning(self) -> None:
        """After a SIGTERM an application handles itself, the process may die by the
        signal once that handler is done: updates made meanwhile (a shutdown hook's
        last log line) are delivered before the call returns, within the exit bound."""
        left = self._eager_until - monotonic()
        if left > 0 and threading.get_ident() not in WORKER_THREADS:
            self.flush(left)

    def submit(self, updates: Sequence[GroupUpdate]) -> Receipt:
        """Queue updates and return a :class:`Receipt` that settles when all are settled.

        Never waits, and sends at once rather than on the next interval. When
        there is no room or delivery is failing, the updates go to the spool
        (the receipt settles as spooled) or, without one, the receipt comes
        back ``refused`` with nothing queued.
        """
        receipt = Receipt(len(updates))
        if not updates:
            return receipt
        if self._spool is None:
            reason = ""
            if self.health.failing:
                reason = f"delivery is failing: {self._scrub(self.health.reason)}"
            elif self.held + len(self._inbox) + len(updates) > self.max_pending:
                reason = f"over max_pending ({self.max_pending})"
            if reason:
                refused = Receipt(len(updates), refused=True, reason=reason)
                refused.retry_after = max(1.0, self._pause_until - monotonic())
                return refused
        for update in updates:
            update.receipts = [receipt]
        if self._spool is not None and (
            self.health.failing or self.held + len(self._inbox) + len(updates) > self.max_pending
        ):
            self._spill(list(updates))  # kept on disk: the receipt settles as spooled
            return receipt
        self._admit(list(updates), receipt, wait=False)
        with self._cond:  # someone waits on this receipt: send now, not on the next tick
            self._dispatch.draining = True
            self._cond.notify_all()
        return receipt

    def _admit(self, updates: list[GroupUpdate], receipt: Optional[Receipt], wait: bool) -> None:
        """Add updates under the lock: merge, take room, wait for room, or overflow."""
        overflow: list[GroupUpdate] = []
        reason = ""
        self._check_fork()
        with self._cond:
            self._absorb()
            wait_until: Optional[float] = None
            position = 0
            while position < len(updates):
                added = self._add(updates[position], room=receipt is None)
                if added:
                    position += 1
                    continue
                now = monotonic()
                verdict, reason = decide(
                    failing=self.health.failing,
                    max_block=self.max_block if wait else 0.0,
                    wait_until=wait_until,
                    now=now,
                    can_wait=self._can_wait(),
                )
                if verdict is Admission.OVERFLOW:
                    overflow = updates[position:]
                    break
                if wait_until is None:
                    wait_until = now + self.max_block
                    self.stats_.add("blocked")
                self._dispatch.draining = True
                self._cond.notify_all()
                self._cond.wait(max(0.0, wait_until - now))
                self._absorb()
            self._count_held()
        if not self._worker.started:
            self._worker.ensure()
        if overflow:
            self._overflow(overflow, reason)

    def _can_wait(self) -> bool:
        return (
            threading.get_ident() not in WORKER_THREADS
            and not self._closing
            and self._worker.started
        )

    def _room(self) -> bool:
        dispatch = self._dispatch
        return dispatch.held < self.max_pending and dispatch.held_bytes < self.max_pending_bytes

    def _add(self, update: GroupUpdate, room: bool = True) -> bool:
        """Coalesce or append one update (the lock is held); False when it needs room."""
        superseded = self._dispatch.add(update, self._room if room else _always)
        if superseded < 0:
            return False
        self.stats_.add("enqueued")
        if superseded:
            self.stats_.add("coalesced", superseded)
        return True

    def _absorb(self) -> None:
        """Move the inbox into the buffer, in order (the lock is held)."""
        inbox = self._inbox
        self._wake_sent = False
        self._inbox_bytes = 0
        if not inbox:
            return
        add, enqueued, coalesced = self._dispatch.add, 0, 0
        while inbox:
            coalesced += add(inbox.popleft(), _always)  # admitted by the caller's check
            enqueued += 1
        self.stats_.add("enqueued", enqueued)
        if coalesced:
            self.stats_.add("coalesced", coalesced)
        self._count_held()

    def _count_held(self) -> None:
        self.held = self._dispatch.held
        self.held_bytes = self._dispatch.held_bytes

    def _overflow(self, updates: list[GroupUpdate], reason: str) -> None:
        if self._spool is not None:
            self._spill(updates)
            return
        with self._cond:
            settle_receipts(updates, Fate.DROPPED, f"dropped: {reason}")
        self.stats_.add("dropped", len(updates))
        suppressed = self._overflow_warning.ready()
        if suppressed is not None:
            logger.warning(
                "mixpanel-otel: %d update(s) dropped: %s (max_pending %d updates / %d bytes); "
                "stats()['dropped'] counts them all%s",
                len(updates),
                reason,
                self.max_pending,
                self.max_pending_bytes,
                f"; {suppressed} more overflow(s) since the last warning" if suppressed else "",
            )

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

    def _enqueue_raw(
        self, endpoint: str, path: str, text: str, api_key: Optional[str], api_secret: Optional[str]
    ) -> None:
        self._check_fork()
        with self._cond:
            full = not self._room()
            if not full:
                lane = self._dispatch.add_raw(
                    (endpoint, api_key, api_secret),
                    lambda: self._new_lane(endpoint, path, api_key, api_secret),
                    text,
                )
                self.stats_.add("enqueued")
                self._count_held()
                if len(lane.queue) >= self.batch_size:
                    self._cond.notify()
        if full:
            self.stats_.add("dropped")
            self._report(MixpanelException("dropped: the consumer is full"), [text])
        elif not self._worker.started:
            self._worker.ensure()

    def _new_lane(
        self, endpoint: str, path: str, api_key: Optional[str], api_secret: Optional[str]
    ) -> Lane:
        credentials = self._credentials
        if endpoint == "imports" and credentials is not None:
            # Service-account credentials, as the SDK's Consumer(credentials=...) uses them.
            project = quote_plus(str(credentials.project_id))
            return Lane(f"{path}?project_id={project}", (credentials.username, credentials.secret))
        if api_secret:
            extra = f"&api_key={quote_plus(api_key)}" if api_key else ""
            return Lane(path, (api_secret, ""), extra)
        return Lane(path)


def _always() -> bool:
    return True
