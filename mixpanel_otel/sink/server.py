"""The HTTP side of the sink: ``http.server`` with socket-level control.

It owns what only a socket can do: drop a connection without answering,
answer 413 before reading an oversized body, read chunked bodies, and apply
scripted faults and delays. What to answer to a request the handler leaves
to the sink (:meth:`Sink.handle_post`, :meth:`Sink.handle_get`).
"""

from __future__ import annotations

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

from .._body import BodyTooLarge, read_chunked
from .faults import Fault
from .protocol import MAX_BODY_BYTES, TOO_LARGE

if TYPE_CHECKING:
    from .service import Sink

__all__ = ["Reply", "SinkServer"]

logger = logging.getLogger("mixpanel_otel.sink")

#: (status, body, content type, extra headers)
Reply = tuple[int, bytes, str, list[tuple[str, str]]]


class SinkServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its sink and binds without DNS look-ups."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sink: Sink, family: int) -> None:
        self.address_family = family
        self.sink = sink
        super().__init__(address, _Handler)

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
    timeout = 300  # idle keep-alive connections end after this many seconds
    server: SinkServer

    # -- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.sink._track_connection(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sink._track_connection(self.connection, False)

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
        if close or self.close_connection:
            self.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.log_request(code)
        try:
            self.wfile.write(head + body)
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
        """The declared body length; -1 when chunked; raises ValueError if invalid."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return -1
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        length = int(value)
        if length < 0:
            raise ValueError("negative Content-Length")
        return length

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
        deadline = time.monotonic() + 10.0
        self.connection.settimeout(2.0)
        try:
            while length > 0 and time.monotonic() < deadline:
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
        try:
            length = self._content_length()
        except ValueError:
            self._send_json(400, {"error": "invalid Content-Length", "status": 0}, close=True)
            return
        if length > MAX_BODY_BYTES:
            self._answer_oversized(fault, length)
            return
        try:
            body = self._read_chunked() if length == -1 else self.rfile.read(length)
        except ValueError:
            self._send_json(400, {"error": "malformed chunked body", "status": 0}, close=True)
            return
        if body is None:
            self._answer_oversized(fault, 0)
            return
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
            self._send_json(413, {"error": TOO_LARGE, "status": 0}, close=True)
            sink._refused_unread(self.path, TOO_LARGE)
        self._discard(length)

    def do_GET(self) -> None:
        code, body, content_type, headers = self.server.sink.handle_get(self.path)
        self._send(code, body, content_type, headers, close=code == 503)
