"""The sender: one batch to one endpoint, until every message of it has an outcome.

It posts a batch in one piece when the encoder could make one, else in
request bodies under Mixpanel's 2 MB limit, in order; it retries what is
retryable with capped exponential backoff and jitter (honouring
Retry-After), and when Mixpanel rejects a batch (``status: 0``, 413) it
*splits* it in halves, message by message if need be, so only the bad
messages fail; a refusal of the project token fails the batch whole, as
splitting it would only send every message again. It knows nothing of
threads, buffers or spools: the transport and the clock are injected and
everything else goes through one :class:`Hooks` object, so it is tested
against a fake transport in milliseconds, and ``GroupClient(sync=True)``
uses the same loop as the background workers.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Callable, Optional, Protocol

from .._transport import BODY_CLOSE, BODY_OPEN, SEPARATOR, Answer, Outcome, Post, form_body
from .._wire import MAX_BATCH_BYTES
from .encode import Failure, Message

__all__ = ["Backoff", "Batch", "Hooks", "Messages", "Result", "Sender", "SyncHooks"]

#: A server asking for a longer Retry-After than this is retried after this.
RETRY_AFTER_CAP = 60.0

#: A refusal of the project token, as the local sink ("invalid project token: ...",
#: "$token is missing") and Mixpanel ("token, missing or empty", "Invalid token") word it.
_TOKEN_REFUSAL = re.compile(r"(invalid (project )?token|\$?token)\b", re.IGNORECASE)
#: One refused message of a verbose answer that names them: "message 3: <problem>".
_PER_MESSAGE = re.compile(r"message (\d+): (.*)")


def token_refusal(reason: str, size: int) -> Optional[str]:
    """The problem, when a ``status: 0`` answer refuses the project token for a whole batch.

    Every message of a batch carries the same token, so such a refusal is not
    about one message and splitting cannot isolate it. An answer that names
    its refused messages one by one is a token refusal only when it names all
    ``size`` of them for the token (mixed tokens, from the SDK's ``send``, still split).
    """
    parts = [part.strip() for part in reason.split(";")]
    named = [_PER_MESSAGE.fullmatch(part) for part in parts]
    if all(named):
        problems = {m.group(2) for m in named if m}
        indexes = {m.group(1) for m in named if m}
        if len(indexes) < size:
            return None
    else:
        problems = {reason.strip()}
    if all(_TOKEN_REFUSAL.match(problem) for problem in problems):
        return "; ".join(sorted(problems))
    return None


@dataclass
class Backoff:
    """Mixpanel's advice: from ``base`` seconds doubling to ``cap``, with jitter."""

    base: float = 2.0
    cap: float = 60.0
    rng: Callable[[float, float], float] = random.uniform

    def delay(self, attempt: int, answer: Answer) -> float:
        if answer.retry_after is not None:
            return min(answer.retry_after, max(self.cap, RETRY_AFTER_CAP))
        if attempt == 1 and answer.reset:
            return self.rng(0.05, 0.25)  # a reset connection: retry quickly once
        ceiling = min(self.cap, self.base * 2.0 ** (attempt - 1))
        return ceiling / 2 + self.rng(0, ceiling / 2)


@dataclass
class Result:
    """What became of a batch, by origin (an update, a spool row id, an SDK message's text).

    Every origin of the batch ends in exactly one list.
    """

    delivered: list[Any] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)  # rejected by Mixpanel, or unsendable
    filtered: list[Any] = field(default_factory=list)  # before_send returned None
    unsent: list[Any] = field(default_factory=list)  # out of time (the exit deadline)
    reason: str = ""  # the last retryable failure's reason, for the unsent


class Batch(Protocol):
    """A batch as the encoder hands it over."""

    origins: list[Any]

    def body(self) -> Optional[str]:
        """The whole request body in one piece, or None when it must go message by message."""

    def messages(self, result: Result) -> list[Message]:
        """Each message on its own; the unencodable and filtered go into ``result``."""


class Messages:
    """A batch of messages already encoded."""

    def __init__(self, messages: list[Message]) -> None:
        self._messages = messages
        self.origins = [message.origin for message in messages]

    def body(self) -> Optional[str]:
        return None

    def messages(self, result: Result) -> list[Message]:
        return self._messages


class Hooks(Protocol):
    """What the sender asks of the consumer (or of the sync path)."""

    def answered(self, answer: Answer) -> None:
        """Every answer: counts, health, a 429's pause."""

    def may_post(self) -> bool:
        """Before each request: wait out a pause of the whole consumer; False to stop."""

    def wait(self, delay: float) -> bool:
        """Before a retry; may return early to retry at once; False when out of time."""

    def deadline(self) -> Optional[float]:
        """The exit deadline, when one is set."""


