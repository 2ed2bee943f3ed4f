"""OTLP/HTTP: ``POST /v1/logs`` and ``/v1/traces`` (protobuf or JSON, gzip), ``GET /health``.

Stdlib ``http.server``, one thread per connection (at most
``_MAX_CONNECTIONS``, ``_CONNECTIONS_PER_PEER`` from one address). The TLS
handshake and the request head must arrive whole within ``_HEAD_TIMEOUT``,
a body within its own deadline. Callers are checked first (bearer token, ``Host``
on an unauthenticated loopback gateway), then the body is read whole, within
a deadline that grows with its size, *before* its Export call takes a slot:
a slow sender holds a thread, never a slot. Bodies being received share a
byte cap; decoding shares the ingest's memory budget.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import select
import socket
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from time import monotonic
from typing import Any, Callable, Iterator, Optional

from .._body import BodyError, BodyTimeout, BodyTooLarge, framing, read_body
from ._ingest import Answer, Call, Ingest, Outcome
from ._limits import Budget
from ._otlp import LOGS, TRACES, Signal, status_body
from ._security import ClientLog, HostCheck, Tokens

__all__ = ["HttpServer"]

logger = logging.getLogger("mixpanel_otel.gateway")

_SIGNALS = {LOGS.path: LOGS, TRACES.path: TRACES}
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_GRPC_CODES = {  # google.rpc.Code of each outcome, for the Status body
    Outcome.INVALID: 3,
    Outcome.TOO_LARGE: 8,
    Outcome.OVERLOADED: 8,
    Outcome.UNAVAILABLE: 14,
    Outcome.STOPPING: 14,
}
_HTTP_STATUS = {
    Outcome.INVALID: HTTPStatus.BAD_REQUEST,
    Outcome.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    Outcome.OVERLOADED: HTTPStatus.TOO_MANY_REQUESTS,
    Outcome.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    Outcome.STOPPING: HTTPStatus.SERVICE_UNAVAILABLE,
}
_SOCKET_TIMEOUT = 30.0  # a write to a caller that reads nothing ends after this
_IDLE_TIMEOUT = 30.0  # a keep-alive connection waits this long for its next request
_HEAD_TIMEOUT = 10.0  # TLS handshake and request head, whole, from accept or the first byte
_BODY_GRACE = 10.0  # every body gets this long, plus its size at _MIN_RATE
_MIN_RATE = 64 * 1024  # bytes/s a sender must keep up, on average, for a whole body
_MAX_CONNECTIONS = 512
#: Connections from one address: one caller cannot take every thread (nginx's limit_conn).
_CONNECTIONS_PER_PEER = 64


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader whose reads all end by ``deadline``: a bound on the whole
    head or body, where a socket timeout bounds each read (a byte now and then passes)."""

    def __init__(self, raw: Any, sock: socket.socket, deadline: Optional[float]) -> None:
        super().__init__()
        self.raw = raw
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            remaining = self.deadline - monotonic()
            if remaining <= 0:
                raise socket.timeout("the request did not arrive in time")
            self.sock.settimeout(remaining)
        count: int = self.raw.readinto(buffer)
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def _handshake(sock: ssl.SSLSocket, deadline: float) -> None:
    """The TLS handshake, whole, by ``deadline`` (a blocking one bounds each read only)."""
    sock.setblocking(False)
    poller = select.poll()
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                poller.register(sock, select.POLLIN)
            except ssl.SSLWantWriteError:
                poller.register(sock, select.POLLOUT)
            remaining = deadline - monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise socket.timeout("the TLS handshake did not finish in time")
            poller.unregister(sock)
    finally:
        sock.setblocking(True)


