"""A local, Mixpanel-compatible ingestion server for group profiles.

The sink speaks Mixpanel's ``/groups`` API (plus ``/engage``, ``/track`` and
``/import``, whose messages are only stored) on a loopback address, validates
messages the way Mixpanel does, applies group operations to profiles kept in
SQLite and shows them on a small web page.  It exists so the test suite, the
demo and users' local development can run against something that behaves like
Mixpanel without a network or an account.  It also injects faults (errors,
dropped connections, delays) so delivery code can be tested for real.

Stdlib only: ``http.server`` + ``sqlite3``.
"""

from __future__ import annotations

import base64
import binascii
import html
import ipaddress
import json
import logging
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import parse_qs, quote, urlencode

from ._wire import group_id_key

__all__ = ["Fault", "Sink", "format_profiles_table", "validate_group_message"]

logger = logging.getLogger(__name__)

#: Largest request body Mixpanel accepts, in bytes.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: Most messages Mixpanel accepts in one request.
MAX_MESSAGES = 2000
#: Largest single message, in bytes of JSON.
MAX_MESSAGE_BYTES = 1024 * 1024
#: Longest property name, in characters.
MAX_NAME_CHARS = 255
#: Longest string value, in UTF-8 bytes.
MAX_STRING_BYTES = 255
#: Largest list or object value, in bytes of JSON.
MAX_CONTAINER_BYTES = 256 * 1024
#: Deepest nesting of objects in a property value.
MAX_OBJECT_DEPTH = 3
#: Last updates kept per profile for the "last updates" view.
UPDATES_PER_PROFILE = 50
#: Messages kept per endpoint in the ``received`` table.
RECEIVED_CAP = 100_000

GROUP_OPERATIONS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
_OBJECT_OPERATIONS = ("$set", "$set_once", "$union", "$remove")
_ENDPOINTS = {"/groups": "groups", "/engage": "engage", "/track": "track", "/import": "import"}
_GZIP_ENDPOINTS = ("track", "import")  # Mixpanel takes no gzip on profile endpoints
_TOO_LARGE = f"request exceeds max limit of {MAX_BODY_BYTES} bytes"

JSONDict = Dict[str, Any]


# --------------------------------------------------------------------------- faults


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


def _default_fault_body(status: int) -> JSONDict:
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
        return {"error": _TOO_LARGE, "status": 0}
    if status >= 500:
        return {"error": "server error", "status": 0}
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return {"error": phrase, "status": 0}


# --------------------------------------------------------------------------- validation


def _short(name: str, limit: int = 40) -> str:
    """A property name fit for an error message."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(value: Any) -> Optional[str]:
    """Why a property value breaks Mixpanel's limits, or None when it is fine."""
    if isinstance(value, (list, dict)):
        size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
        if size > MAX_CONTAINER_BYTES:
            return f"list or object is {size} bytes (max {MAX_CONTAINER_BYTES})"
    stack: List[Tuple[Any, int]] = [(value, 0)]
    while stack:  # iterative: values may nest deeper than the recursion limit
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_STRING_BYTES // 4 and len(item.encode("utf-8")) > MAX_STRING_BYTES:
                return f"string longer than {MAX_STRING_BYTES} bytes"
        elif isinstance(item, list):
            stack.extend((v, depth) for v in item)
        elif isinstance(item, dict):
            if depth + 1 > MAX_OBJECT_DEPTH:
                return f"objects nested deeper than {MAX_OBJECT_DEPTH} levels"
            for key, v in item.items():
                if len(key) > MAX_NAME_CHARS:
                    return f"object key longer than {MAX_NAME_CHARS} characters"
                stack.append((v, depth + 1))
    return None