class SyncHooks:
    """Hooks for sending from the caller's thread: plain sleeps, no deadline."""

    def __init__(self, answered: Callable[[Answer], None]) -> None:
        self.answered = answered

    def may_post(self) -> bool:
        return True

    def wait(self, delay: float) -> bool:
        threading.Event().wait(delay)
        return True

    def deadline(self) -> Optional[float]:
        return None


class Sender:
    """Posts batches through ``transport``; every message ends delivered, failed or unsent."""

    def __init__(
        self,
        transport: Post,
        hooks: Hooks,
        *,
        request_timeout: float,
        backoff: Optional[Backoff] = None,
        clock: Callable[[], float] = monotonic,
        max_attempts: Optional[int] = None,
    ) -> None:
        self.transport = transport
        self.hooks = hooks
        self.request_timeout = request_timeout
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.max_attempts = max_attempts  # None: retry until the deadline

    def deliver(
        self, path: str, batch: Batch, auth: Optional[tuple[str, str]] = None, extra: str = ""
    ) -> Result:
        """Send ``batch`` in order; every origin ends in exactly one list of the result."""
        result = Result()
        body = batch.body()
        if body is not None:
            answer = self._post(path, body, auth, result)
            if answer is None:
                result.unsent.extend(batch.origins)
            elif answer.outcome is Outcome.OK:
                result.delivered.extend(batch.origins)
            else:
                self._rejected(path, batch.messages(result), auth, extra, answer, result)
            return result
        for chunk in self._chunks(batch.messages(result), extra):
            if result.unsent:  # later chunks wait behind an unsent one: order
                result.unsent.extend(message.origin for message in chunk)
            else:
                self._deliver(path, chunk, auth, extra, result)
        return result

    @staticmethod
    def _chunks(messages: list[Message], extra: str) -> Iterator[list[Message]]:
        """Consecutive runs of messages whose request body stays under 2 MB."""
        chunk: list[Message] = []
        size = len(BODY_OPEN) + len(BODY_CLOSE) + len(extra)
        for message in messages:
            grown = size + len(message.quoted) + len(SEPARATOR)
            if chunk and grown > MAX_BATCH_BYTES:
                yield chunk
                chunk = []
                grown = len(BODY_OPEN) + len(BODY_CLOSE) + len(extra) + len(message.quoted)
            chunk.append(message)
            size = grown
        if chunk:
            yield chunk

    def _timeout(self) -> Optional[float]:
        """This request's timeout, bounded by the time left before the deadline."""
        deadline = self.hooks.deadline()
        if deadline is None:
            return self.request_timeout
        left = deadline - self.clock()
        return None if left <= 0.01 else min(self.request_timeout, left)

    def _post(
        self, path: str, body: str, auth: Optional[tuple[str, str]], result: Result
    ) -> Optional[Answer]:
        """Post ``body`` until an answer other than "retry"; None when out of time or tries."""
        hooks = self.hooks
        attempt = 0
        while True:
            timeout = self._timeout()
            if timeout is None or not hooks.may_post():
                return None
            answer = self.transport.post(path, body, auth, timeout)
            hooks.answered(answer)
            if answer.outcome is not Outcome.RETRY:
                return answer
            attempt += 1
            result.reason = answer.reason
            if self.max_attempts is not None and attempt >= self.max_attempts:
                return None
            delay = self.backoff.delay(attempt, answer)
            deadline = hooks.deadline()
            if deadline is not None:
                delay = min(delay, deadline - self.clock())
            if delay < 0 or not hooks.wait(delay):
                return None

    def _deliver(
        self,
        path: str,
        chunk: list[Message],
        auth: Optional[tuple[str, str]],
        extra: str,
        result: Result,
    ) -> None:
        answer = self._post(path, form_body((m.quoted for m in chunk), extra), auth, result)
        if answer is None:
            result.unsent.extend(message.origin for message in chunk)
        elif answer.outcome is Outcome.OK:
            result.delivered.extend(message.origin for message in chunk)
        else:
            self._rejected(path, chunk, auth, extra, answer, result)

    def _rejected(
        self,
        path: str,
        chunk: list[Message],
        auth: Optional[tuple[str, str]],
        extra: str,
        answer: Answer,
        result: Result,
    ) -> None:
        """Split a rejected batch in halves; a fatal answer (401, 403, 4xx) or a refusal of
        the project token fails it whole, with no request sent again."""
        reason = answer.reason  # 401, 403, other 4xx, or one message rejected
        if answer.outcome is Outcome.REJECTED and len(chunk) > 1:
            refused = token_refusal(answer.reason, len(chunk))
            if refused is None:
                half = len(chunk) // 2
                for part in (chunk[:half], chunk[half:]):
                    if result.unsent:
                        result.unsent.extend(message.origin for message in part)
                    else:
                        self._deliver(path, part, auth, extra, result)
                return
            reason = f"{refused} (refused for the whole batch: not split, not retried)"
        result.failed.extend(Failure(m.origin, m.text, reason) for m in chunk)
