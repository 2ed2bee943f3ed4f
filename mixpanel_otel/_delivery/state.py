"""What every part of the consumer shares: its state, declared once.

The consumer is one object built from parts by concern (callers' side in
:mod:`.intake`, the worker threads' in :mod:`.pipeline`, flush, exit and
spills in :mod:`.lifecycle`), all reading this state under one lock
(``_cond``); ``Consumer._fresh_state`` creates it. The method stubs let each
part call the others with types checked.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._exceptions import MixpanelException
from .._transport import Answer, Post
from .._wire import GroupUpdate, Truncations
from .dispatch import Dispatch
from .encode import Encoder, Message
from .jobs import Job, Lane
from .receipts import Fate, Receipt
from .sender import Backoff, Sender
from .spool import Spool
from .stats import Health, Stats, Throttle
from .worker import Worker

__all__ = ["ConsumerState"]


class ConsumerState:
    """The attributes of a consumer (assigned in ``Consumer.__init__`` and ``_fresh_state``)."""

    # options
    base_url: str
    flush_interval: float
    batch_size: int
    max_pending: int
    max_pending_bytes: int
    max_block: float
    max_in_flight: int
    request_timeout: float
    shutdown_timeout: float
    spool_dir: Optional[str]
    flush_on_sigterm: bool
    on_error: Optional[Callable[..., Any]]
    truncations: Truncations
    _token: str
    _credentials: Any
    _backoff: Backoff
    _encoder: Encoder
    _transport_given: Optional[Post]
    # state a forked child makes anew
    _pid: int
    _cond: threading.Condition
    transport: Post
    _inbox: deque[GroupUpdate]  # callers append here, without the lock
    _inbox_bytes: int
    _dispatch: Dispatch  # buffer, lanes, jobs in flight (under _cond)
    held: int  # pending + in flight, read without the lock by the hot path
    held_bytes: int
    _spool: Optional[Spool]
    _spill_lock: threading.Lock  # one mover at a time keeps the spool in order
    _finishing: threading.Lock  # one shutdown at a time
    _flushing: int  # flush() calls waiting
    _eager: bool  # after a chained SIGTERM: every update is sent at once
    _eager_until: float  # ... and callers wait for it until then
    _next_tick: float
    _deadline: Optional[float]  # the exit deadline while shutting down
    _closing: bool
    _stopped: bool
    _pause_until: float  # a 429 / Retry-After pauses every request
    _retry_now: threading.Event  # flush() and shutdown cut retry waits short
    _wake_sent: bool
    _debug_due: bool
    _wake_at: int
    _gave_up: bool  # shut down with updates left: later flushes don't wait again
    stats_: Stats
    health: Health
    _overflow_warning: Throttle
    _stats_debug: Throttle
    _worker: Worker
    _sender: Sender

    if TYPE_CHECKING:

        def enqueue(self, updates: Iterable[GroupUpdate]) -> None: ...

        def _deliver_before_returning(self) -> None: ...

        def submit(self, updates: Sequence[GroupUpdate]) -> Receipt: ...

        def _admit(
            self, updates: list[GroupUpdate], receipt: Optional[Receipt], wait: bool
        ) -> None: ...

        def _can_wait(self) -> bool: ...

        def _room(self) -> bool: ...

        def _add(self, update: GroupUpdate, room: bool = True) -> bool: ...

        def _absorb(self) -> None: ...

        def _count_held(self) -> None: ...

        def _overflow(self, updates: list[GroupUpdate], reason: str) -> None: ...

        def send(
            self,
            endpoint: str,
            json_message: str,
            api_key: Any = None,
            api_secret: Optional[str] = None,
        ) -> None: ...

        def _enqueue_raw(
            self,
            endpoint: str,
            path: str,
            text: str,
            api_key: Optional[str],
            api_secret: Optional[str],
        ) -> None: ...

        def _new_lane(
            self, endpoint: str, path: str, api_key: Optional[str], api_secret: Optional[str]
        ) -> Lane: ...

        def _loop(self) -> None: ...

        def _adopt_spool(self) -> None: ...

        def _next_job(self, block: bool = True, inline: bool = False) -> Optional[Job]: ...

        def _run(self, job: Job) -> None: ...

        def _encode_updates(
            self, updates: list[GroupUpdate]
        ) -> tuple[list[Message], list[tuple[Any, str]]]: ...

        def _release(self, settled: list[tuple[GroupUpdate, Fate, str]]) -> None: ...

        def _encode_texts(
            self, texts: list[str]
        ) -> tuple[list[Message], list[tuple[Any, str]]]: ...

        def _report_refusals(self, refusals: list[tuple[Any, str]]) -> None: ...

        def _on_answer(self, answer: Answer) -> None: ...

        def _wait_out_pause(self) -> bool: ...

        def _retry_wait(self, delay: float) -> bool: ...

        def _log_stats(self) -> None: ...

        def _report(self, error: MixpanelException, messages: list[Any]) -> None: ...

        def deliver_now(self, updates: list[GroupUpdate]) -> None: ...

        def _spill(
            self, extra: list[GroupUpdate], in_flight: Optional[list[GroupUpdate]] = None
        ) -> int: ...

        def send_eagerly(self) -> None: ...

        def _settled(self) -> bool: ...

        def flush(self, timeout: Optional[float] = None) -> bool: ...

        def _wait_settled(self, deadline: float) -> bool: ...

        def shutdown(self, timeout: Optional[float] = None) -> bool: ...

        def _finish(self, deadline: float, timeout: Optional[float] = None) -> bool: ...

        def _finish_now(self, deadline: float, timeout: Optional[float]) -> bool: ...

        def _drain_inline(self, deadline: float) -> bool: ...

        def _fresh_state(self) -> None: ...

        def stats(self) -> dict[str, int]: ...

        def count_invalid(self, count: int = 1) -> None: ...

        def count_ignored(self, count: int = 1) -> None: ...

        def _scrub(self, text: str) -> str: ...

        def _check_fork(self) -> None: ...

        def after_fork(self) -> None: ...