def validate_group_message(message: Any) -> Optional[str]:
    """Why Mixpanel would reject a ``/groups`` message, or None if it is valid."""
    if not isinstance(message, dict):
        return "message must be a JSON object"
    token = message.get("$token")
    if "$token" not in message:
        return "$token is missing"
    if not isinstance(token, str) or not token:
        return "$token must be a non-empty string"
    if "$group_key" not in message:
        return "$group_key is missing"
    group_key = message["$group_key"]
    if not isinstance(group_key, str) or not group_key:
        return "$group_key must be a non-empty string"
    if "$group_id" not in message:
        return "$group_id is missing"
    group_id = message["$group_id"]
    if not (isinstance(group_id, str) or _is_number(group_id)):
        return "$group_id must be a string or number"
    if group_id == "":
        return "$group_id must not be empty"
    if "$time" in message and not _is_number(message["$time"]):
        return "$time must be a number"
    ops = [op for op in GROUP_OPERATIONS if op in message]
    if not ops:
        return "no operation: expected exactly one of " + ", ".join(GROUP_OPERATIONS)
    if len(ops) > 1:
        return f"more than one operation ({', '.join(ops)}): expected exactly one"
    op = ops[0]
    payload = message[op]
    if op in _OBJECT_OPERATIONS:
        if not isinstance(payload, dict):
            return f"{op} must be an object"
        for name, value in payload.items():
            if len(name) > MAX_NAME_CHARS:
                return f"{op} property name {_short(name)} longer than {MAX_NAME_CHARS} characters"
            if op == "$union" and not isinstance(value, list):
                return f"$union value for {_short(name)} must be a list"
            problem = _check_value(value)
            if problem:
                return f"{op} value for {_short(name)}: {problem}"
    elif op == "$unset":
        if not isinstance(payload, list) or not payload:
            return "$unset must be a non-empty list of property names"
        for name in payload:
            if not isinstance(name, str):
                return "$unset must be a non-empty list of property names"
            if len(name) > MAX_NAME_CHARS:
                return (
                    f"$unset property name {_short(name)} longer than {MAX_NAME_CHARS} characters"
                )
    return None


def _validate_object(message: Any) -> Optional[str]:
    """Validation for /engage, /track and /import: only 'a JSON object'."""
    return None if isinstance(message, dict) else "message must be a JSON object"


# --------------------------------------------------------------------------- operations


def _canon(value: Any) -> str:
    """A hashable, type-aware identity for a JSON value (True is not 1)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def apply_operation(props: Optional[JSONDict], op: str, payload: Any) -> Optional[JSONDict]:
    """Apply one group operation with Mixpanel's semantics; None means no profile.

    The one implementation of those semantics (also used by
    :mod:`mixpanel_otel.testing`).
    """
    if op == "$delete":
        return None
    if op in ("$remove", "$unset") and props is None:
        return None  # these never create a profile
    new = dict(props) if props is not None else {}
    if op == "$set":
        new.update(payload)
    elif op == "$set_once":
        for name, value in payload.items():
            new.setdefault(name, value)
    elif op == "$union":
        for name, values in payload.items():
            current = new.get(name, [])
            merged = list(current) if isinstance(current, list) else [current]
            seen = {_canon(v) for v in merged}
            for value in values:
                key = _canon(value)
                if key not in seen:
                    seen.add(key)
                    merged.append(value)
            new[name] = merged
    elif op == "$remove":
        for name, value in payload.items():
            current = new.get(name)
            if isinstance(current, list):
                key = _canon(value)
                new[name] = [v for v in current if _canon(v) != key]
    elif op == "$unset":
        for name in payload:
            new.pop(name, None)
    return new


# --------------------------------------------------------------------------- body parsing


class _BadRequest(Exception):
    """A request body Mixpanel would answer with status 0."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _decode_data(text: str) -> Any:
    """Parse a ``data=`` value: JSON, or base64-encoded JSON from old clients."""
    stripped = text.strip()
    if not stripped:
        raise _BadRequest("data is empty")
    if stripped[0] in "[{":
        try:
            return _loads(stripped)
        except ValueError as exc:
            raise _BadRequest(f"data is not valid JSON: {exc}") from None
    try:
        return _loads(stripped)
    except ValueError as json_error:
        raw = stripped.replace(" ", "+")  # '+' arrives as ' ' when not percent-encoded
        raw += "=" * (-len(raw) % 4)
        try:
            if "-" in raw or "_" in raw:
                decoded = base64.urlsafe_b64decode(raw.encode("ascii"))
            else:
                decoded = base64.b64decode(raw.encode("ascii"), validate=True)
            return _loads(decoded.decode("utf-8"))
        except (ValueError, binascii.Error, UnicodeError):
            raise _BadRequest(
                f"data is neither JSON nor base64-encoded JSON: {json_error}"
            ) from None


