"""The HTTP side of the sink: ``http.server`` with socket-level control.

It owns what only a socket can do: drop a connection without answering,
answer 413 before reading an oversized body, read chunked bodies, apply
scripted faults and delays, hold at most so many connections with deadlines
from each request's first byte (:mod:`.connections`), and refuse foreign
``Host`` names and other origins' browser posts (:mod:`.access`). What to
answer to a request the handler leaves to the sink (:meth:`Sink.handle_post`,
:meth:`Sink.handle_get`).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import TYPE_CHECKING, Any, Optional

from .._body import BodyTooLarge, framing, read_chunked
from .access import Access
from .connections import (
    MAX_HEAD_BYTES,
    BodyBudget,
    ConnectionLimits,
    ConnectionTable,
    DeadlineReader,
)
from .faults import Fault
from .protocol import MAX_BODY_BYTES, TOO_LARGE

if TYPE_CHECKING:
    from .service import Sink

__all__ = ["Reply", "SinkServer"]

logger = logging.getLogger("mixpanel_otel.sink")

#: (status, body, content type, extra headers)
Reply = tuple[int, bytes, str, list[tuple[str, str]]]

#: Sent with every answer: no page of the sink may be framed, sniffed or leak its address.
_SAFE_HEADERS = (
    "X-Content-Type-Options: nosniff",
    "X-Frame-Options: DENY",
    "Referrer-Policy: no-referrer",
)
#: The policy of answers that are not pages (a page brings its own).
_NO_CONTENT_POLICY = "default-src 'none'; frame-ancestors 'none'"
_BUSY_BODY = b'{"error": "the sink is busy: too many connections", "status": 0}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


#: Bodies this small are not reserved: the connection cap bounds them (256 x 64 KiB), and
#: a small request (a typical batch) gets through while large ones wait their turn.
_SMALL_BODY = 64 * 1024


def _reservation(length: int) -> int:
    """The budget a body of ``length`` bytes (-1: chunked, of unknown length) reserves."""
    if length < 0:
        return MAX_BODY_BYTES
    return 0 if length <= _SMALL_BODY else length


class SinkServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its sink and binds without DNS look-ups."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        sink: Sink,
        family: int,
        limits: ConnectionLimits,
        access: Access,
    ) -> None:
        self.address_family = family
        self.sink = sink
        self.limits = limits
        self.access = access
        self.connections = ConnectionTable(limits.max_connections)
        self.bodies = BodyBudget(limits.max_inflight_bytes)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection from a thread, if the cap leaves room for it."""
        if self.connections.admit(request):
            super().process_request(request, client_address)
            return
        self.sink._count(errors=1)
        try:  # never block the accepting thread on a client that does not read
            request.send(_BUSY, socket.MSG_DONTWAIT)
        except OSError:
            pass
        self.shutdown_request(request)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # client went away: not the sink's problem
            return
        logger.exception("mixpanel-otel sink: error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads requests and writes answers; the sink decides what they say."""

    protocol_version = "HTTP/1.1"
    server_version = "mixpanel-otel-sink"
    sys_version = ""
    disable_nagle_algorithm = True
    server: SinkServer

    # -- plumbing

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = DeadlineReader(self.connection)
        self._buffered = io.BufferedReader(self._reader)
        self.rfile = self._buffered
        self.wfile = self.connection.makefile("wb", 0)
        self._started = time.monotonic()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.rfile.close()
            self.server.connections.release(self.connection)

    def handle_one_request(self) -> None:
        """One request: its first byte within the idle time, its head within the head time."""
        limits = self.server.limits
        self._reader.deadline = time.monotonic() + limits.idle_timeout
        try:
            first = self._buffered.peek(1)
        except OSError:  # the idle time passed, or the client went away
            first = b""
        if not first:
            self.close_connection = True
            return
        self._started = time.monotonic()
        self._reader.deadline = self._started + limits.head_timeout
        # What the buffer read ahead counts too: allow one buffer more than the head.
        self._reader.head_left = MAX_HEAD_BYTES + io.DEFAULT_BUFFER_SIZE
        try:
            super().handle_one_request()
        finally:
            self.server.connections.waiting(self.connection)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self._reader.head_left = None  # the head is read: the body has its own limits
        return parsed

    def _body_deadline(self, slept: float = 0.0) -> None:
        """The body must arrive within the body time of the request's first byte."""
        self._reader.deadline = self._started + self.server.limits.body_timeout + slept

    def _answering(self) -> None:
        """The request is whole: it is not closed to make room, and the answer may take its time."""
        self.server.connections.answering(self.connection)
        self._reader.deadline = None
        self.connection.settimeout(self.server.limits.body_timeout)

    def _refusal(self, state_changing: bool) -> Optional[str]:
        """Why this request is refused before it is read (foreign Host, another origin)."""
        access = self.server.access
        reason = access.host_refusal(self.headers.get("Host"))
        if reason is None and state_changing:
            headers = {name.lower(): value for name, value in self.headers.items()}
            reason = access.origin_refusal(headers)
        return reason

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.sink.verbose:
            super().log_message(format, *args)

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        """Write status line, headers and body in one write (no Nagle stalls)."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        lines = [
            f"HTTP/1.1 {code} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.extend(_SAFE_HEADERS)
        if not any(name.lower() == "content-security-policy" for name, _ in headers):
            lines.append(f"Content-Security-Policy: {_NO_CONTENT_POLICY}")
        if close or self.close_connection:
            self.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.log_request(code)
        try:
            self.connection.sendall(head + body)  # a raw write may send only part
        except OSError:
            self.close_connection = True

    def _send_json(self, code: int, payload: Any, close: bool = False) -> None:
        self._send(code, json.dumps(payload).encode("utf-8"), "application/json", close=close)

    def _drop(self) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _content_length(self) -> int:
        """The declared body length; -1 when chunked, 0 when none is declared.

        Framing is strict (:func:`~mixpanel_otel._body.framing`): an ambiguous one
        (``xchunked``, Content-Length with chunked, two lengths) raises ``ValueError``.
        """
        if "Transfer-Encoding" not in self.headers and "Content-Length" not in self.headers:
            return 0
        length = framing(self.headers)
        return -1 if length is None else length

    def _safe_length(self) -> int:
        try:
            return max(self._content_length(), 0)
        except ValueError:
            return 0

    def _read_chunked(self) -> Optional[bytes]:
        """Read a chunked body; None when it grows past the size limit.

        Malformed framing (a negative or non-hex chunk size) raises ``ValueError``.
        """
        try:
            return read_chunked(self.rfile, MAX_BODY_BYTES)
        except BodyTooLarge:
            return None

    def _discard(self, length: int) -> None:
        """Read and throw away an oversized body so the client sees our answer."""
        self._reader.deadline = time.monotonic() + 10.0
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass
        self.close_connection = True

    # -- verbs

    def do_POST(self) -> None:
        sink = self.server.sink
        sink._count(requests=1)
        refusal = self._refusal(state_changing=True)
        if refusal is not None:
            self._refuse(refusal)
            return
        slept = time.monotonic()
        if sink.latency:
            time.sleep(sink.latency)
        if sink.down:
            self._discard(self._safe_length())
            self._drop()
            sink._count(faults=1)
            return
        fault = sink._faults.next()
        if fault is not None:
            sink._count(faults=1)
            if fault.delay:
                time.sleep(fault.delay)
        self._body_deadline(time.monotonic() - slept)
        try:
            length = self._content_length()
        except ValueError as exc:
            self._send_json(400, {"error": f"invalid framing: {exc}", "status": 0}, close=True)
            return
        if length > MAX_BODY_BYTES:
            self._answer_oversized(fault, length)
            return
        held = _reservation(length)
        if not self.server.bodies.reserve(held):
            sink._count(errors=1)
            payload = b'{"error": "the sink is busy: too many bodies in flight", "status": 0}'
            self._send(503, payload, headers=[("Retry-After", "1")], close=True)
            self._discard(max(length, 0))
            return
        try:
            self._read_and_answer(fault, length)
        finally:
            self.server.bodies.release(held)

    def _read_and_answer(self, fault: Optional[Fault], length: int) -> None:
        sink = self.server.sink
        try:
            body = self._read_chunked() if length == -1 else self.rfile.read(length)
        except ValueError:
            self._send_json(400, {"error": "malformed chunked body", "status": 0}, close=True)
            return
        if body is None:
            self._answer_oversized(fault, 0)
            return
        self._answering()
        sink._count(bytes=len(body))
        reply: Optional[Reply] = None
        if fault is None or not fault.replaces_answer or fault.apply:
            try:
                headers = {name.lower(): value for name, value in self.headers.items()}
                reply = sink.handle_post(self.path, headers, body)
            except Exception as exc:  # a sink bug: answer, log, keep serving
                logger.exception("mixpanel-otel sink: failed to handle %s", self.path)
                payload = {"error": f"internal sink error: {type(exc).__name__}", "status": 0}
                reply = (500, json.dumps(payload).encode(), "application/json", [])
        if fault is not None and fault.drop:
            self._drop()
        elif fault is not None and fault.status is not None:
            self._send(*fault.response())
        elif reply is not None:
            self._send(*reply)

    def _answer_oversized(self, fault: Optional[Fault], length: int) -> None:
        """A body over 2 MB: answer 413 (or the fault) unread, then close."""
        sink = self.server.sink
        sink._count(errors=0 if fault and fault.replaces_answer else 1)
        if fault is not None and fault.drop:
            self._discard(length)
            self._drop()
            return
        if fault is not None and fault.status is not None:
            self._send(*fault.response(), close=True)
        else:
            sink._refused_unread(self.path, TOO_LARGE)
            self._send_json(413, {"error": TOO_LARGE, "status": 0}, close=True)
        self._discard(length)

    def _refuse(self, reason: str) -> None:
        """Answer 403 with the reason, unread, and close; counted and kept among the refusals."""
        sink = self.server.sink
        sink._count(errors=1)
        if self.command == "POST":  # kept before answering: the client may look at once
            sink._refused_unread(self.path, f"403 {reason}")
        self._send_json(403, {"error": reason, "status": 0}, close=True)
        if self.command == "POST":
            self._discard(min(self._safe_length(), MAX_BODY_BYTES))

    def do_GET(self) -> None:
        refusal = self._refusal(state_changing=False)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._answering()
        code, body, content_type, headers = self.server.sink.handle_get(self.path)
        self._send(code, body, content_type, headers, close=code == 503)
