"""The sender: one batch of encoded messages to one endpoint, until it is settled.

It sizes the batch into request bodies under Mixpanel's 2 MB limit, posts
them in order, retries what is retryable with capped exponential backoff and
jitter (honouring Retry-After), and splits a batch Mixpanel refused (status
0, 413) in halves so only the bad messages are lost. It knows nothing of
threads, buffers or spools: the transport, the clock and the wait are
injected, so it is tested against a fake transport in milliseconds, and
``GroupClient(sync=True)`` uses the same loop as the background worker.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Callable, Optional, Union

from .._transport import BODY_CLOSE, BODY_OPEN, SEPARATOR, Answer, Outcome, Post, form_body
from .._wire import MAX_BATCH_BYTES
from .encode import Message

__all__ = ["Backoff", "Result", "Sender"]

#: A server asking for a longer Retry-After than this is retried after this.
RETRY_AFTER_CAP = 60.0


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
    """What became of a batch: delivered, refused (with reasons), or left unsent."""

    delivered: list[Message] = field(default_factory=list)
    refused: list[tuple[Message, str]] = field(default_factory=list)
    unsent: list[Message] = field(default_factory=list)
    reason: str = ""  # the last failure's reason, for unsent messages


#: ``wait(seconds) -> bool``: sleep before a retry; False when there is no time
#: left for one (the exit deadline), and it may return early to retry at once.
Wait = Callable[[float], bool]


class Sender:
    """Posts batches through ``transport`` and settles every message of them."""

    def __init__(
        self,
        transport: Post,
        *,
        request_timeout: float,
        backoff: Optional[Backoff] = None,
        wait: Wait,
        clock: Callable[[], float] = monotonic,
        deadline: Callable[[], Optional[float]] = lambda: None,
        on_answer: Callable[[Answer], None] = lambda answer: None,
        before_post: Callable[[], bool] = lambda: True,
        max_attempts: Optional[int] = None,
    ) -> None:
        self.transport = transport
        self.request_timeout = request_timeout
        self.backoff = backoff or Backoff()
        self.wait = wait
        self.clock = clock
        self.deadline = deadline  # the exit deadline, when one is set
        self.on_answer = on_answer  # stats and health
        self.before_post = before_post  # waits out a consumer-wide pause; False: stop
        self.max_attempts = max_attempts  # None: retry until the deadline

    def deliver(
        self,
        path: str,
        messages: list[Message],
        auth: Optional[tuple[str, str]] = None,
        extra: str = "",
    ) -> Result:
        """Send ``messages`` in order; every one ends in exactly one list of the result."""
        result = Result()
        for chunk in self._chunks(messages, extra):
            if result.unsent:  # later chunks wait behind an unsent one: order
                result.unsent.extend(chunk)
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
        deadline = self.deadline()
        if deadline is None:
            return self.request_timeout
        left = deadline - self.clock()
        return None if left <= 0.01 else min(self.request_timeout, left)

    def deliver_body(self, path: str, body: str, origins: list[Any]) -> Union[Result, Answer]:
        """Send a batch already encoded as one body (the encoder's fast path).

        Delivered, or left unsent at the deadline: the result, with
        text-less messages that name their origins. Refused: Mixpanel's
        answer; the caller then splits the batch (status 0, 413) or reports
        every message (401, 403, other 4xx), as :meth:`deliver` does.
        """
        result = Result()
        answer = self._post(path, body, None, result)
        if answer is None:
            result.unsent = [Message("", "", origin) for origin in origins]
            return result
        if answer.outcome is Outcome.OK:
            result.delivered = [Message("", "", origin) for origin in origins]
            return result
        return answer

    def _post(
        self, path: str, body: str, auth: Optional[tuple[str, str]], result: Result
    ) -> Optional[Answer]:
        """Post ``body`` until an answer other than "retry"; None when out of time or tries."""
        attempt = 0
        while True:
            timeout = self._timeout()
            if timeout is None or not self.before_post():
                return None
            answer = self.transport.post(path, body, auth, timeout)
            self.on_answer(answer)
            if answer.outcome is not Outcome.RETRY:
                return answer
            attempt += 1
            result.reason = answer.reason
            if self.max_attempts is not None and attempt >= self.max_attempts:
                return None
            delay = self.backoff.delay(attempt, answer)
            deadline = self.deadline()
            if deadline is not None:
                delay = min(delay, deadline - self.clock())
            if delay < 0 or not self.wait(delay):
                return None

    def _deliver(
        self,
        path: str,
        chunk: list[Message],
        auth: Optional[tuple[str, str]],
        extra: str,
        result: Result,
    ) -> None:
        body = form_body((message.quoted for message in chunk), extra)
        answer = self._post(path, body, auth, result)
        if answer is None:
            result.unsent.extend(chunk)
        elif answer.outcome is Outcome.OK:
            result.delivered.extend(chunk)
        elif answer.outcome is Outcome.REJECTED and len(chunk) > 1:
            half = len(chunk) // 2
            for part in (chunk[:half], chunk[half:]):
                if result.unsent:
                    result.unsent.extend(part)
                else:
                    self._deliver(path, part, auth, extra, result)
        else:
            result.refused.extend((message, answer.reason) for message in chunk)