def _parse_body(body: bytes, content_type: str) -> Tuple[Optional[Any], Dict[str, str]]:
    """Return (parsed JSON payload or None when absent, form fields)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json"):
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _BadRequest("body is not valid UTF-8") from None
        if not text.strip():
            raise _BadRequest("no data: the JSON body is empty")
        try:
            return _loads(text), {}
        except ValueError as exc:
            raise _BadRequest(f"body is not valid JSON: {exc}") from None
    try:
        text = body.decode("utf-8")
        form_lists = parse_qs(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _BadRequest("body is not valid UTF-8") from None
    form = {k: v[0] for k, v in form_lists.items() if v}
    if "data" in form:
        return _decode_data(form["data"]), form
    if text.lstrip()[:1] in ("[", "{"):  # raw JSON sent without a JSON content type
        try:
            return _loads(text), {}
        except ValueError as exc:
            raise _BadRequest(f"body is not valid JSON: {exc}") from None
    return None, form


def _flag(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- HTTP handler


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows its sink and binds without DNS look-ups."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], sink: Sink, family: int) -> None:
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
    """Serves the ingestion API, the fault hooks and the profile pages."""

    protocol_version = "HTTP/1.1"
    server_version = "mixpanel-otel-sink"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections end after this many seconds
    server: _Server

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
        headers: Iterable[Tuple[str, str]] = (),
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

    def _send_json(self, code: int, payload: Any, **kwargs: Any) -> None:
        self._send(code, json.dumps(payload).encode("utf-8"), "application/json", **kwargs)

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

    def _read_chunked(self) -> Optional[bytes]:
        """Read a chunked body; None when it grows past the size limit."""
        parts: List[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

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
        fault = sink._next_fault()
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
        result: Optional[Tuple[int, bytes, str]] = None
        if fault is None or not fault.replaces_answer or fault.apply:
            try:
                result = self._ingest(body)
            except Exception as exc:  # a sink bug: answer, log, keep serving
                logger.exception("mixpanel-otel sink: failed to handle %s", self.path)
                payload = {"error": f"internal sink error: {exc}", "status": 0}
                result = (500, json.dumps(payload).encode(), "application/json")
        if fault is not None and fault.drop:
            self._drop()
        elif fault is not None and fault.status is not None:
            self._send_fault(fault)
        elif result is not None:
            self._send(result[0], result[1], result[2])

    def _safe_length(self) -> int:
        try:
            return max(self._content_length(), 0)
        except ValueError:
            return 0

    def _answer_oversized(self, fault: Optional[Fault], length: int) -> None:
        """A body over 2 MB: answer 413 (or the fault) unread, then close."""
        self.server.sink._count(errors=0 if fault and fault.replaces_answer else 1)
        if fault is not None and fault.drop:
            self._discard(length)
            self._drop()
            return
        if fault is not None and fault.status is not None:
            self._send_fault(fault, close=True)
        else:
            self._send_json(413, {"error": _TOO_LARGE, "status": 0}, close=True)
        self._discard(length)

    def _send_fault(self, fault: Fault, close: bool = False) -> None:
        assert fault.status is not None
        headers = []
        if fault.retry_after is not None:
            ra = fault.retry_after
            if isinstance(ra, float) and ra.is_integer():
                ra = int(ra)
            headers.append(("Retry-After", str(ra)))
        if fault.body is None:
            body = json.dumps(_default_fault_body(fault.status)).encode("utf-8")
            ctype = "application/json"
        else:
            body = fault.body.encode("utf-8") if isinstance(fault.body, str) else fault.body
            try:
                json.loads(body)
                ctype = "application/json"
            except ValueError:
                ctype = "text/plain; charset=utf-8"
        self._send(fault.status, body, ctype, headers=headers, close=close)

    def _ingest(self, body: bytes) -> Tuple[int, bytes, str]:
        """Handle an ingestion request normally; returns (code, body, content type)."""
        sink = self.server.sink
        path, _, query_string = self.path.partition("?")
        endpoint = _ENDPOINTS.get(path.rstrip("/"))
        if endpoint is None:
            return 404, json.dumps({"error": "not found", "status": 0}).encode(), "application/json"
        query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        # verbose comes from the query or the form; ip and strict are accepted and ignored
        # (ip only drives geolocation, strict only /import and /track error detail).
        verbose = _flag(query.get("verbose"))
        try:
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            if encoding in ("gzip", "deflate"):
                if endpoint not in _GZIP_ENDPOINTS:
                    raise _BadRequest(
                        f"Content-Encoding {encoding} is not supported on /{endpoint}"
                    )
                body = _decompress(body)
            elif encoding not in ("", "identity"):
                raise _BadRequest(f"unsupported Content-Encoding {encoding}")
            payload, form = _parse_body(body, self.headers.get("Content-Type", ""))
            if "verbose" in form:
                verbose = _flag(form["verbose"])
            if payload is None:
                raise _BadRequest("no data: send data=<JSON array> or a JSON body")
            if isinstance(payload, dict):
                messages = [payload]
            elif isinstance(payload, list):
                messages = payload
            else:
                raise _BadRequest("data must be a JSON array of messages or a JSON object")
            if len(messages) > MAX_MESSAGES:
                sink._count(rejected=len(messages))
                raise _BadRequest(
                    f"too many messages in one request: {len(messages)} (max {MAX_MESSAGES})"
                )
            error = sink._process(endpoint, messages, len(body))
        except _BadRequest as exc:
            error = str(exc)
        if error:
            sink._count(errors=1)
        if verbose:
            return (
                200,
                json.dumps({"status": 0 if error else 1, "error": error}).encode(),
                ("application/json"),
            )
        return 200, (b"0" if error else b"1"), "text/plain; charset=utf-8"

    def do_GET(self) -> None:
        path, _, query_string = self.path.partition("?")
        query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        sink = self.server.sink
        try:
            if path == "/":
                page = _render_list(sink, query.get("group_key", ""), query.get("q", ""))
                self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
            elif path == "/profile":
                key, gid = query.get("group_key", ""), query.get("group_id", "")
                found, page = _render_profile(sink, key, gid)
                self._send(200 if found else 404, page.encode("utf-8"), "text/html; charset=utf-8")
            elif path == "/api/profiles":
                rows = sink._query_profiles(query.get("group_key") or None, query.get("q") or None)
                self._send_json(200, [_public(row) for row in rows])
            elif path == "/api/profile":
                key, gid = query.get("group_key", ""), query.get("group_id", "")
                props = sink.profile(key, gid)
                self._send_json(
                    200 if props is not None else 404,
                    {
                        "group_key": key,
                        "group_id": gid,
                        "properties": props,
                        "updates": sink.updates(key, gid),
                    },
                )
            elif path == "/healthz":
                self._send(200, b"ok", "text/plain; charset=utf-8")
            else:
                self._send_json(404, {"error": "not found", "status": 0})
        except sqlite3.Error as exc:  # e.g. the sink is stopping
            self._send_json(503, {"error": f"storage unavailable: {exc}", "status": 0}, close=True)


def _decompress(body: bytes) -> bytes:
    """Inflate a gzip/deflate body, refusing anything past the size limit."""
    try:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        data = inflater.decompress(body, MAX_BODY_BYTES * 5 + 1)
    except zlib.error as exc:
        raise _BadRequest(f"body is not valid compressed data: {exc}") from None
    if len(data) > MAX_BODY_BYTES * 5:
        raise _BadRequest("decompressed body is too large")
    return data


# --------------------------------------------------------------------------- storage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (group_key, group_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    op TEXT NOT NULL,
    payload TEXT NOT NULL,
    time REAL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_profile ON updates (group_key, group_id, id);
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS received_by_endpoint ON received (endpoint, id);
"""