class _ReceiveFull(Exception):
    """The bytes of bodies being received are at their cap."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mixpanel-otel-gateway"
    timeout = _SOCKET_TIMEOUT
    rbufsize = 0  # the raw reader, wrapped in setup()
    server: HttpServer

    def setup(self) -> None:
        deadline = monotonic() + _HEAD_TIMEOUT  # handshake and first head, from accept
        if isinstance(self.request, ssl.SSLSocket):
            _handshake(self.request, deadline)  # here, in this connection's thread
        super().setup()
        self._reader = _DeadlineReader(self.rfile, self.connection, deadline)
        self._buffered = io.BufferedReader(self._reader)
        self.rfile = self._buffered
        self._served = False

    def handle_one_request(self) -> None:
        if self._served:  # keep-alive: the next head is timed from its first byte
            self._reader.deadline = monotonic() + _IDLE_TIMEOUT
            try:
                if not self._buffered.peek(1):
                    self.close_connection = True
                    return
            except OSError:  # timeouts included
                self.close_connection = True
                return
            self._reader.deadline = monotonic() + _HEAD_TIMEOUT
        self._served = True
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s - %s", self.address_string(), format % args)

    # -- helpers ----------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.server.ingest.stopping:
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(
        self,
        status: int,
        code: int,
        message: str,
        json_encoding: bool = False,
        retry_after: Optional[float] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        """An OTLP error: a ``google.rpc.Status`` body in the request's encoding."""
        headers = dict(headers or {})
        message = self.server.ingest.scrub(message)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        if json_encoding:
            document: dict[str, Any] = {"code": code, "message": message}
            if retry_after is not None:
                document["details"] = [
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{retry_after:.3f}s",
                    }
                ]
            self._send(status, json.dumps(document).encode(), _JSON, headers)
        else:
            self._send(status, status_body(code, message, retry_after), _PROTOBUF, headers)

    def _refuse_caller(self, json_encoding: bool) -> bool:
        """Answer a caller that may not call (wrong ``Host``, missing or wrong token)."""
        server = self.server
        if self._refuse_host(json_encoding):
            return True
        if not server.tokens.allows(self.headers.get("Authorization")):
            server.ingest.count(unauthenticated=1)
            server.client_error(
                "auth", f"missing or wrong bearer token from {self.client_address[0]}"
            )
            self.close_connection = True  # the body stays unread
            self._error(
                401,
                16,
                "missing or wrong bearer token",
                json_encoding,
                headers={"WWW-Authenticate": 'Bearer realm="mixpanel-otel-gateway"'},
            )
            return True
        return False

    def _refuse_host(self, json_encoding: bool = False) -> bool:
        """403 for a ``Host`` a gateway without authentication does not answer."""
        server = self.server
        if server.host_check is None or server.host_check.allows(self.headers.get("Host")):
            return False
        server.ingest.count(unauthenticated=1)
        server.client_error("host", f"refused Host {self.headers.get('Host', '')[:80]!r}")
        self.close_connection = True
        self._error(
            403,
            7,
            "this gateway answers only to a loopback Host or --allowed-hosts (no authentication)",
            json_encoding,
        )
        return True

    def _receive(self, held: list[int]) -> bytes:
        """The whole body, within its deadline, counted against the bytes of bodies held.

        ``held[0]`` is what this request holds; the caller releases it once done.
        """
        server = self.server
        limit = server.max_request_bytes
        declared = framing(self.headers)  # BodyError (400) when ambiguous
        expected = limit if declared is None else declared
        deadline = monotonic() + _BODY_GRACE + min(expected, limit) / _MIN_RATE

        def count(size: int) -> None:
            if not server.receiving.try_acquire(size):
                raise _ReceiveFull
            held[0] += size

        self._reader.deadline = deadline
        try:
            return read_body(
                self.rfile,
                self.headers,
                limit,
                sock=self.connection,
                deadline=deadline,
                count=count,
            )
        finally:
            self._reader.deadline = None
            self.connection.settimeout(self.timeout)  # for writing the answer

    # -- methods ----------------------------------------------------------------------

    def do_POST(self) -> None:
        signal: Optional[Signal] = _SIGNALS.get(self.path.split("?", 1)[0])
        if signal is None:
            self.close_connection = True
            self._error(
                404, 5, f"no OTLP endpoint at {self.path[:100]!r}; use /v1/logs or /v1/traces"
            )
            return
        media = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media not in (_PROTOBUF, _JSON):
            self.close_connection = True  # the body stays unread
            self._error(
                415,
                3,
                f"unsupported Content-Type {media[:80]!r}: use {_PROTOBUF} or {_JSON}",
            )
            return
        json_encoding = media == _JSON
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity", ""):
            self.close_connection = True
            self._error(
                415, 3, f"unsupported Content-Encoding {encoding[:40]!r}: use gzip", json_encoding
            )
            return
        if self._refuse_caller(json_encoding):
            return
        held = [0]
        try:
            with self.server.answering():
                self._export(signal, json_encoding, encoding, held)
        finally:
            self.server.receiving.release(held[0])

    def _export(self, signal: Signal, json_encoding: bool, encoding: str, held: list[int]) -> None:
        try:
            body = self._receive(held)
        except _ReceiveFull:
            self.close_connection = True
            self.server.ingest.count(overloaded=1)
            self._error(
                429, 8, "too many request bodies being received at once", json_encoding, 1.0
            )
            return
        except BodyError as exc:
            self.close_connection = True
            self.server.ingest.count(invalid_requests=1)
            self.server.client_error("body", f"{exc} from {self.client_address[0]}")
            if isinstance(exc, BodyTimeout):
                return  # the sender is too slow to read an answer either
            if isinstance(exc, BodyTooLarge):
                self._error(413, 8, str(exc), json_encoding)
            else:
                self._error(400, 3, str(exc), json_encoding)
            return
        receiving = self.server.receiving

        def received() -> None:  # the body is parsed: no longer held
            receiving.release(held[0])
            held[0] = 0

        call = Call("http", self.client_address[0], received)
        answer: Answer = self.server.ingest.export(
            signal, body, json_encoding, gzip=encoding == "gzip", call=call
        )
        del body
        if answer.outcome is Outcome.OK:
            body = signal.response_bytes(answer.rejected, answer.message, json_encoding)
            self._send(200, body, _JSON if json_encoding else _PROTOBUF)
            return
        if answer.outcome in (Outcome.OVERLOADED, Outcome.STOPPING):
            self.close_connection = self.close_connection or answer.outcome is Outcome.STOPPING
        self._error(
            _HTTP_STATUS[answer.outcome],
            _GRPC_CODES[answer.outcome],
            answer.message,
            json_encoding,
            answer.retry_after if answer.outcome is not Outcome.STOPPING else 1.0,
        )

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        server = self.server
        if self._refuse_host():
            return
        if path in ("/health", "/healthz", "/"):
            healthy, document = self.server.health()
            text = json.dumps(document, indent=1, sort_keys=True)
            body = server.ingest.scrub(text).encode()
            self._send(200 if healthy else 503, body, _JSON)
        elif path in _SIGNALS:
            self._error(405, 3, f"{path} takes POST")
        else:
            self._error(404, 5, f"nothing at {path[:100]!r}")

    do_HEAD = do_GET


