"""Fault injection: scripted answers that stand in for Mixpanel misbehaving.

A test queues :class:`Fault` objects with :meth:`Sink.script`; each answers
one next POST. The server reads them through a :class:`FaultScript`.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Optional, Union

from .protocol import TOO_LARGE

__all__ = ["Fault", "FaultScript", "default_fault_body"]


@dataclass(frozen=True)
class Fault:
    """One scripted answer to the next POST request (see :meth:`Sink.script`).

    ``drop`` closes the connection without a response; ``delay`` sleeps first
    (and, with no ``status``, then handles the request normally); ``status`` and
    ``body`` replace the answer (``body`` defaults to what Mixpanel sends for that
    status); ``retry_after`` adds a ``Retry-After`` header; ``apply`` stores the
    messages anyway, as when a response is lost after the server applied the data.
    """

    status: Optional[int] = None
    body: Optional[Union[str, bytes]] = None
    retry_after: Optional[Union[float, str]] = None
    delay: float = 0.0
    drop: bool = False
    apply: bool = False

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"Fault status must be an HTTP status code, got {self.status!r}")
        if self.delay < 0:
            raise ValueError("Fault delay must be >= 0")

    @property
    def replaces_answer(self) -> bool:
        """True when this fault answers instead of the normal handling."""
        return self.drop or self.status is not None

    def response(self) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        """(status, body, content type, headers) of a fault that answers with a status."""
        assert self.status is not None
        headers = []
        if self.retry_after is not None:
            ra = self.retry_after
            if isinstance(ra, float) and ra.is_integer():
                ra = int(ra)
            headers.append(("Retry-After", str(ra)))
        if self.body is None:
            body = json.dumps(default_fault_body(self.status)).encode("utf-8")
            ctype = "application/json"
        else:
            body = self.body.encode("utf-8") if isinstance(self.body, str) else self.body
            try:
                json.loads(body)
                ctype = "application/json"
            except ValueError:
                ctype = "text/plain; charset=utf-8"
        return self.status, body, ctype, headers


def default_fault_body(status: int) -> dict[str, Any]:
    """The body Mixpanel sends with ``status``, as near as its docs tell."""
    if status == 200:
        return {"status": 1, "error": None}
    if status == 429:
        return {
            "code": 429,
            "error": "Project exceeded rate limits. Please retry the request with "
            "exponential backoff.",
            "status": "Too Many Requests",
        }
    if status == 401:
        return {"error": "Invalid token", "status": "error"}
    if status == 403:
        return {"error": "Forbidden", "status": "error"}
    if status == 413:
        return {"error": TOO_LARGE, "status": 0}
    if status >= 500:
        return {"error": "server error", "status": 0}
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return {"error": phrase, "status": 0}


class FaultScript:
    """The queue of scripted faults, safe to use from every handler thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()

    def extend(self, faults: tuple[Fault, ...]) -> None:
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._lock:
            self._faults.extend(faults)

    def next(self) -> Optional[Fault]:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._faults)
