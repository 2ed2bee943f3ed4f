"""OTLP/HTTP: ``POST /v1/logs`` and ``/v1/traces`` (protobuf or JSON, gzip), ``GET /health``.

Stdlib ``http.server``, one thread per connection. A body is read only
after its Export call gets a slot, with its size checked before reading and
while decompressing, so a large or hostile body costs other requests nothing.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from ._ingest import Answer, Ingest, Outcome
from ._otlp import LOGS, TRACES, BadRequest, Signal, TooLarge, status_body

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
_READ_CHUNK = 1 << 16
_SOCKET_TIMEOUT = 30.0  # a client that stops sending mid-request loses its thread after this


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip (one or more members), refusing to produce more than ``limit`` bytes."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise TooLarge(f"body decompresses to more than {limit} bytes")
        if not inflater.eof:
            raise BadRequest("body is truncated gzip")
        data = inflater.unused_data
    return bytes(out)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mixpanel-otel-gateway"
    timeout = _SOCKET_TIMEOUT
    server: HttpServer

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
    ) -> None:
        """An OTLP error: a ``google.rpc.Status`` body in the request's encoding."""
        headers = {}
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

    def _read_body(self) -> bytes:
        limit = self.server.max_request_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise BadRequest("Content-Length (or chunked encoding) is required")
        try:
            length = int(length_text)
        except ValueError:
            raise BadRequest(f"Content-Length {length_text[:20]!r} is not a number") from None
        if length < 0:
            raise BadRequest("negative Content-Length")
        if length > limit:
            self.close_connection = True  # the body stays unread
            raise TooLarge(f"body of {length} bytes is over the limit of {limit} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise BadRequest("body shorter than Content-Length")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("bad chunk size in chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > limit:
                self.close_connection = True
                raise TooLarge(f"chunked body over the limit of {limit} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(16)  # CRLF after the chunk

    def _decoded_body(self) -> bytes:
        data = self._read_body()
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "gzip":
            return gunzip(data, self.server.max_request_bytes)
        return data

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
        answer: Answer = self.server.ingest.export(
            signal, b"", json_encoding, read=self._decoded_body
        )
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
        if path in ("/health", "/healthz", "/"):
            healthy, document = self.server.health()
            body = json.dumps(document, indent=1, sort_keys=True).encode()
            self._send(200 if healthy else 503, body, _JSON)
        elif path in _SIGNALS:
            self._error(405, 3, f"{path} takes POST")
        else:
            self._error(404, 5, f"nothing at {path[:100]!r}")

    do_HEAD = do_GET


class HttpServer(ThreadingHTTPServer):
    """The OTLP/HTTP listener; ``serve_forever`` in a thread, ``shutdown`` to stop accepting."""

    daemon_threads = True  # the gateway waits for Export calls itself, with a bound
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        ingest: Ingest,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        max_request_bytes: int,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ingest = ingest
        self.health = health
        self.max_request_bytes = max_request_bytes
        super().__init__(address, _Handler)
