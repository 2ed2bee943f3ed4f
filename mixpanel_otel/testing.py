"""Helpers for users' own tests: capture group messages in memory, no network.

>>> from mixpanel_otel.testing import capture_groups
>>> with capture_groups() as captured:
...     GroupClient().group_set("company", "acme", {"plan": "pro"})
>>> captured.messages[0]["$set"]
{'plan': 'pro'}
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator
from urllib.parse import parse_qs

from ._delivery import Consumer, registry
from ._semantics import apply_operation
from ._transport import Answer, Outcome
from ._wire import ALL_OPERATIONS as OPERATIONS
from ._wire import group_id_key

__all__ = ["Capture", "capture_groups", "reset_consumers"]


class _MemoryTransport:
    """Stands in for HTTP: keeps every message the consumer would post."""

    base_url = "memory://"

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.requests = 0

    def post(self, path: str, body: str, auth: Any = None, timeout: Any = None) -> Answer:
        self.requests += 1
        data = parse_qs(body)["data"][0]
        for message in json.loads(data):
            message["$endpoint"] = path
            self.messages.append(message)
        return Answer(Outcome.OK)


class Capture:
    """What a :func:`capture_groups` block sent, after validation and coalescing."""

    def __init__(self, consumer: Consumer, transport: _MemoryTransport) -> None:
        self.consumer = consumer
        self._transport = transport

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Group messages (wire dicts) delivered so far; flushes first."""
        self.consumer.flush(5.0)
        return [
            {k: v for k, v in m.items() if k != "$endpoint"}
            for m in self._transport.messages
            if m["$endpoint"] == "/groups"
        ]

    def profiles(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The group profiles the messages produce, ``{(group_key, group_id): properties}``."""
        profiles: dict[tuple[str, str], dict[str, Any]] = {}
        for message in self.messages:
            key = (message["$group_key"], group_id_key(message["$group_id"]))
            op = next(op for op in OPERATIONS if op in message)
            state = apply_operation(profiles.get(key), op, message[op])
            if state is None:
                profiles.pop(key, None)
            else:
                profiles[key] = state
        return profiles

    def stats(self) -> dict[str, int]:
        return self.consumer.stats()


@contextlib.contextmanager
def capture_groups(token: str = "test-token", **options: Any) -> Iterator[Capture]:
    """Route every front end created inside the block to an in-memory consumer.

    ``get_consumer()`` returns the capturing consumer for any token or host
    while the block runs, so handlers, exporters and ``GroupClient`` built
    inside it (or given ``consumer=captured.consumer``) are captured.
    """
    options.setdefault("flush_interval", 3600.0)
    options.setdefault("flush_on_sigterm", False)
    transport = _MemoryTransport()
    consumer = Consumer(token, _MemoryTransport.base_url, transport=transport, **options)
    try:
        with registry.override(consumer):
            yield Capture(consumer, transport)
    finally:
        consumer.shutdown(5.0)


def reset_consumers(timeout: float = 2.0) -> None:
    """Shut down and forget every shared consumer (between tests)."""
    registry.reset(timeout)
