"""The connections the sink holds: a cap, deadlines from the first byte, and who gives way.

A thread serves each connection, so the cap on connections is the cap on
threads. Past the cap the connection that has waited longest without a whole
request (silent, or still trickling its head or body) is closed to make room;
a connection whose request is being answered is never closed, and when every
connection is being answered the newcomer is refused with a 503. Memory has
caps too: a request head of at most 64 KiB, and a budget of body bytes being
received across all connections, reserved before a body is read.
"""

from __future__ import annotations

import io
import socket
import threading
from dataclasses import dataclass
from time import monotonic
from typing import Optional

__all__ = ["BodyBudget", "ConnectionLimits", "ConnectionTable", "DeadlineReader", "HeadTooLarge"]

#: The most a request line and its headers may take (nginx allows 32 KiB by default).
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the sink holds and how long each may take.

    Args:
        max_connections: connections (and so threads) served at once.
        idle_timeout: seconds a connection may wait for the first byte of its next request.
        head_timeout: seconds from a request's first byte to the end of its head.
        body_timeout: seconds from a request's first byte to the end of its body.
        max_inflight_bytes: body bytes received at once across connections (a
            chunked body reserves the whole body limit); past it a request is
            answered 503 unread.
    """

    max_connections: int = 256
    idle_timeout: float = 60.0
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    max_inflight_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_inflight_bytes < 1:
            raise ValueError("max_connections and max_inflight_bytes must be at least 1")
        for name in ("idle_timeout", "head_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")


class _Held:
    __slots__ = ("answering", "waiting_since")

    def __init__(self) -> None:
        self.answering = False
        self.waiting_since = monotonic()


class ConnectionTable:
    """The open connections, each waiting for a request or being answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: dict[socket.socket, _Held] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def admit(self, conn: socket.socket) -> bool:
        """Hold ``conn``, closing the longest-waiting one at the cap; False to refuse it."""
        with self._lock:
            if len(self._held) >= self.limit:
                waiting = [
                    (held.waiting_since, sock)
                    for sock, held in self._held.items()
                    if not held.answering
                ]
                if not waiting:
                    return False
                victim = min(waiting, key=lambda pair: pair[0])[1]
                del self._held[victim]
                _shut(victim)
            self._held[conn] = _Held()
            return True

    def answering(self, conn: socket.socket) -> None:
        """``conn`` has sent a whole request: it may not be closed to make room."""
        with self._lock:
            held = self._held.get(conn)
            if held is not None:
                held.answering = True

    def waiting(self, conn: socket.socket) -> None:
        """``conn`` was answered and waits for its next request."""
        with self._lock:
            held = self._held.get(conn)
            if held is not None:
                held.answering = False
                held.waiting_since = monotonic()

    def release(self, conn: socket.socket) -> None:
        with self._lock:
            self._held.pop(conn, None)

    def close_all(self) -> None:
        with self._lock:
            held, self._held = list(self._held), {}
        for conn in held:
            _shut(conn)


def _shut(conn: socket.socket) -> None:
    # shutdown, not close: the serving thread still owns the descriptor; its read ends at once.
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class BodyBudget:
    """Body bytes being received across connections, reserved before they are read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held = 0

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self._held + size > self.limit:
                return False
            self._held += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._held -= size


class HeadTooLarge(ConnectionAbortedError):
    """The request head went past :data:`MAX_HEAD_BYTES`: the connection is closed."""


class DeadlineReader(io.RawIOBase):
    """A socket's reading side whose every read waits at most until ``deadline``.

    A per-``recv`` timeout lets a client trickle one byte at a time for ever;
    a deadline bounds the whole head or body however it is sent. While
    ``head_left`` is set, reading more than that many bytes raises
    :class:`HeadTooLarge`.
    """

    def __init__(self, conn: socket.socket) -> None:
        super().__init__()
        self._conn = conn
        self.deadline: Optional[float] = None
        self.head_left: Optional[int] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.deadline is not None:
            remaining = self.deadline - monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            self._conn.settimeout(remaining)
        if self.head_left is not None and self.head_left <= 0:
            raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")
        try:
            received = self._conn.recv_into(buffer)
        except ConnectionResetError:
            return 0
        if self.head_left is not None:
            self.head_left -= received
        return received