def _loopback_host(host: str) -> Tuple[str, int]:
    """Check that ``host`` is a loopback address; return it and its socket family."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the sink only listens on loopback addresses, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the sink only listens on loopback addresses, not {host!r}")
    return host, socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _public(row: JSONDict) -> JSONDict:
    return {
        "group_key": row["group_key"],
        "group_id": row["group_id"],
        "properties": row["properties"],
    }


class Sink:
    """A local Mixpanel-compatible ``/groups`` endpoint backed by SQLite.

    The socket is bound and the database opened at construction, so ``url`` is
    known before serving; ``start()`` serves from a daemon thread,
    ``serve_forever()`` from the calling one.  ``db_path=None`` uses a temporary
    database that is deleted by ``stop()``.
    """

    def __init__(
        self,
        db_path: Optional[Union[str, os.PathLike]] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        latency: float = 0.0,
    ) -> None:
        host, family = _loopback_host(host)
        self.verbose = verbose
        #: Seconds added to every POST, to stand in for the network round trip to Mixpanel.
        self.latency = latency
        #: While True every POST has its connection dropped, like a dead server.
        self.down = False
        self._tempdir: Optional[str] = None
        if db_path is None:
            self._tempdir = tempfile.mkdtemp(prefix="mixpanel-otel-sink-")
            db_path = os.path.join(self._tempdir, "sink.sqlite3")
        self.db_path = os.fspath(db_path)
        parent = os.path.dirname(os.path.abspath(self.db_path))
        os.makedirs(parent, exist_ok=True)

        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._faults: Deque[Fault] = deque()
        self._connections: set = set()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._serving = threading.Event()
        self._serve_done = threading.Event()
        self._received_since_prune = 0
        self.reset_counters()

        self._db = self._connect()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._server = _Server((host, port), self, family)
        except BaseException:
            self._db.close()
            self._remove_tempdir()
            raise
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self.host = str(bound_host)
        self.port = int(bound_port)
        self.url = f"http://{shown}:{bound_port}"

    def __repr__(self) -> str:
        state = "stopped" if self._closed else "serving" if self._serving.is_set() else "idle"
        return f"<Sink {self.url} {state} db={self.db_path!r}>"

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- lifecycle

    def start(self) -> Sink:
        """Serve from a daemon thread; returns self."""
        if self._closed:
            raise RuntimeError("this sink is stopped; create a new one")
        if self._thread is None and not self._serving.is_set():
            self._serving.set()
            self._thread = threading.Thread(
                target=self._serve, name=f"mixpanel-otel-sink:{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until ``stop()`` (from another thread) or Ctrl-C."""
        if self._closed:
            raise RuntimeError("this sink is stopped; create a new one")
        if self._serving.is_set():
            raise RuntimeError("this sink is already serving")
        self._serving.set()
        try:
            self._serve()
        finally:
            self.stop()

    def _serve(self) -> None:
        try:
            self._server.serve_forever(poll_interval=0.5)
        finally:
            self._serve_done.set()

    def stop(self) -> None:
        """Stop serving, close connections and the database; idempotent."""
        with self._stop_lock:
            if self._closed:
                return
            if (
                self._serving.is_set()
                and not self._serve_done.is_set()
                and threading.current_thread() is not self._thread
            ):
                self._shutdown_loop()
            self._server.server_close()
            with self._state_lock:
                connections = list(self._connections)
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            with self._write_lock:
                self._closed = True
                self._db.close()
            self._remove_tempdir()

    def _shutdown_loop(self) -> None:
        """End serve_forever now: poke the listening socket instead of waiting a poll."""
        waiter = threading.Thread(target=self._server.shutdown, daemon=True)
        waiter.start()
        family = self._server.address_family
        while waiter.is_alive():
            try:
                with socket.socket(family, socket.SOCK_STREAM) as poke:
                    poke.settimeout(0.2)
                    poke.connect(self._server.server_address)
            except OSError:
                pass
            waiter.join(0.005)

    def _remove_tempdir(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def _track_connection(self, conn: socket.socket, opened: bool) -> None:
        with self._state_lock:
            if opened:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- faults and counters

    def script(self, *faults: Fault) -> None:
        """Queue faults; each answers one next POST request, in order."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._state_lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Optional[Fault]:
        with self._state_lock:
            return self._faults.popleft() if self._faults else None

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been used yet."""
        with self._state_lock:
            return len(self._faults)

    @property
    def counters(self) -> JSONDict:
        """A snapshot: requests, messages, batch_sizes, bytes, rejected (+ errors, faults)."""
        with self._state_lock:
            snapshot = dict(self._counters)
            snapshot["batch_sizes"] = list(self._batch_sizes)
        return snapshot

    def reset_counters(self) -> None:
        """Zero every counter."""
        with self._state_lock:
            self._counters = {
                "requests": 0,
                "messages": 0,
                "bytes": 0,
                "rejected": 0,
                "errors": 0,
                "faults": 0,
            }
            self._batch_sizes: Deque[int] = deque(maxlen=100_000)

    def _count(self, batch: Optional[int] = None, **amounts: int) -> None:
        with self._state_lock:
            for name, amount in amounts.items():
                self._counters[name] += amount
            if batch is not None:
                self._counters["messages"] += batch
                self._batch_sizes.append(batch)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
        """Poll ``predicate()`` every 10 ms until it is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # -- ingestion

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _process(self, endpoint: str, messages: List[Any], body_bytes: int) -> Optional[str]:
        """Validate and store one request's messages in one transaction; return the error."""
        check = validate_group_message if endpoint == "groups" else _validate_object
        errors: List[str] = []
        valid: List[JSONDict] = []
        for index, message in enumerate(messages):
            problem = check(message)
            if problem is None and body_bytes > MAX_MESSAGE_BYTES:
                size = len(json.dumps(message).encode("utf-8"))
                if size > MAX_MESSAGE_BYTES:
                    problem = f"message is {size} bytes (max {MAX_MESSAGE_BYTES})"
            if problem is None:
                valid.append(message)
            else:
                errors.append(f"message {index}: {problem}")
        now = time.time()
        with self._write_lock:
            if self._closed:
                raise _BadRequest("the sink is stopping")
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if endpoint == "groups":
                    self._apply_groups(db, valid, now)
                self._store_received(db, endpoint, valid, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self._count(batch=len(messages), rejected=len(errors))
        return "; ".join(errors) or None

    def _apply_groups(self, db: sqlite3.Connection, messages: List[JSONDict], now: float) -> None:
        cache: Dict[Tuple[str, str], Tuple[Optional[JSONDict], Optional[float]]] = {}
        dirty: Dict[Tuple[str, str], None] = {}
        update_rows = []
        for message in messages:
            key = (message["$group_key"], group_id_key(message["$group_id"]))
            if key not in cache:
                row = db.execute(
                    "SELECT properties, created_at FROM profiles WHERE group_key=? AND group_id=?",
                    key,
                ).fetchone()
                cache[key] = (json.loads(row[0]), row[1]) if row else (None, None)
            props, created = cache[key]
            op = next(op for op in GROUP_OPERATIONS if op in message)
            new = apply_operation(props, op, message[op])
            if new is not None and created is None:
                created = now
            cache[key] = (new, created if new is not None else None)
            if new is not props:
                dirty[key] = None
            when = message.get("$time")
            update_rows.append(
                (
                    key[0],
                    key[1],
                    op,
                    json.dumps(message[op]),
                    float(when) if when is not None else None,
                    now,
                )
            )
        for key in dirty:
            props, created = cache[key]
            if props is None:
                db.execute("DELETE FROM profiles WHERE group_key=? AND group_id=?", key)
            else:
                db.execute(
                    "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?)",
                    (key[0], key[1], json.dumps(props), created, now),
                )
        db.executemany(
            "INSERT INTO updates (group_key, group_id, op, payload, time, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            update_rows,
        )
        for key in {row[:2] for row in update_rows}:
            db.execute(
                "DELETE FROM updates WHERE group_key=? AND group_id=? AND id <= ("
                " SELECT id FROM updates WHERE group_key=? AND group_id=?"
                f" ORDER BY id DESC LIMIT 1 OFFSET {UPDATES_PER_PROFILE})",
                (*key, *key),
            )

    def _store_received(
        self, db: sqlite3.Connection, endpoint: str, messages: List[JSONDict], now: float
    ) -> None:
        db.executemany(
            "INSERT INTO received (endpoint, message, received_at) VALUES (?, ?, ?)",
            [(endpoint, json.dumps(m), now) for m in messages],
        )
        self._received_since_prune += len(messages)
        if self._received_since_prune >= 5000:
            self._received_since_prune = 0
            for (name,) in db.execute("SELECT DISTINCT endpoint FROM received").fetchall():
                db.execute(
                    "DELETE FROM received WHERE endpoint=? AND id <= (SELECT id FROM received"
                    f" WHERE endpoint=? ORDER BY id DESC LIMIT 1 OFFSET {RECEIVED_CAP})",
                    (name, name),
                )

    # -- reading

    def _read(self, sql: str, params: Iterable[Any] = ()) -> List[tuple]:
        """Run a query on a short-lived reader connection (WAL lets it run beside writes)."""
        if self._closed:
            raise RuntimeError("this sink is stopped")
        conn = sqlite3.connect(self.db_path, timeout=10.0)
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        finally:
            conn.close()

    def _query_profiles(
        self,
        group_key: Optional[str] = None,
        q: Optional[str] = None,
        order: str = "group_key, group_id",
        limit: Optional[int] = None,
    ) -> List[JSONDict]:
        where, params = [], []
        if group_key:
            where.append("group_key = ?")
            params.append(group_key)
        if q:
            escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("group_id LIKE ? ESCAPE '\\'")
            params.append(f"%{escaped}%")
        sql = "SELECT group_key, group_id, properties, created_at, updated_at FROM profiles"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            {
                "group_key": k,
                "group_id": i,
                "properties": json.loads(p),
                "created_at": c,
                "updated_at": u,
            }
            for k, i, p, c, u in self._read(sql, params)
        ]

    def profiles(self, group_key: Optional[str] = None) -> List[JSONDict]:
        """All profiles (of one group key if given), sorted by (group_key, group_id)."""
        return [_public(row) for row in self._query_profiles(group_key)]

    def profile(self, group_key: str, group_id: Union[str, int, float]) -> Optional[JSONDict]:
        """The properties of one profile, or None if it does not exist."""
        rows = self._read(
            "SELECT properties FROM profiles WHERE group_key=? AND group_id=?",
            (group_key, group_id_key(group_id)),
        )
        return json.loads(rows[0][0]) if rows else None

    def updates(self, group_key: str, group_id: Union[str, int, float]) -> List[JSONDict]:
        """The last updates of one profile, oldest first: op, payload, time, received_at."""
        rows = self._read(
            "SELECT op, payload, time, received_at FROM updates"
            " WHERE group_key=? AND group_id=? ORDER BY id",
            (group_key, group_id_key(group_id)),
        )
        return [
            {"op": op, "payload": json.loads(payload), "time": t, "received_at": r}
            for op, payload, t, r in rows
        ]

    def received(self, endpoint: str) -> List[Any]:
        """Valid messages stored for ``"engage"``, ``"track"``, ``"import"`` (or ``"groups"``)."""
        name = endpoint.strip("/")
        if name not in _ENDPOINTS.values():
            raise ValueError(
                f"unknown endpoint {endpoint!r}; expected one of " + ", ".join(_ENDPOINTS.values())
            )
        rows = self._read("SELECT message FROM received WHERE endpoint=? ORDER BY id", (name,))
        return [json.loads(m) for (m,) in rows]

    def clear(self) -> None:
        """Delete every profile, update and received message."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("this sink is stopped")
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("profiles", "updates", "received"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")


def read_profiles(
    db_path: Union[str, os.PathLike], group_key: Optional[str] = None
) -> List[JSONDict]:
    """The profiles a sink database holds, as :meth:`Sink.profiles` gives them, without serving."""
    uri = "file:" + os.path.abspath(os.fspath(db_path)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=10.0)
    try:
        sql = "SELECT group_key, group_id, properties FROM profiles"
        params: tuple = ()
        if group_key:
            sql, params = sql + " WHERE group_key = ?", (group_key,)
        rows = conn.execute(sql + " ORDER BY group_key, group_id", params).fetchall()
    finally:
        conn.close()
    return [{"group_key": k, "group_id": i, "properties": json.loads(p)} for k, i, p in rows]


# --------------------------------------------------------------------------- rendering


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _clip(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(width - 3, 0)] + "..." if width > 3 else text[:width]


def format_profiles_table(profiles: List[JSONDict], width: int = 120) -> str:
    """Render profiles as a plain-text table (group_key, group_id, properties as JSON).

    Long cells are cut with ``...`` so each row fits in ``width`` columns; used by
    ``mixpanel-otel profiles``.
    """
    if not profiles:
        return "(no profiles)"
    rows = [
        (
            str(p.get("group_key", "")),
            str(p.get("group_id", "")),
            _compact(p.get("properties") or {}),
        )
        for p in profiles
    ]
    key_w = min(max(len("GROUP_KEY"), *(len(r[0]) for r in rows)), 24)
    id_w = min(max(len("GROUP_ID"), *(len(r[1]) for r in rows)), 32)
    props_w = max(width - key_w - id_w - 4, 20)
    lines = [
        f"{'GROUP_KEY':<{key_w}}  {'GROUP_ID':<{id_w}}  PROPERTIES",
        f"{'-' * key_w}  {'-' * id_w}  {'-' * min(props_w, 40)}",
    ]
    for key, gid, props in rows:
        line = f"{_clip(key, key_w):<{key_w}}  {_clip(gid, id_w):<{id_w}}  {_clip(props, props_w)}"
        lines.append(line.rstrip())
    lines.append(f"({len(rows)} profile{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem 2rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .8rem}h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{background:#f6f7f9;font-weight:600}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{margin:0;white-space:pre-wrap;word-break:break-word}
form{margin:0 0 1rem}input{padding:.25rem .4rem;margin-right:.5rem}
.muted{color:#777}
"""


def _page(title: str, body: str, refresh: bool = False) -> str:
    meta = '<meta http-equiv="refresh" content="5">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return ""
    try:
        moment = datetime.fromtimestamp(timestamp, timezone.utc)
    except (OverflowError, OSError, ValueError):  # e.g. a $time sent in milliseconds
        return str(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _profile_link(group_key: str, group_id: str) -> str:
    return "/profile?" + urlencode({"group_key": group_key, "group_id": group_id}, quote_via=quote)


_PAGE_LIMIT = 500


def _render_list(sink: Sink, group_key: str, q: str) -> str:
    esc = html.escape
    rows = sink._query_profiles(
        group_key or None,
        q or None,
        order="updated_at DESC, group_key, group_id",
        limit=_PAGE_LIMIT + 1,
    )
    keys = [k for (k,) in sink._read("SELECT DISTINCT group_key FROM profiles ORDER BY 1")]
    options = "".join(f'<option value="{esc(k)}">' for k in keys)
    parts = [
        "<h1>Group profiles</h1>",
        '<form method="get" action="/">',
        f'<label>group key <input name="group_key" list="keys" value="{esc(group_key)}"></label>',
        f'<datalist id="keys">{options}</datalist>',
        f'<label>id contains <input name="q" value="{esc(q)}"></label>',
        '<button type="submit">Search</button> <a href="/">clear</a></form>',
    ]
    shown = rows[:_PAGE_LIMIT]
    more = f" (showing the first {_PAGE_LIMIT})" if len(rows) > _PAGE_LIMIT else ""
    parts.append(
        f'<p class="muted">{len(shown)} profile{"" if len(shown) == 1 else "s"}{more},'
        " most recently updated first; this page refreshes every 5 s.</p>"
    )
    if shown:
        parts.append(
            "<table><thead><tr><th>group key</th><th>group id</th>"
            "<th>properties</th><th>updated</th></tr></thead><tbody>"
        )
        for row in shown:
            props = _clip(_compact(row["properties"]), 300)
            parts.append(
                f"<tr><td>{esc(row['group_key'])}</td>"
                f'<td><a href="{esc(_profile_link(row["group_key"], row["group_id"]))}">'
                f"{esc(row['group_id'])}</a></td>"
                f"<td><code>{esc(props)}</code></td>"
                f'<td class="muted">{esc(_when(row["updated_at"]))}</td></tr>'
            )
        parts.append("</tbody></table>")
    else:
        parts.append("<p>No profiles yet. POST group updates to <code>/groups</code>.</p>")
    return _page("mixpanel-otel sink", "".join(parts), refresh=True)


def _render_profile(sink: Sink, group_key: str, group_id: str) -> Tuple[bool, str]:
    esc = html.escape
    props = sink.profile(group_key, group_id)
    updates = sink.updates(group_key, group_id)
    parts = [
        '<p><a href="/">&larr; all profiles</a></p>',
        f"<h1>{esc(group_key)} / {esc(group_id)}</h1>",
    ]
    if props is None:
        parts.append("<p>No such profile (never created, or deleted).</p>")
    elif not props:
        parts.append('<p class="muted">This profile has no properties.</p>')
    else:
        parts.append("<table><thead><tr><th>property</th><th>value</th></tr></thead><tbody>")
        for name in sorted(props):
            value = props[name]
            shown = (
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
            )
            parts.append(f"<tr><td>{esc(name)}</td><td><pre>{esc(shown)}</pre></td></tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>Last updates ({len(updates)}, newest first)</h2>")
    if updates:
        parts.append(
            "<table><thead><tr><th>received</th><th>$time</th><th>operation</th>"
            "<th>payload</th></tr></thead><tbody>"
        )
        for update in reversed(updates):
            parts.append(
                f'<tr><td class="muted">{esc(_when(update["received_at"]))}</td>'
                f'<td class="muted">{esc(_when(update["time"]))}</td>'
                f"<td><code>{esc(update['op'])}</code></td>"
                f"<td><code>{esc(_clip(_compact(update['payload']), 500))}</code></td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted">No updates recorded.</p>')
    title = f"{group_key} / {group_id} - mixpanel-otel sink"
    return props is not None, _page(title, "".join(parts))