class HttpServer(ThreadingHTTPServer):
    """The OTLP/HTTP listener; ``serve_forever`` in a thread, ``shutdown`` to stop accepting.

    Args:
        address: where to listen.
        ingest: runs the Export calls.
        health: the ``/health`` document.
        max_request_bytes: largest body, before and after decompression.
        tokens: the bearer tokens callers must present (none: no token needed).
        tls: the TLS context (mutual TLS when it requires client certificates).
        host_check: the ``Host`` values answered (a gateway without authentication,
            against DNS rebinding); None: any.
        receiving: the cap on bytes of bodies being received at once.
        throttle: limits the log lines about misbehaving clients.
    """

    daemon_threads = True  # the gateway waits for Export calls itself, with a bound
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        ingest: Ingest,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        max_request_bytes: int,
        tokens: Optional[Tokens] = None,
        tls: Optional[ssl.SSLContext] = None,
        host_check: Optional[HostCheck] = None,
        receiving: Optional[Budget] = None,
        throttle: Optional[ClientLog] = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ingest = ingest
        self.health = health
        self.max_request_bytes = max_request_bytes
        self.tokens = tokens or Tokens()
        self.host_check = host_check
        self.receiving = receiving or Budget(16 * max_request_bytes)
        self.throttle = throttle or ClientLog()
        self._connections = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self._peer_lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._answering = 0  # Export requests between their first byte and their answer
        self._answered = threading.Condition()
        super().__init__(address, _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on DNS.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Count an Export request until its answer is written (see :meth:`wait_answered`)."""
        with self._answered:
            self._answering += 1
        try:
            yield
        finally:
            with self._answered:
                self._answering -= 1
                self._answered.notify_all()

    def wait_answered(self, timeout: float) -> bool:
        """Wait until every Export request has its answer written: handler threads are
        daemons, so a process that exits first would cut the answer off."""
        with self._answered:
            return self._answered.wait_for(lambda: not self._answering, timeout)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = client_address[0]
        with self._peer_lock:
            held = self._per_peer.get(peer, 0)
            admitted = held < _CONNECTIONS_PER_PEER and self._connections.acquire(blocking=False)
            if admitted:
                self._per_peer[peer] = held + 1
        if not admitted:
            what = (
                f"{peer} has {_CONNECTIONS_PER_PEER} connections open"
                if held >= _CONNECTIONS_PER_PEER
                else f"over {_MAX_CONNECTIONS} connections"
            )
            self.client_error("connections", f"{what}: closing a new one")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            peer = client_address[0]
            with self._peer_lock:
                left = self._per_peer.pop(peer) - 1
                if left:
                    self._per_peer[peer] = left
                self._connections.release()

    def client_error(self, kind: str, message: str) -> None:
        """Log a client's mistake: one line, at most one per kind every few seconds."""
        self.throttle.warn(kind, message)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, timeouts, failed TLS handshakes
            self.client_error(
                "connection", f"connection from {client_address[0]} ended: {exc!r}"[:300]
            )
            return
        now, _ = self.throttle.allow("internal")
        if now:
            logger.exception("mixpanel-otel gateway: error serving %s", client_address[0])
